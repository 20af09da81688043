"""Putting adapter wrappers into a model's module tree and taking them out again.

AdaptedModel mixes this in: `_layers` (logical path -> LoraLayer), `_saved` (path -> ModulesToSave) and `_patched`
(attributes changed on base modules, restored on unload) are its state.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vislora.adapters.linear import LoraLayer, LoraLinear
from vislora.adapters.saved import ModulesToSave
from vislora.targets import block_prefix, logical_modules


class ModuleTree:
    """Wrap, locate and unwrap modules of `self.base_model` by logical path (as if no wrapper were there)."""

    base_model: nn.Module
    _layers: dict[str, LoraLayer]
    _saved: dict[str, ModulesToSave]
    _patched: list[tuple[nn.Module, str, Any]]

    def _wrap(self, path: str) -> LoraLayer:
        if path in self._layers:
            return self._layers[path]
        parent, attribute, module = self._locate(path)
        if isinstance(module, nn.MultiheadAttention):
            from vislora.adapters.mha import LoraMultiheadAttention

            layer: LoraLayer = LoraMultiheadAttention(module)
        else:
            if isinstance(parent, nn.MultiheadAttention):  # its forward reads out_proj.weight directly
                self._wrap(path.rpartition(".")[0])
            layer = LoraLinear(module)
            self._unfuse_qkv_bias(parent, attribute)
        layer.path, layer.batch_dim = path, self._batch_dim(path)
        setattr(parent, attribute, layer)
        self._layers[path] = layer
        return layer

    def _unfuse_qkv_bias(self, parent: nn.Module, attribute: str) -> None:
        """timm BEiT/EVA fold q/v biases into F.linear(x, qkv.weight, bias), bypassing the qkv module.

        Their `qkv_bias_separate` switch makes them call the module and add the bias after: same result.
        """
        if attribute == "qkv" and getattr(parent, "q_bias", None) is not None and hasattr(
            parent, "qkv_bias_separate"
        ) and not parent.qkv_bias_separate:
            self._patched.append((parent, "qkv_bias_separate", False))
            parent.qkv_bias_separate = True

    def _wrap_saved(self, path: str) -> ModulesToSave:
        parent, attribute, module = self._locate(path)
        saved = ModulesToSave(module)
        saved.batch_dim = self._batch_dim(path)
        setattr(parent, attribute, saved)
        self._saved[path] = saved
        return saved

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
        return any(p.startswith(path + ".") and layer.specs for p, layer in self._layers.items())

    def _unwrap(self, path: str) -> None:
        wrapper = self._layers.pop(path, None) or self._saved.pop(path)
        parent, attribute, _ = self._locate(path)
        if isinstance(wrapper, ModulesToSave):
            setattr(parent, attribute, wrapper.current())
            return
        wrapper.release()  # a PiSSA residual goes back into W
        setattr(parent, attribute, wrapper.base_layer)
