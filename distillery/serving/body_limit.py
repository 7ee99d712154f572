"""Bounded bodies: a request body over the limit is answered 413 before anything parses it (TGI refuses payloads
over 2 MB the same way). A declared Content-Length is judged before a byte is read; a chunked body is read up to the
limit and no further. The answer comes in the shape of the API the path belongs to."""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from distillery.serving.errors import ErrorShapes, Failure, native_shape


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, shapes: ErrorShapes):
        self.app, self.max_bytes, self.shapes = app, max_bytes, shapes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:  # the whole body, up to the limit (JSON bodies here are small), then replayed to the app
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([], message, receive), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            more = message.get("more_body", False)
        await self.app(scope, _replay(chunks, None, receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope)
        failure = Failure(413, f"the request body is larger than this server takes (allowed: at most "
                               f"{self.max_bytes} bytes: DISTILLERY_MAX_BODY_BYTES)")
        await (self.shapes.of(request) or native_shape)(failure)(scope, receive, send)


def _replay(chunks: list[bytes], first: Message | None, receive: Receive) -> Receive:
    """A receive that gives the body read already (or the message that ended it), then the client's own
    messages (a disconnect, for routes that watch for one)."""
    pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}] if first is None else [first]

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed
