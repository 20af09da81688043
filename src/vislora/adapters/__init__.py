"""Adapter layers: each holds named adapters over one frozen base layer."""

from vislora.adapters.linear import LoraLayer, LoraLinear, PairSpec
from vislora.adapters.saved import ModulesToSave

__all__ = ["LoraLayer", "LoraLinear", "ModulesToSave", "PairSpec"]
