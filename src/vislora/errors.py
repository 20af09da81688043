"""The one hierarchy of errors and warnings vislora raises on user input.

Every error is a `VisloraError`; each subclass also derives from the built-in exception a caller would expect of
that failure (a bad value is a ValueError, a bad file an OSError), so `except ValueError` keeps working. The
server's HTTP errors (vislora.serve.errors) derive from `VisloraError` too.
"""


class VisloraError(Exception):
    """Base of every error vislora raises about the user's input or state."""


class ConfigError(VisloraError, ValueError):
    """An adapter/train/serve configuration is invalid."""


class TargetError(VisloraError, ValueError):
    """Target patterns resolve to nothing, or to modules vislora cannot adapt."""


class AdapterError(VisloraError, KeyError):
    """An adapter name is unknown, taken, or used in a state that forbids the call."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AdapterFileError(VisloraError, OSError):
    """An adapter file is unsafe, corrupt, or does not fit the model."""


class NonFiniteError(VisloraError, FloatingPointError):
    """Adapter weights would give NaN/Inf (e.g. merging a broken adapter); nothing was changed."""


class ServeError(VisloraError):
    """A request the server refuses; `status` is the HTTP status it answers with, `kind` labels the error
    counter (vislora_errors_total{kind})."""

    status = 400
    kind = "bad_request"


class BadImage(ServeError, ValueError):
    """An upload that is not a decodable image within the server's limits."""

    kind = "bad_image"


class UnknownAdapter(ServeError, KeyError):
    """A request names no loaded adapter or rollout."""

    status = 404
    kind = "unknown_adapter"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Conflict(ServeError):
    """A name already taken, or an adapter still used by a rollout or being loaded or unloaded."""

    status = 409
    kind = "conflict"


class Busy(ServeError):
    """The request queue is full, or the server is shutting down."""

    status = 503
    kind = "busy"


class Unauthorized(ServeError):
    """A missing or wrong bearer token."""

    status = 401
    kind = "unauthorized"


class Forbidden(ServeError):
    """Admin endpoints without a configured admin token, or an adapter path outside the adapter root."""

    status = 403
    kind = "forbidden"


class Timeout(ServeError):
    """A request not computed within limits.request_timeout_s."""

    status = 504
    kind = "timeout"


class TooLarge(ServeError):
    """A request body above limits.max_upload_bytes, or an image above a pixel limit (limits.max_image_pixels,
    load_image's max_pixels)."""

    status = 413
    kind = "too_large"


class UnknownIndex(ServeError, KeyError):
    """The search index a request names is not configured on the server (`indexes` in the serve config)."""

    status = 404
    kind = "unknown_index"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownRequest(ServeError, KeyError):
    """Feedback names a request id the server does not hold: never issued, forgotten, or expired."""

    status = 404
    kind = "unknown_request"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnsupportedMedia(ServeError):
    """A request body that is neither JSON nor a form."""

    status = 415
    kind = "unsupported_media"


class AssetError(VisloraError, FileNotFoundError):
    """A bundled asset is not installed and cannot be made."""


class DataError(VisloraError, ValueError):
    """A dataset cannot be read as asked: missing column, unknown label, corrupt file in strict mode."""


class TrainingError(VisloraError, RuntimeError):
    """Training cannot go on (NaN/Inf loss for too long, a run directory that does not match)."""


class ExportError(VisloraError, ValueError):
    """An export cannot be done as asked: missing base model, bad calibration data, output in the way."""


class RegistryError(VisloraError, ValueError):
    """A registry call cannot be done: unknown name or version, nothing to roll back to, tampered files."""


class IndexFileError(VisloraError, OSError):
    """A search index folder (`vislora index build`) is missing, incomplete or corrupt."""


class SearchError(VisloraError, ValueError):
    """A search the index cannot answer: a text query on an index of classifier features, a query of another width."""


class StaleIndex(SearchError):
    """The adapter (or base model) a query is embedded with is not the one the index was built with."""


class VisloraWarning(UserWarning):
    """Advice about a configuration that works but is likely a mistake."""
