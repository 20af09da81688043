"""Request body size limit as ASGI middleware: 413 before a byte is read when Content-Length is too big, and
during reading when a body without one (chunked) grows past the limit."""

from __future__ import annotations

from collections.abc import Callable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vislora.errors import TooLarge


class BodyLimit:
    """Refuse request bodies above `max_bytes`; `on_reject` is called for each refusal it answers itself."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_reject: Callable[[], None] = lambda: None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            self.on_reject()
            error = self.error(int(declared))
            await JSONResponse({"detail": str(error), "kind": error.kind}, status_code=error.status)(scope, receive,
                                                                                                  send)
            return
        received = 0

        async def limited() -> Message:  # the app's exception handler answers the TooLarge raised here
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self.error(received)
            return message

        await self.app(scope, limited, send)

    def error(self, size: int) -> TooLarge:
        return TooLarge(f"the request body is {size:,} bytes or more, above the limit of {self.max_bytes:,} bytes "
                        "(limits.max_upload_bytes); send a smaller image")
