"""The one hierarchy of errors and warnings vislora raises on user input."""


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


class VisloraWarning(UserWarning):
    """Advice about a configuration that works but is likely a mistake."""
