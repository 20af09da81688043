"""AdaptedModel: a base model with named adapters that can be added, activated, merged and unloaded."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vislora.adapters import variants
from vislora.adapters.adalora import RankAllocator, kept_ranks
from vislora.adapters.linear import LoraLayer, PairSpec
from vislora.adapters.routing import Route
from vislora.adapters.saved import ModulesToSave
from vislora.adapters.tree import ModuleTree
from vislora.config import AdapterConfig
from vislora.errors import AdapterError, TargetError
from vislora.targets import QKV, TargetPlan, resolve_targets

if TYPE_CHECKING:
    from vislora.arithmetic import CombineReport
    from vislora.formats import CheckedAdapter

logger = logging.getLogger(__name__)

_ADAPTER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_\-]{0,63}")


class AdaptedModel(ModuleTree, nn.Module):
    """A base model carrying named adapters. Build it with `vislora.inject`.

    Calls are forwarded to the base model; attributes it lacks are looked up on the base model, so
    `model.forward_features(x)` or `model.config` keep working. `model(x, adapters=[...])` computes each sample
    with its own adapter in one batched pass.
    """

    def __init__(self, base_model: nn.Module) -> None:
        super().__init__()
        if isinstance(base_model, AdaptedModel):
            raise AdapterError("this model already carries adapters; call .add_adapter() on it instead")
        self.base_model = base_model
        self.configs: dict[str, AdapterConfig] = {}
        self.plans: dict[str, TargetPlan] = {}
        self._layers: dict[str, LoraLayer] = {}  # logical module path -> wrapper
        self._saved: dict[str, ModulesToSave] = {}
        self._allocators: dict[str, RankAllocator] = {}  # AdaLoRA adapters' rank budgets
        self._active: tuple[str, ...] = ()
        self._merged = False
        self._patched: list[tuple[nn.Module, str, Any]] = []  # (module, attribute, original value)
        self._requires_grad = {name: p.requires_grad for name, p in base_model.named_parameters()}
        base_model.requires_grad_(False)

    def forward(self, *args: Any, adapters: Sequence[str | None] | None = None, **kwargs: Any) -> Any:
        """The base model's forward with the active adapters; or, given `adapters` (one name or None per sample),
        every sample with its own adapter (None = the base model) in one batched pass, whatever is active.
        """
        if adapters is None:
            return self.base_model(*args, **kwargs)
        route = Route.for_call(self, adapters, args, kwargs)
        self._set_route(route)
        try:
            return self.base_model(*args, **kwargs)
        finally:
            self._set_route(None)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ---------------------------------------------------------------- adapters
    @property
    def adapters(self) -> tuple[str, ...]:
        """Names of all loaded adapters, in the order they were added."""
        return tuple(self.configs)

    @property
    def active_adapters(self) -> tuple[str, ...]:
        return self._active

    @property
    def merged(self) -> bool:
        return self._merged

    def layers(self) -> dict[str, LoraLayer]:
        """Adapter layers by module path (a MultiheadAttention's in_proj layer under the attention's path)."""
        return dict(self._layers)

    def add_adapter(self, name: str, config: AdapterConfig, activate: bool | None = None) -> TargetPlan:
        """Add a new adapter; it becomes active if it is the first one (or if `activate`)."""
        self._check_new_name(name)
        plan = resolve_targets(self.base_model, config)
        self._install(name, config, plan)
        if activate or (activate is None and not self._active):
            self.set_active(name)
        else:
            self._apply_active()
        logger.info("adapter %r added:\n%s", name, plan)
        return plan

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter; layers left without adapters go back to their base modules."""
        self._check_known([name])
        if self._merged:
            raise AdapterError(f"adapters {list(self._active)} are merged into the weights; call unmerge() before "
                               f"deleting {name!r}")
        self._remove(name)
        self._apply_active()

    def set_active(self, names: str | Sequence[str]) -> None:
        """Choose the adapters used in forward; several active adapters are summed."""
        names = (names,) if isinstance(names, str) else tuple(names)
        self._check_known(names)
        if self._merged:
            raise AdapterError(f"adapters {self._active} are merged into the weights; call unmerge() before "
                               "changing the active set")
        if len(set(names)) != len(names):
            raise AdapterError(f"adapter names repeat in {list(names)}")
        for path, saved in self._saved.items():
            owners = [n for n in names if n in saved.copies]
            if len(owners) > 1:
                raise AdapterError(f"adapters {owners} each carry their own copy of {path!r} "
                                   "(modules_to_save); activate only one of them")
        self._active = names
        self._apply_active()

    def set_trainable(self, names: str | Sequence[str]) -> None:
        """Make exactly these adapters trainable, e.g. every task of a multi-task run that routes samples with
        `model(x, adapters=[...])`. set_active() resets this to the active set."""
        names = (names,) if isinstance(names, str) else tuple(names)
        self._check_known(names)
        self._make_trainable(names)

    def combine(
        self, weights: Mapping[str, float], name: str, how: str = "exact", rank: int | None = None
    ) -> CombineReport:
        """Add adapter `name` = sum of weights[a] * (adapter a's change of W); negative weights subtract.

        how="exact" concatenates the ranks (equal to the weighted sum of deltas up to float rounding);
        how="svd" truncates the summed delta of each layer to `rank` (default: the largest contributing rank)
        and reports the relative approximation error per layer. The new adapter is not activated.
        """
        from vislora.arithmetic import combine

        return combine(self, weights, name, how, rank)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model without any adapter inside this block (merged weights are taken out)."""
        was_merged = self._merged
        if was_merged:
            self.unmerge()
        self._route(())
        try:
            yield
        finally:
            self._route(self._active)
            if was_merged:
                self.merge()

    # ---------------------------------------------------------------- training hooks (the trainer calls these)
    def auxiliary_loss(self) -> torch.Tensor | None:
        """Sum of the regularisers the adapters in training ask for (AdaLoRA orthogonality, MoLoRA load balance)."""
        return variants.auxiliary_loss(self)

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Let adapters act on a finished optimizer step while its gradients exist (AdaLoRA's rank allocator)."""
        variants.after_optimizer_step(self, step, total_steps)

    def adapter_metrics(self) -> dict[str, float]:
        """Figures adapters report while training: AdaLoRA rank budgets, MoLoRA expert shares."""
        return variants.metrics(self)

    def adapter_ranks(self, name: str) -> dict[str, int]:
        """The rank adapter `name` has in each layer now (AdaLoRA: triplets kept; others: as configured)."""
        self._check_known([name])
        if name in self._allocators:
            return kept_ranks(variants.layers_of(self, name), name)
        return {t.path: t.rank * max(1, len(t.slices)) for t in self.plans[name].targets}

    def grow_rank(self, name: str, rank: int) -> list[tuple[nn.Parameter, nn.Parameter, tuple[int, int]]]:
        """Raise adapter `name` to `rank` without changing the model's output (progressive rank growth).

        New rows of A start like a fresh adapter's, new columns of B at zero, each layer's scale is kept (alpha grows
        with the rank). Returns (old parameter, new parameter, (old rank, grown dim)) so a trainer can move the
        optimizer state of the old entries over (vislora.train.growth.replace_grown).
        """
        self._check_known([name])
        return variants.grow_rank(self, name, rank)

    # ---------------------------------------------------------------- merge
    def merge(self, safe: bool = True) -> None:
        """Add the active adapters into the base weights: W += sum(scale * B @ A).

        Afterwards forward costs what the base model costs. With `safe`, every merged weight is checked
        for NaN/Inf first and nothing is written if one would be.
        """
        if self._merged:
            raise AdapterError(f"adapters {self._active} are already merged")
        if not self._active:
            raise AdapterError(f"no active adapter to merge; call set_active() first (loaded: {self.adapters})")
        if safe:
            for path, layer in self._layers.items():
                if not torch.isfinite(layer.merged_weight(layer.active)).all():
                    raise FloatingPointError(f"merging {layer.active} into {path!r} gives NaN/Inf; "
                                             "the adapter weights are broken, nothing was merged")
        for layer in self._layers.values():
            layer.merge(layer.active)
        self._merged = True

    def unmerge(self) -> None:
        """Subtract merged adapters from the base weights (exact up to float rounding)."""
        if not self._merged:
            raise AdapterError("nothing is merged")
        for layer in self._layers.values():
            layer.unmerge()
        self._merged = False
        self._apply_active()

    def unload(self, merge: bool = True) -> nn.Module:
        """Return the plain base model with no vislora module left, the active adapters merged in if `merge`.

        With merge=False the base model comes back as it was before injection. This AdaptedModel is
        emptied; use the returned module.
        """
        if merge and not self._merged and self._active:
            self.merge()
        elif not merge and self._merged:
            self.unmerge()
        if not merge:
            for saved in self._saved.values():
                saved.active = None
        for path in sorted(self._layers, key=len, reverse=True):  # inner wrappers (MHA out_proj) first
            self._unwrap(path)
        for path in list(self._saved):
            self._unwrap(path)
        for module, attribute, value in self._patched:
            setattr(module, attribute, value)
        for param_name, param in self.base_model.named_parameters():
            param.requires_grad_(self._requires_grad.get(param_name, True))
        base, self.configs, self.plans = self.base_model, {}, {}
        self._active, self._merged, self._patched = (), False, []
        return base

    # ---------------------------------------------------------------- files
    def save_adapter(self, path: str | Path, name: str = "default") -> Path:
        """Write adapter `name` as a PEFT-compatible directory (safetensors only, atomic writes)."""
        from vislora.formats_save import save_adapter

        self._check_known([name])
        return save_adapter(self, Path(path), name)

    def load_adapter(self, path: str | Path | CheckedAdapter, name: str = "default", activate: bool | None = None
                     ) -> TargetPlan:
        """Load an adapter directory saved by vislora or PEFT (or one `check_adapter` read); the model is untouched
        if it does not fit."""
        from vislora.formats import CheckedAdapter, load_adapter_into

        return load_adapter_into(self, path if isinstance(path, CheckedAdapter) else Path(path), name, activate)

    def check_adapter(self, path: str | Path) -> CheckedAdapter:
        """Read an adapter directory and check it against this model without changing anything; `load_adapter`
        takes the result and only installs it."""
        from vislora.formats import check_adapter

        return check_adapter(self, Path(path))

    def load_adapter_weights(self, path: str | Path, name: str = "default") -> None:
        """Copy a saved adapter (e.g. a checkpoint of this run) into adapter `name` in place: the parameter objects
        stay, so optimizers and DDP wrappers holding them keep working. The file must come from the same config."""
        from vislora.formats import load_weights_into

        load_weights_into(self, Path(path), name)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s tensors keyed by `<module path>.lora_A|lora_B|lora_magnitude` and `<path>.<param>` for
        saved modules."""
        self._check_known([name])
        state = {}
        for path, layer in self._layers.items():
            if name in layer.specs:
                state[f"{path}.lora_A"] = layer.lora_A[name]
                state[f"{path}.lora_B"] = layer.lora_B[name]
                if name in layer.lora_magnitude:
                    state[f"{path}.lora_magnitude"] = layer.lora_magnitude[name]
        for path, saved in self._saved.items():
            if name in saved.copies:
                state.update({f"{path}.{k}": v for k, v in saved.copies[name].state_dict().items()})
        return state

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """The trainable parameters of one adapter (low-rank pairs, DoRA magnitudes, saved-module copies)."""
        self._check_known([name])
        for layer in self._layers.values():
            if name in layer.specs:
                yield layer.lora_A[name]
                yield layer.lora_B[name]
                if name in layer.lora_magnitude:
                    yield layer.lora_magnitude[name]
        for saved in self._saved.values():
            if name in saved.copies:
                yield from saved.copies[name].parameters()

    # ---------------------------------------------------------------- internals
    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
            raise AdapterError(f"invalid adapter name {name!r}: use 1-64 letters, digits, '_' or '-', "
                               "starting with a letter")
        if name in self.configs:
            raise AdapterError(f"an adapter named {name!r} already exists; delete_adapter({name!r}) first or "
                               "pick another name")

    def _check_known(self, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in self.configs]
        if unknown:
            raise AdapterError(f"unknown adapter(s) {unknown}; loaded: {list(self.adapters) or 'none'}")

    def _install(self, name: str, config: AdapterConfig, plan: TargetPlan) -> None:
        """Add adapter `name` to every layer of `plan`; on any failure nothing of it stays behind."""
        self.configs[name], self.plans[name] = config, plan
        try:
            for target in plan.targets:
                layer = self._wrap(target.module_path)
                slices = tuple(QKV.index(s) for s in target.slices)
                layer.add_adapter(name, PairSpec(target.rank, target.scale, config.dropout, slices, config.init,
                                                 config.method, config.molora))
            for path in plan.modules_to_save:
                saved = self._saved.get(path) or self._wrap_saved(path)
                saved.add_adapter(name)
            if config.method == "adalora":
                self._allocators[name] = RankAllocator(variants.layers_of(self, name), name, config.adalora)
        except Exception:
            self._remove(name)
            raise

    def _remove(self, name: str) -> None:
        """Take adapter `name` out of every wrapper; wrappers left empty go back to their base modules."""
        for layer in self._layers.values():
            if name in layer.specs:
                layer.delete_adapter(name)
        for path in sorted(self._layers, key=len, reverse=True):  # an MHA's out_proj before the MHA
            if not self._layers[path].specs and not self._nested_adapters(path):
                self._unwrap(path)
        for path, saved in list(self._saved.items()):
            if name in saved.copies:
                saved.delete_adapter(name)
                if not len(saved.copies):
                    self._unwrap(path)
        del self.configs[name], self.plans[name]
        self._allocators.pop(name, None)
        self._active = tuple(n for n in self._active if n != name)

    def _set_route(self, route: Route | None) -> None:
        for wrapper in (*self._layers.values(), *self._saved.values()):
            wrapper.route = route

    def _route(self, names: tuple[str, ...]) -> None:
        """Tell every wrapper which adapters its forward adds (none of them while merged)."""
        for layer in self._layers.values():
            layer.active = () if self._merged else tuple(n for n in names if n in layer.specs)
        for saved in self._saved.values():
            saved.active = next((n for n in names if n in saved.copies), None)

    def _apply_active(self) -> None:
        """Route the active set and make exactly the active adapters trainable."""
        self._route(self._active)
        self._make_trainable(self._active)

    def _make_trainable(self, names: Sequence[str]) -> None:
        for name in self.adapters:
            for param in self.adapter_parameters(name):
                param.requires_grad_(name in names)


def inject(base_model: nn.Module, config: AdapterConfig, name: str = "default") -> AdaptedModel:
    """Wrap `base_model` (modified in place) and add adapter `name`; base weights are frozen."""
    if isinstance(base_model, AdaptedModel):
        raise AdapterError("this model already carries adapters; call model.add_adapter(name, config) instead")
    model = AdaptedModel(base_model)
    try:
        model.add_adapter(name, config)
    except (TargetError, AdapterError):
        model.unload(merge=False)
        raise
    return model


def load_adapter(
    base_model: nn.Module, path: str | Path, name: str = "default", activate: bool | None = None
) -> AdaptedModel:
    """Load a saved adapter (vislora or PEFT directory) onto `base_model`; returns the AdaptedModel."""
    model = base_model if isinstance(base_model, AdaptedModel) else AdaptedModel(base_model)
    fresh = model is not base_model
    try:
        model.load_adapter(path, name, activate)
    except Exception:
        if fresh:
            model.unload(merge=False)
        raise
    return model
