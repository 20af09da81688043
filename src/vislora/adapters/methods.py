"""The one place that maps a config's method names to adapter classes."""

from __future__ import annotations

from vislora.adapters.adalora import AdaLoRA
from vislora.adapters.dora import DoRA
from vislora.adapters.lora import LoRA
from vislora.adapters.molora import MoLoRA
from vislora.adapters.pissa import PiSSA
from vislora.config import AdapterConfig

METHODS: dict[str, type[LoRA]] = {"lora": LoRA, "dora": DoRA, "adalora": AdaLoRA, "molora": MoLoRA}
INITS: dict[str, type[LoRA]] = {"pissa": PiSSA}  # inits that need a class of their own (they rewrite W)


def method_class(config: AdapterConfig) -> type[LoRA]:
    """The class of the adapters `config` describes (AdapterConfig has checked that method and init go together)."""
    return INITS.get(config.init, METHODS[config.method])
