"""HTTP helpers the service tests share (stdlib only: urllib against 127.0.0.1)."""
import io
import uuid


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
