"""Putting adapter layers into a model's module tree and taking them out again.

`ModuleTree` owns the wrappers of one base model by logical path (the path as if no wrapper were there): adapter
layers (`LoraLinear`, `LoraMultiheadAttention`, `LoraParameter` for raw weights) and `ModulesToSave`, plus the
attributes changed on base modules, restored on unwrap.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vislora.adapters.layer import LoraLayer, LoraLinear
from vislora.adapters.mha import LoraMultiheadAttention
from vislora.adapters.parameter import LoraParameter
from vislora.adapters.saved import ModulesToSave
from vislora.targets import Target, block_prefix, logical_modules


class ModuleTree:
    """Wrap, find and unwrap modules of `base_model` by logical path."""

    def __init__(self, base_model: nn.Module) -> None:
        self.base_model = base_model
        self.layers: dict[str, LoraLayer] = {}  # target path -> adapter layer (an MHA's in_proj: the MHA's path)
        self.saved: dict[str, ModulesToSave] = {}  # module path -> wrapper
        self._patched: list[tuple[nn.Module, str, Any]] = []  # (module, attribute, original value)

    def layer_for(self, target: Target) -> LoraLayer:
        """The adapter layer of `target`, wrapping its module (or parametrizing its raw weight) on first use."""
        path = target.module_path
        if path in self.layers:
            return self.layers[path]
        parent, attribute, module = self._locate(path)
        if target.kind == "parameter":
            layer: LoraLayer = LoraParameter.attach(parent, attribute)
        elif isinstance(module, nn.MultiheadAttention):
            layer = LoraMultiheadAttention(module)
            setattr(parent, attribute, layer)
        else:
            if isinstance(parent, nn.MultiheadAttention):  # its forward reads out_proj.weight directly
                self._wrap_mha(path.rpartition(".")[0])
            layer = LoraLinear(module)
            layer.batch_dim = self._batch_dim(path)
            self._unfuse_qkv_bias(parent, attribute)
            setattr(parent, attribute, layer)
        layer.path = path
        self.layers[path] = layer
        return layer

    def saved_for(self, path: str) -> ModulesToSave:
        """The ModulesToSave at `path`, wrapping the module there on first use."""
        if path in self.saved:
            return self.saved[path]
        parent, attribute, module = self._locate(path)
        saved = ModulesToSave(module)
        saved.batch_dim = self._batch_dim(path)
        setattr(parent, attribute, saved)
        self.saved[path] = saved
        return saved

    def unwrap_empty(self) -> None:
        """Put back the base module of every wrapper that no longer holds an adapter."""
        for path in sorted(self.layers, key=len, reverse=True):  # an MHA's out_proj before the MHA
            if not self.layers[path].adapters and not self._nested_adapters(path):
                self.unwrap(path)
        for path in [p for p, saved in self.saved.items() if not len(saved.copies)]:
            self.unwrap(path)

    def unwrap_all(self) -> None:
        """Put back every base module and patched attribute: the model is as it was before wrapping."""
        for path in sorted(self.layers, key=len, reverse=True):  # inner wrappers (MHA out_proj) first
            self.unwrap(path)
        for path in list(self.saved):
            self.unwrap(path)
        for module, attribute, value in self._patched:
            setattr(module, attribute, value)
        self._patched = []

    def unwrap(self, path: str) -> None:
        """Put back the base module at `path` (a PiSSA residual goes back into W; a saved module keeps its active
        copy)."""
        if path in self.saved:
            parent, attribute, _ = self._locate(path)
            setattr(parent, attribute, self.saved.pop(path).current())
            return
        layer = self.layers.pop(path)
        layer.release()
        if isinstance(layer, LoraParameter):
            layer.detach_from(self._locate(path)[0])
            return
        parent, attribute, _ = self._locate(path)
        setattr(parent, attribute, layer.base_layer)

    # ------------------------------------------------------------ internals
    def _wrap_mha(self, path: str) -> None:
        if path not in self.layers:
            parent, attribute, module = self._locate(path)
            layer = LoraMultiheadAttention(module)
            layer.path = path
            setattr(parent, attribute, layer)
            self.layers[path] = layer

    def _unfuse_qkv_bias(self, parent: nn.Module, attribute: str) -> None:
        """timm BEiT/EVA fold q/v biases into F.linear(x, qkv.weight, bias), bypassing the qkv module.

        Their `qkv_bias_separate` switch makes them call the module and add the bias after: same result.
        """
        if attribute == "qkv" and getattr(parent, "q_bias", None) is not None and hasattr(
            parent, "qkv_bias_separate"
        ) and not parent.qkv_bias_separate:
            self._patched.append((parent, "qkv_bias_separate", False))
            parent.qkv_bias_separate = True

    def _batch_dim(self, path: str) -> int:
        """Where the module at `path` sees the batch: 1 inside a block whose attention is sequence-first
        (nn.MultiheadAttention with batch_first=False, e.g. older open_clip), else 0."""
        modules = logical_modules(self.base_model)
        if isinstance(modules.get(path.rpartition(".")[0]), nn.MultiheadAttention):
            return 0  # its out_proj: the attention wrapper calls it batch first
        block = block_prefix(path)
        if block is None:
            return 0
        attentions = [m for p, m in modules.items()
                      if p.startswith(block + ".") and isinstance(m, nn.MultiheadAttention)]
        return 1 if attentions and not all(m.batch_first for m in attentions) else 0

    def _locate(self, path: str) -> tuple[nn.Module, str, nn.Module]:
        """(logical parent, attribute name, current child) of a logical module path."""
        parent_path, _, attribute = path.rpartition(".")
        parent = logical_modules(self.base_model)[parent_path]
        return parent, attribute, getattr(parent, attribute)

    def _nested_adapters(self, path: str) -> bool:
        return any(p.startswith(path + ".") and layer.adapters for p, layer in self.layers.items())
