"""HTTP helpers the tests share (stdlib only, 127.0.0.1): multipart bodies for the
service, and a shard server that can trickle or drop connections for the readers."""
import contextlib
import http.server
import io
import threading
import time
import uuid
from collections import Counter
from pathlib import Path


def multipart(fields: dict, files: dict) -> tuple[bytes, str]:
    """A multipart/form-data body of text `fields` and `files` {name: (filename, bytes)},
    and its Content-Type."""
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for k, v in fields.items():
        body.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode())
    for k, (name, data) in files.items():
        body.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"; filename=\"{name}\"\r\n"
                   f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


class ShardHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder, counting requests per file (`served`); the files in `trickle` come
    a byte every 0.2 s (their first `trickle_bytes`, then the connection ends); `drop`
    (name -> remaining drops) cuts the connection after half of the body, Content-Length
    announced in full, as a dying server does."""

    drop: dict = {}
    trickle: set = set()
    trickle_bytes = 150
    served: Counter = Counter()

    def log_message(self, *a):  # quiet
        pass

    def do_GET(self):
        name = self.path.lstrip("/")
        f = Path(self.directory) / name
        type(self).served[name] += 1
        if not f.is_file():
            self.send_error(404)
            return
        data = f.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            if name in self.trickle:
                for b in data[:self.trickle_bytes]:
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(0.2)
            elif self.drop.get(name, 0) != 0:
                self.drop[name] -= 1
                self.wfile.write(data[:len(data) // 2])
                self.wfile.flush()
                self.connection.shutdown(2)  # the socket dies mid-shard
            else:
                self.wfile.write(data)
        except OSError:  # the reader gave up on us
            return


@contextlib.contextmanager
def shard_server(folder, **attrs):
    """(base URL, handler class) of a ShardHandler over `folder` on 127.0.0.1, its state
    (drop, trickle, served, trickle_bytes) fresh for this server."""
    handler = type("H", (ShardHandler,), {"drop": {}, "trickle": set(), "served": Counter(), **attrs})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a, **k: handler(*a, directory=str(folder), **k))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", handler
    finally:
        srv.shutdown()
        srv.server_close()
