"""Errors the server answers with: each carries its HTTP status and a short kind for the error metric."""

from __future__ import annotations

from vislora.errors import VisloraError


class ServeError(VisloraError):
    """A request the server refuses; `status` is the HTTP status, `kind` labels the error counter."""

    status = 400
    kind = "bad_request"


class BadImage(ServeError, ValueError):
    kind = "bad_image"


class UnknownAdapter(ServeError, KeyError):
    status = 404
    kind = "unknown_adapter"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Conflict(ServeError):
    status = 409
    kind = "conflict"


class Busy(ServeError):
    status = 503
    kind = "busy"


class Unauthorized(ServeError):
    status = 401
    kind = "unauthorized"


class Forbidden(ServeError):
    status = 403
    kind = "forbidden"


class Timeout(ServeError):
    status = 504
    kind = "timeout"


class TooLarge(ServeError):
    status = 413
    kind = "too_large"


class UnsupportedMedia(ServeError):
    status = 415
    kind = "unsupported_media"
