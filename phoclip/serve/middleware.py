"""ASGI guards around the app: request bodies counted as they stream, and the security
headers every response carries."""
from __future__ import annotations

import json

from fastapi import HTTPException


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
    Connection: close, as soon as it is over `max_bytes`: the rest is never read nor
    spooled. A Content-Length over the cap is refused before the first byte."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        n = dict(scope["headers"]).get(b"content-length")
        if n is not None and (not n.isdigit() or int(n) > self.max_bytes):
            return await send_error(send, 413, f"request body over {self.max_bytes} bytes", close=True)
        seen = 0
        started = False

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)  # FastAPI passes HTTPExceptions on as they are
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
