"""The HTTP server: uvicorn's HTTP/1.1 protocol with deadlines for receiving a request
and draining a response, and a cap on open connections, so that idle, slow and greedy
clients cannot lock others out."""
from __future__ import annotations

import logging
import time
from typing import Any, Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from phoclip.serve.settings import Settings

logger = logging.getLogger(__name__)
_DEFAULTS = Settings()


class _Tally:
    """Counts an event and logs it at most once a minute (a flood of idle connections
    must not flood the log)."""

    def __init__(self, what: str) -> None:
        self.what, self.n, self.last = what, 0, 0.0

    def add(self, client) -> None:
        self.n += 1
        now = time.monotonic()
        if now - self.last >= 60:
            logger.warning("%s: %d since the last report (latest from %s)", self.what, self.n,
                           "%s:%s" % client if client else "?")
            self.n, self.last = 0, now


def _shut(transport) -> None:
    """Close `transport`; at once when output is still waiting (a client that does not read
    would keep a closing connection, and its descriptor, for ever)."""
    if transport.get_write_buffer_size():
        transport.abort()
    else:
        transport.close()


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with deadlines and a cap on open connections, so that
    idle, slow and greedy clients cannot lock others out (uvicorn 0.54 has none: its
    keep-alive timer starts only after a first response and restarts on every byte).

    - A connection must send a whole request head within `header_timeout` s of opening
      or of its last response (else closed, with a 408 when a head had begun).
    - A body must arrive within `body_timeout` s of its head, and at `body_min_rate`
      bytes/s or more over every `header_timeout` s window (while the app reads it):
      a few bytes and then nothing is cut after one window, not after `body_timeout`.
    - A response the client does not drain (the send buffer stays full, as with a client
      that pipelines requests and never reads the answers) is cut after `write_timeout` s;
      its pipelined requests wait behind it and do not restart the deadline.
    - Past `max_connections`, the connection that has made the least progress (bytes a
      second in its current wait: a head, a body, a client reading a response; the oldest
      first among equals) is closed to make room. A request being worked on is never
      chosen; the new connection only when every other one is.

    Subclass per server (`make_server`) to set the limits."""

    header_timeout: float = _DEFAULTS.header_timeout
    body_timeout: float = _DEFAULTS.body_timeout
    body_min_rate: float = _DEFAULTS.body_min_rate
    write_timeout: float = _DEFAULTS.write_timeout
    max_connections: int = _DEFAULTS.max_connections
    expired = _Tally("closed connections that sent no complete request in time")
    too_slow = _Tally("closed connections whose request body arrived slower than the minimum rate")
    unread = _Tally("closed connections that did not read their responses in time")
    evicted = _Tally("over the connection cap: closed the connections that made the least progress")

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._timer: Optional[Any] = None  # the deadline of the current phase
        self._rate_timer: Optional[Any] = None  # the body's next rate check
        self._write_timer: Optional[Any] = None  # set while the client does not drain a response
        self._phase: Any = None
        self._since = 0.0  # when the current phase began (loop time)
        self._got = 0  # bytes received in the current phase
        self._window = (0.0, 0)  # (loop time, bytes) at the start of the body's rate window
        self._unread_since: Optional[float] = None
        super().connection_made(transport)
        self._follow()
        if len(self.connections) > self.max_connections:
            self._make_room()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._disarm()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._got += len(data)
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def pause_writing(self) -> None:
        """The transport's buffer is over its high-water mark: the client is not reading."""
        super().pause_writing()
        if self._write_timer is None and not self.transport.is_closing():
            self._unread_since = self.loop.time()
            self._write_timer = self.loop.call_later(self.write_timeout, self._unread)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._unread_since = None
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _unread(self) -> None:
        self._write_timer = None
        self.unread.add(self.client)
        self.transport.abort()  # close() would wait for the client to read what is buffered

    def _follow(self) -> None:
        """(Re)arm the deadline when the client's side of the exchange changes state:
        IDLE = waiting for a request head, SEND_BODY = receiving its body, else none."""
        phase = self.conn.their_state
        if phase is self._phase:
            return
        now = self.loop.time()
        self._phase, self._since, self._got = phase, now, 0
        self._disarm()
        if self.transport.is_closing():
            return
        if phase is h11.IDLE:
            self._timer = self.loop.call_later(self.header_timeout, self._expire)
        elif phase is h11.SEND_BODY:
            self._timer = self.loop.call_later(self.body_timeout, self._expire)
            self._window = (now, 0)
            self._rate_timer = self.loop.call_later(self.header_timeout, self._check_rate)

    def _disarm(self) -> None:
        for name in ("_timer", "_rate_timer"):
            timer = getattr(self, name)
            if timer is not None:
                timer.cancel()
                setattr(self, name, None)

    def _expire(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        self.expired.add(self.client)
        if self._phase is h11.IDLE and self.conn.trailing_data[0]:  # a head had begun
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"content-length: 30\r\nconnection: close\r\n\r\n"
                                 b'{"detail": "request timeout"}\n')
        self._disarm()
        _shut(self.transport)

    def _check_rate(self) -> None:
        """A body's bytes over the last window: under `body_min_rate` a second, closed. A
        window in which the server itself stopped reading (the app not asking for more)
        does not count."""
        self._rate_timer = None
        if self.transport.is_closing() or self._phase is not h11.SEND_BODY:
            return
        now = self.loop.time()
        start, got = self._window
        if not self.flow.read_paused and self._got - got < self.body_min_rate * (now - start):
            self.too_slow.add(self.client)
            self._disarm()
            _shut(self.transport)
            return
        self._window = (now, self._got)
        self._rate_timer = self.loop.call_later(self.header_timeout, self._check_rate)

    def _progress(self, now: float) -> Optional[tuple[float, float]]:
        """(bytes a second, since when) of a connection waiting on its client, lowest
        first when making room; None for one whose request is being worked on."""
        if self._unread_since is not None:
            return 0.0, self._unread_since
        if self._phase is h11.IDLE or self._phase is h11.SEND_BODY:
            return self._got / max(now - self._since, 1e-3), self._since
        return None

    def _make_room(self) -> None:
        open_ = [c for c in self.connections if not c.transport.is_closing()]
        if len(open_) <= self.max_connections:
            return  # the others over the cap are closing already
        now = self.loop.time()
        waiting = [(p, c) for c in open_ if c is not self and isinstance(c, GuardedH11Protocol)
                   for p in [c._progress(now)] if p is not None]
        # the slowest, oldest waiter; this new connection itself when every other has a request going
        victim = min(waiting, key=lambda pc: pc[0], default=(None, self))[1]
        self.evicted.add(victim.client)
        victim._disarm()
        _shut(victim.transport)


def make_server(app, settings: Settings, log_level: str = "warning"):
    """A uvicorn server for `app` with `GuardedH11Protocol` (deadlines, connection cap) in
    place of uvicorn's own concurrency limit, which counted idle connections and answered
    everyone 503 while they stayed open; on `settings.host`:`settings.port` (0: a free port)."""
    import resource

    import uvicorn

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    cap = settings.max_connections
    if soft != resource.RLIM_INFINITY and cap > soft - 64:
        cap = max(16, soft - 64)  # leave descriptors for files, threads and the listener
        logger.warning("max_connections %d lowered to %d: the process may open %d files (ulimit -n)",
                       settings.max_connections, cap, soft)
    proto = type("GuardedH11Protocol", (GuardedH11Protocol,), {
        "header_timeout": settings.header_timeout, "body_timeout": settings.body_timeout,
        "body_min_rate": settings.body_min_rate, "write_timeout": settings.write_timeout, "max_connections": cap})
    config = uvicorn.Config(app, host=settings.host, port=settings.port, http=proto, ws="none", log_level=log_level,
                            timeout_keep_alive=5, h11_max_incomplete_event_size=64 * 1024,
                            limit_concurrency=None)
    return uvicorn.Server(config)


def raise_open_files_limit() -> None:
    """Up to the hard limit: each connection is a descriptor."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
