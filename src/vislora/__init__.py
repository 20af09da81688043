"""vislora: low-rank adapters for vision transformers and vision-language models."""

from vislora.arithmetic import CombineReport, combine
from vislora.config import PRESETS, AdapterConfig
from vislora.data.images import load_image
from vislora.diagnostics import diagnose
from vislora.errors import (
    AdapterError,
    AdapterFileError,
    AssetError,
    ConfigError,
    DataError,
    ExportError,
    IndexFileError,
    NonFiniteError,
    RegistryError,
    SearchError,
    StaleIndex,
    TargetError,
    TrainingError,
    VisloraError,
    VisloraWarning,
)
from vislora.formats import check_adapter, load_adapter, load_adapter_weights, save_adapter
from vislora.model import AdaptedModel, AdapterWeights, inject
from vislora.parameters import ParameterReport, parameter_report
from vislora.targets import ROLES, Target, TargetPlan, resolve_targets
from vislora.version import __version__

__all__ = [
    "PRESETS",
    "ROLES",
    "AdaptedModel",
    "AdapterConfig",
    "AdapterError",
    "AdapterFileError",
    "AdapterWeights",
    "AssetError",
    "CombineReport",
    "ConfigError",
    "DataError",
    "ExportError",
    "IndexFileError",
    "NonFiniteError",
    "ParameterReport",
    "RegistryError",
    "SearchError",
    "StaleIndex",
    "Target",
    "TargetError",
    "TargetPlan",
    "TrainingError",
    "VisloraError",
    "VisloraWarning",
    "__version__",
    "check_adapter",
    "combine",
    "diagnose",
    "inject",
    "load_adapter",
    "load_adapter_weights",
    "load_image",
    "parameter_report",
    "resolve_targets",
    "save_adapter",
]
