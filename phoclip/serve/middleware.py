"""ASGI guards around the app: request bodies counted as they stream, the security
headers every response carries, and CORS for the routes other origins call."""
from __future__ import annotations

import json
from typing import Mapping, Optional, Sequence

from fastapi import HTTPException
from starlette.middleware.cors import CORSMiddleware


class _BodyTooLarge(HTTPException):
    def __init__(self, cap: int) -> None:
        super().__init__(413, f"request body over {cap} bytes", headers={"Connection": "close"})


async def send_error(send, status: int, detail: str, close: bool = False) -> None:
    """A JSON {"detail"} answer sent straight through ASGI (no app behind it)."""
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Counts a request body as it arrives (Content-Length or chunked) and answers 413,
    Connection: close, as soon as it is over `max_bytes` (`per_path` caps named paths
    apart): the rest is never read nor spooled. A Content-Length over the cap is refused
    before the first byte."""

    def __init__(self, app, max_bytes: int, per_path: Optional[Mapping[str, int]] = None) -> None:
        self.app, self.default, self.per_path = app, max_bytes, dict(per_path or {})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cap = self.per_path.get(scope["path"], self.default)
        n = dict(scope["headers"]).get(b"content-length")
        if n is not None and (not n.isdigit() or int(n) > cap):
            return await send_error(send, 413, f"request body over {cap} bytes", close=True)
        seen = 0
        started = False

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap:
                    raise _BodyTooLarge(cap)  # FastAPI passes HTTPExceptions on as they are
            return message

        async def sending(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except _BodyTooLarge as e:
            if started:
                raise
            await send_error(send, 413, e.detail, close=True)


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
