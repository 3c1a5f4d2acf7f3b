"""ASGI guards around the app: request bodies counted as they stream, the security
headers every response carries, and CORS for the routes other origins call."""
from __future__ import annotations

import json
from typing import Mapping, Optional, Sequence

from fastapi import HTTPException
from starlette.middleware.cors import CORSMiddleware


class _Refused(HTTPException):
    """A request body refused while it streams: answered, and the connection closed unread."""


class _BodyTooLarge(_Refused):
    def __init__(self, cap: int) -> None:
        super().__init__(413, f"request body over {cap} bytes", headers={"Connection": "close"})


class _OverBudget(_Refused):
    def __init__(self) -> None:
        super().__init__(503, BUSY_DETAIL, headers={"Connection": "close", "Retry-After": "1"})


BUSY_DETAIL = "too many uploads at once; retry shortly"


class BodyBudget:
    """Bytes of request bodies held at once, all requests together (the event loop is
    the only caller: no lock)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.held = max_bytes, 0

    def take(self, n: int) -> bool:
        """Hold `n` more bytes; False (nothing held) when that would go over the budget."""
        if self.held + n > self.max_bytes:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held -= n


async def send_error(send, status: int, detail: str, close: bool = False, retry_after: Optional[int] = None) -> None:
    """A JSON {"detail"} answer sent straight through ASGI (no app behind it)."""
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Counts a request body as it arrives (Content-Length or chunked) and answers 413,
    Connection: close, as soon as it is over `max_bytes` (`per_path` caps named paths
    apart): the rest is never read nor spooled. A Content-Length over the cap is refused
    before the first byte. With a `budget`, the bodies held at once are capped too: a
    Content-Length is held from the head (refused at once, 503 + Retry-After, when it does
    not fit), a chunked body as it arrives; released when the request ends."""

    def __init__(self, app, max_bytes: int, per_path: Optional[Mapping[str, int]] = None,
                 budget: Optional[BodyBudget] = None) -> None:
        self.app, self.default, self.per_path, self.budget = app, max_bytes, dict(per_path or {}), budget

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cap = self.per_path.get(scope["path"], self.default)
        n = dict(scope["headers"]).get(b"content-length")
        if n is not None and (not n.isdigit() or int(n) > cap):
            return await send_error(send, 413, f"request body over {cap} bytes", close=True)
        budget = self.budget or BodyBudget(1 << 62)
        held = int(n) if n is not None else 0
        if not budget.take(held):
            return await send_error(send, 503, BUSY_DETAIL, close=True, retry_after=1)
        seen = 0
        started = False

        async def counted() -> dict:
            nonlocal seen, held
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap:
                    raise _BodyTooLarge(cap)  # FastAPI passes HTTPExceptions on as they are
                if seen > held:  # a chunked body (a Content-Length was held from the head)
                    if not budget.take(seen - held):
                        raise _OverBudget()
                    held = seen
            return message

        async def sending(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except _Refused as e:
            if started:
                raise
            await send_error(send, e.status_code, e.detail, close=True, retry_after=1 if e.status_code == 503 else None)
        finally:
            budget.give(held)


class SecurityHeaders:
    """nosniff and no-referrer on every response."""

    HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                message = dict(message, headers=[*message.get("headers", []),
                                                 *(h for h in self.HEADERS if h[0] not in have)])
            await send(message)

        await self.app(scope, receive, sending)


class RouteCors:
    """CORS (any origin, no credentials, preflight answered) for `paths` only: pages on
    other origins call clip-retrieval's API; the rest of the service is same-origin."""

    def __init__(self, app, paths: Sequence[str]) -> None:
        self.app, self.paths = app, frozenset(paths)
        self.cors = CORSMiddleware(app, allow_origins=["*"], allow_methods=["GET", "POST"], allow_headers=["*"],
                                   allow_credentials=False, max_age=600)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] in self.paths:
            return await self.cors(scope, receive, send)
        await self.app(scope, receive, send)
