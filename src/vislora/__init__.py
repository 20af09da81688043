"""vislora: low-rank adapters for vision transformers and vision-language models."""

__version__ = "0.1.0"

from vislora.config import PRESETS, AdapterConfig
from vislora.diagnostics import diagnose
from vislora.errors import (
    AdapterError,
    AdapterFileError,
    AssetError,
    ConfigError,
    DataError,
    ExportError,
    RegistryError,
    TargetError,
    TrainingError,
    VisloraError,
    VisloraWarning,
)
from vislora.model import AdaptedModel, inject, load_adapter
from vislora.parameters import ParameterReport, parameter_report
from vislora.targets import ROLES, Target, TargetPlan, resolve_targets


def save_adapter(model: AdaptedModel, path: str, name: str = "default") -> object:
    """Write adapter `name` of `model` to directory `path` (same as `model.save_adapter`)."""
    return model.save_adapter(path, name)


__all__ = [
    "PRESETS",
    "ROLES",
    "AdaptedModel",
    "AdapterConfig",
    "AdapterError",
    "AdapterFileError",
    "AssetError",
    "ConfigError",
    "DataError",
    "ExportError",
    "ParameterReport",
    "RegistryError",
    "Target",
    "TargetError",
    "TargetPlan",
    "TrainingError",
    "VisloraError",
    "VisloraWarning",
    "__version__",
    "diagnose",
    "inject",
    "load_adapter",
    "parameter_report",
    "resolve_targets",
    "save_adapter",
]
