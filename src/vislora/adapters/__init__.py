"""The adapter core: one class per method (LoRA, DoRA, AdaLoRA, MoLoRA; PiSSA as LoRA started from W's principal
directions), the layers that hold them over a base weight, per-sample routing, and the module tree."""

from vislora.adapters.adalora import AdaLoRA
from vislora.adapters.dora import DoRA
from vislora.adapters.layer import LoraLayer, LoraLinear
from vislora.adapters.lora import LoRA
from vislora.adapters.methods import METHODS, method_class
from vislora.adapters.mha import LoraMultiheadAttention
from vislora.adapters.molora import MoLoRA
from vislora.adapters.parameter import LoraParameter
from vislora.adapters.pissa import PiSSA
from vislora.adapters.saved import ModulesToSave

__all__ = ["METHODS", "AdaLoRA", "DoRA", "LoRA", "LoraLayer", "LoraLinear", "LoraMultiheadAttention", "LoraParameter",
           "MoLoRA", "ModulesToSave", "PiSSA", "method_class"]
