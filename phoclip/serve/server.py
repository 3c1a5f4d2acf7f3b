"""The HTTP server: uvicorn's HTTP/1.1 protocol with deadlines for receiving a request
and a cap on open connections, so that idle and slow clients cannot lock others out."""
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


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with deadlines for receiving a request and a cap on
    open connections, so that idle and slow clients cannot lock others out (uvicorn
    0.54 has neither: its keep-alive timer starts only after a first response and
    restarts on every byte). A connection must send a whole request head within
    `header_timeout` s of opening or of its last response, and the body within
    `body_timeout` s of the head; else it is closed (with a 408 when a head had begun).
    Past `max_connections`, the connection waiting longest for a request head is closed
    to make room; one with a request in progress never is. Subclass per server
    (`make_server`) to set the three."""

    header_timeout: float = _DEFAULTS.header_timeout
    body_timeout: float = _DEFAULTS.body_timeout
    max_connections: int = _DEFAULTS.max_connections
    expired = _Tally("closed connections that sent no complete request in time")
    evicted = _Tally("over the connection cap: closed the connections waiting longest for a request")

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._timer: Optional[Any] = None
        self._phase: Any = None
        self._since = 0.0
        super().connection_made(transport)
        self._follow()
        if len(self.connections) > self.max_connections:
            self._make_room()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def _follow(self) -> None:
        """(Re)arm the deadline when the client's side of the exchange changes state:
        IDLE = waiting for a request head, SEND_BODY = receiving its body, else none."""
        phase = self.conn.their_state
        if phase is self._phase:
            return
        self._phase, self._since = phase, self.loop.time()
        self._disarm()
        timeout = (self.header_timeout if phase is h11.IDLE else
                   self.body_timeout if phase is h11.SEND_BODY else None)
        if timeout is not None and not self.transport.is_closing():
            self._timer = self.loop.call_later(timeout, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        self.expired.add(self.client)
        if self._phase is h11.IDLE and self.conn.trailing_data[0]:  # a head had begun
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"content-length: 30\r\nconnection: close\r\n\r\n"
                                 b'{"detail": "request timeout"}\n')
        self.transport.close()

    def _make_room(self) -> None:
        open_ = [c for c in self.connections if not c.transport.is_closing()]
        if len(open_) <= self.max_connections:
            return  # the others over the cap are closing already
        waiting = [c for c in open_ if isinstance(c, GuardedH11Protocol) and c._phase is h11.IDLE]
        # the oldest waiter; this new connection itself when every other has a request going
        victim = min(waiting, key=lambda c: c._since, default=self)
        self.evicted.add(victim.client)
        victim.transport.close()


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
        "header_timeout": settings.header_timeout, "body_timeout": settings.body_timeout, "max_connections": cap})
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
