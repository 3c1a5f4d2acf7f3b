"""Pictures a client hands the service, as untrusted bytes: an upload, a base64 string
(clip-retrieval's `image`) or a URL the server fetches (clip-retrieval's `image_url`,
only from hosts the operator allowed). Every one goes through the same byte, pixel and
decoded-memory caps before decoding."""
from __future__ import annotations

import base64
import binascii
import http.client
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Sequence

from phoclip.data.images import decode_rgb
from phoclip.serve.settings import MAX_UPLOAD_PIXELS

FETCH_TIMEOUT = 10.0  # seconds for one image_url fetch (clip-retrieval's own timeout)
MAX_REDIRECTS = 3


class Refused(ValueError):
    """A client's picture we do not take: the message is one line for the client."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def decode_upload(data: bytes, max_decode_bytes: int):
    """An RGB image from untrusted bytes: the upload pixel cap and the decoded-bytes cap,
    both from the header alone, then the decode (`decode_rgb`). Raises BadImage."""
    return decode_rgb(data, MAX_UPLOAD_PIXELS, max_decode_bytes)


def base64_bytes(text: str, max_bytes: int) -> bytes:
    """The bytes of a base64 picture (a `data:...;base64,` prefix tolerated), refused
    unread when its length alone says it decodes to more than `max_bytes`."""
    if text.startswith("data:") and "," in text[:256]:
        text = text.split(",", 1)[1]
    if len(text) > (max_bytes + 2) // 3 * 4 + 4:
        raise Refused(413, f"image: over {max_bytes} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise Refused(422, "image: not base64") from None


def host_allowed(url: str, hosts: Sequence[str]) -> bool:
    """Whether `url` is http(s) on one of `hosts` ("name" matches any port, "name:port" that port)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    name = parts.hostname.lower()
    try:
        netloc = f"{name}:{parts.port}" if parts.port else name
    except ValueError:  # a port that is not a number
        return False
    return any(h.lower() in (name, netloc) for h in hosts)


class _AllowedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to an allowed host, at most MAX_REDIRECTS times."""

    max_redirections = MAX_REDIRECTS

    def __init__(self, hosts: Sequence[str]) -> None:
        self.hosts = hosts

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not host_allowed(newurl, self.hosts):
            raise Refused(422, f"image_url: redirected to a host not allowed ({urllib.parse.urlsplit(newurl).hostname})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _Deadline:
    """Shuts the fetch's connections down when its time is up: the socket timeout bounds
    each read, not the fetch, so a server dripping its headers or body a byte at a time
    would otherwise hold a worker for as long as it likes."""

    def __init__(self, seconds: float) -> None:
        self.expired, self._socks, self._lock = False, [], threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def watch(self, sock) -> None:
        with self._lock:
            self._socks.append(sock)
            if self.expired:
                self._shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for s in self._socks:
                self._shut(s)

    @staticmethod
    def _shut(sock) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed
            pass

    def __enter__(self) -> "_Deadline":
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()


class _Watched:
    """An HTTP(S) handler whose connections its `_Deadline` can shut down."""

    deadline: _Deadline

    def do_open(self, http_class, req, **kw):
        deadline = self.deadline

        class Conn(http_class):
            def connect(self) -> None:
                super().connect()
                deadline.watch(self.sock)

        return super().do_open(Conn, req, **kw)


class _HTTP(_Watched, urllib.request.HTTPHandler):
    pass


class _HTTPS(_Watched, urllib.request.HTTPSHandler):
    pass


def fetch_image_url(url: str, hosts: Sequence[str], max_bytes: int, timeout: float = FETCH_TIMEOUT) -> bytes:
    """The bytes at `url`, fetched only from `hosts` (none: refused, the default), with
    no proxy, redirects only to allowed hosts, `timeout` seconds for the whole fetch
    (headers and body, however slowly they come), and at most `max_bytes` read."""
    if not hosts:
        raise Refused(403, "image_url: this service fetches no URLs (serve --allow-image-url HOST enables it)")
    if not host_allowed(url, hosts):
        raise Refused(403, "image_url: not an http(s) URL on a host this service fetches from")
    deadline = _Deadline(timeout)
    handlers = [urllib.request.ProxyHandler({}), _AllowedRedirects(hosts), _HTTP(), _HTTPS()]
    for h in handlers[2:]:
        h.deadline = deadline
    opener = urllib.request.build_opener(*handlers)
    req = urllib.request.Request(url, headers={"User-Agent": "phoclip-serve"})
    try:
        with deadline, opener.open(req, timeout=timeout) as r:
            n = r.headers.get("Content-Length")
            if n is not None and n.isdigit() and int(n) > max_bytes:
                raise Refused(413, f"image_url: over {max_bytes} bytes")
            data = r.read(max_bytes + 1)
    except Refused:
        raise
    except (OSError, ValueError, http.client.HTTPException) as e:
        # refused, unreachable, timed out, a malformed URL (http.client's InvalidURL), a reply that is not HTTP
        if deadline.expired:  # the shut connection's error says nothing useful
            raise Refused(422, f"image_url: not fetched within {timeout:g} s") from None
        if isinstance(e, urllib.error.HTTPError):
            raise Refused(422, f"image_url: the server answered {e.code}") from None
        reason = getattr(e, "reason", None) or type(e).__name__
        raise Refused(422, f"image_url: not fetched ({str(reason)[:100]})") from None
    if deadline.expired:  # a read cut short at the deadline returns what had come
        raise Refused(422, f"image_url: not fetched within {timeout:g} s")
    if len(data) > max_bytes:
        raise Refused(413, f"image_url: over {max_bytes} bytes")
    return data

