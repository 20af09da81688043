"""AdaptedModel: a base model with named adapters that can be added, activated, routed per sample, merged and unloaded.

Files and combinations sit above this module: `vislora.formats` reads and writes adapter directories and
`vislora.arithmetic` combines adapters; both hand this model an `AdapterWeights` to `install`.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vislora.adapters.layer import LoraLayer
from vislora.adapters.lora import Grown, LoRA, TrainingHooks
from vislora.adapters.methods import method_class
from vislora.adapters.routing import Route
from vislora.adapters.tree import ModuleTree
from vislora.config import AdapterConfig
from vislora.errors import AdapterError, ConfigError, NonFiniteError, TargetError
from vislora.targets import TargetPlan, resolve_targets

logger = logging.getLogger(__name__)

_ADAPTER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_\-]{0,63}")


@dataclass
class AdapterWeights:
    """One adapter's tensors, checked against one model and ready to install with no further checks.

    `vislora.formats.check_adapter` reads them from a directory and `vislora.arithmetic.combine` computes them;
    `AdaptedModel.install` only puts them in place, so a server can hold its model lock for the install alone.
    """

    config: AdapterConfig
    plan: TargetPlan
    layers: dict[str, dict[str, torch.Tensor]]  # target path -> tensors in the adapter's export_tensors() form
    saved: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # saved-module path -> its state dict
    source: str = ""  # where they came from (a directory), for messages


class AdaptedModel(nn.Module):
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
        self.tree = ModuleTree(base_model)
        self.hooks: dict[str, TrainingHooks] = {}  # per adapter whose method needs them (AdaLoRA, MoLoRA)
        self._active: tuple[str, ...] = ()
        self._merged = False
        self._requires_grad = {name: p.requires_grad for name, p in base_model.named_parameters()}
        base_model.requires_grad_(False)

    def forward(self, *args: Any, adapters: Sequence[str | None] | None = None, **kwargs: Any) -> Any:
        """The base model's forward with the active adapters; or, given `adapters` (one name or None per sample),
        every sample with its own adapter (None = the base model) in one batched pass, whatever is active.

        A base model whose forward turns each sample into several (vislora.tasks.tiled: an image into tiles) routes
        its parts itself: it has `forward_routed(routing, adapters, *args, **kwargs)` and gets this model's `routing`.
        """
        if adapters is None:
            return self.base_model(*args, **kwargs)
        forward_routed = getattr(self.base_model, "forward_routed", None)
        if forward_routed is not None:
            return forward_routed(self.routing, adapters, *args, **kwargs)
        with self.routing(adapters, (*args, *kwargs.values())):
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, adapters: Sequence[str | None] | None = None, **kwargs: Any) -> Any:
        """The base model's `generate` (transformers: greedy, beam search, sampling, KV cache) with the active
        adapters; or, given `adapters` (one name or None per prompt), every prompt generated with its own adapter in
        one batched generate. The route holds through every decode step, and beam search's and
        `num_return_sequences`'s copies of a prompt keep its adapter.
        """
        generate = getattr(self.base_model, "generate", None)
        if generate is None:
            raise AdapterError(f"a {type(self.base_model).__name__} cannot generate: generation needs a transformers "
                               "generative model (vislora.vlm.build_vlm, a *ForCausalLM or *ForConditionalGeneration)")
        if adapters is None:
            return generate(*args, **kwargs)
        config = kwargs.get("generation_config") or getattr(self.base_model, "generation_config", None)
        beams = kwargs.get("num_beams", getattr(config, "num_beams", 1) or 1)
        returns = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", 1) or 1)
        with self.routing(adapters, (*args, *kwargs.values()), repeat=max(beams, returns)):
            return generate(*args, **kwargs)

    @contextlib.contextmanager
    def routing(self, adapters: Sequence[str | None], inputs: Sequence[Any], repeat: int = 1) -> Iterator[None]:
        """Inside the block every adapter layer and saved module computes sample i of its batch with adapters[i]
        (None = the base model), whatever is active; `inputs` hold the batch the names are checked against. With
        `repeat` the block sees every sample `repeat` times in a row (generate's beams): each copy keeps the route."""
        loaded = {name: method_class(config) for name, config in self.configs.items()}
        route = Route.for_call(adapters, inputs, loaded, self._active if self._merged else None)
        if repeat > 1:
            route = route.repeated(repeat)
        self._set_route(route)
        try:
            yield
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
        """Whether the active adapters are merged into the base weights."""
        return self._merged

    def layers(self) -> dict[str, LoraLayer]:
        """Adapter layers by module path (a MultiheadAttention's in_proj layer under the attention's path, a raw
        weight's under `<module>.<parameter>`)."""
        return dict(self.tree.layers)

    def layers_of(self, name: str) -> dict[str, LoRA]:
        """Adapter `name`'s module in each layer that holds it, by layer path."""
        self.check_known([name])
        return {path: layer.adapters[name] for path, layer in self.tree.layers.items() if name in layer.adapters}

    def saved_modules(self, name: str) -> dict[str, nn.Module]:
        """Adapter `name`'s own copies of modules trained in full (modules_to_save), by module path."""
        self.check_known([name])
        return {path: saved.copies[name] for path, saved in self.tree.saved.items() if name in saved.copies}

    def add_adapter(self, name: str, config: AdapterConfig, activate: bool | None = None) -> TargetPlan:
        """Add a new adapter; it becomes active if it is the first one (or if `activate`)."""
        self.check_new_name(name)
        plan = resolve_targets(self.base_model, config)
        self._install(name, config, plan)
        self._activate_new(name, activate)
        logger.info("adapter %r added, %d parameters:\n%s", name, sum(self.parameter_counts(name).values()), plan)
        return plan

    def install(self, name: str, weights: AdapterWeights, activate: bool | None = None) -> TargetPlan:
        """Add adapter `name` holding `weights` (checked against this model); nothing stays behind if it fails."""
        self.check_new_name(name)
        self._install(name, weights.config, weights.plan)
        try:
            self.import_weights(name, weights)
        except Exception:
            self._remove(name)
            raise
        self._activate_new(name, activate)
        return weights.plan

    def import_weights(self, name: str, weights: AdapterWeights) -> None:
        """Copy `weights` into adapter `name`'s tensors in place: the parameter objects stay, so an optimizer or a
        DistributedDataParallel wrapper holding them keeps working."""
        self.check_known([name])
        for target in self.plans[name].targets:
            adapter = self.tree.layers[target.module_path].adapters[name]
            try:
                adapter.import_tensors(weights.layers[target.path])
            except AdapterError as exc:
                raise AdapterError(f"{target.path}: {exc} ({weights.source or 'given weights'})") from None
        with torch.no_grad():
            for path, copy in self.saved_modules(name).items():
                copy.load_state_dict(weights.saved[path])

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter and every tensor of it; layers left without adapters go back to their base modules."""
        self.check_known([name])
        if self._merged:
            raise AdapterError(f"adapters {list(self._active)} are merged into the weights; call unmerge() before "
                               f"deleting {name!r}")
        self._remove(name)
        self._activate_layers(self._active)  # the other adapters' trainability stays as it is

    def set_active(self, names: str | Sequence[str]) -> None:
        """Choose the adapters used in forward; several active adapters are summed."""
        names = (names,) if isinstance(names, str) else tuple(names)
        self.check_known(names)
        if self._merged:
            raise AdapterError(f"adapters {self._active} are merged into the weights; call unmerge() before "
                               "changing the active set")
        if len(set(names)) != len(names):
            raise AdapterError(f"adapter names repeat in {list(names)}")
        for path, saved in self.tree.saved.items():
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
        self.check_known(names)
        self._make_trainable(names)

    def is_training(self, name: str) -> bool:
        """Whether any tensor of adapter `name` is trainable."""
        return any(p.requires_grad for p in self.adapter_parameters(name))

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model without any adapter inside this block (merged weights are taken out)."""
        was_merged = self._merged
        if was_merged:
            self.unmerge()
        self._activate_layers(())
        try:
            yield
        finally:
            self._activate_layers(self._active)
            if was_merged:
                self.merge()

    # ---------------------------------------------------------------- the adapters' tensors
    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """Every tensor of adapter `name`: its modules' parameters in every layer (A, B, and what its method adds:
        DoRA magnitudes, AdaLoRA's E, MoLoRA's gates) and its copies of modules trained in full."""
        yield from self.layer_parameters(name)
        for copy in self.saved_modules(name).values():
            yield from copy.parameters()

    def layer_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """Adapter `name`'s tensors in its adapter layers (no saved-module copies)."""
        for adapter in self.layers_of(name).values():
            yield from adapter.parameters()

    def parameter_counts(self, name: str) -> dict[str, int]:
        """How many numbers adapter `name` holds in each adapted weight, by target path (its whole tensor list)."""
        layers = self.layers_of(name)
        return {t.path: sum(p.numel() for p in layers[t.module_path].parameters()) for t in self.plans[name].targets}

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s tensors keyed `<layer path>.<tensor name>` and `<path>.<key>` for saved modules."""
        state = {f"{path}.{key}": value for path, adapter in self.layers_of(name).items()
                 for key, value in adapter.named_parameters()}
        for path, copy in self.saved_modules(name).items():
            state.update({f"{path}.{k}": v for k, v in copy.state_dict().items()})
        return state

    # ---------------------------------------------------------------- training hooks (the trainer calls these)
    def auxiliary_loss(self) -> torch.Tensor | None:
        """Sum of the regularisers the adapters in training ask for (AdaLoRA orthogonality, MoLoRA load balance)."""
        terms = [loss for name, hooks in self.hooks.items() if self.is_training(name)
                 for loss in (hooks.loss(),) if loss is not None]
        return torch.stack(terms).sum() if terms else None

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Let adapters in training act on a finished optimizer step while its gradients exist (AdaLoRA's budget)."""
        for name, hooks in self.hooks.items():
            if self.is_training(name):
                hooks.after_step(step, total_steps)

    def adapter_metrics(self) -> dict[str, float]:
        """Figures adapters report while training: AdaLoRA rank budgets, MoLoRA expert shares."""
        return {key: value for hooks in self.hooks.values() for key, value in hooks.metrics().items()}

    def adapter_ranks(self, name: str) -> dict[str, int]:
        """The rank adapter `name` has in each layer now (AdaLoRA: triplets kept; others: as configured)."""
        self.check_known([name])
        ranks = self.hooks[name].ranks() if name in self.hooks else None
        if ranks is not None:
            return ranks
        return {t.path: t.rank * max(1, len(t.slices)) for t in self.plans[name].targets}

    def grow_rank(self, name: str, rank: int) -> list[Grown]:
        """Raise adapter `name` to `rank` without changing the model's output (progressive rank growth).

        New rows of A start like a fresh adapter's, new columns of B at zero, each layer's scale is kept (alpha grows
        with the rank). Returns (old parameter, new parameter, (old rank, grown dim)) so a trainer can move the
        optimizer state of the old entries over (vislora.train.growth.replace_grown).
        """
        self.check_known([name])
        config = self.configs[name]
        if config.rank_pattern:
            raise ConfigError(f"adapter {name!r} has a rank_pattern {config.rank_pattern}; progressive rank growth "
                              "raises one uniform rank, so remove the rank_pattern")
        if rank <= config.rank:
            raise ConfigError(f"rank growth of {name!r} must go up: it has rank {config.rank}, asked for {rank}")
        if self._merged:
            raise AdapterError(f"call unmerge() before growing the rank of {name!r}")
        if not method_class(config).grows:
            raise AdapterError(f"adapter {name!r} ({config.method}, init {config.init}) cannot grow its rank; "
                               "progressive rank growth works on LoRA and DoRA adapters not initialised by PiSSA")
        ratio = (rank / config.rank) ** 0.5 if config.use_rslora else rank / config.rank
        grown = [pair for adapter in self.layers_of(name).values() for pair in adapter.grow(rank)]
        self.configs[name] = config.model_copy(update={
            "rank": rank, "alpha": config.alpha * ratio,
            "alpha_pattern": {k: v * ratio for k, v in config.alpha_pattern.items()},
        })
        self.plans[name] = resolve_targets(self.base_model, self.configs[name])
        return grown

    # ---------------------------------------------------------------- merge
    def merge(self, safe: bool = True) -> None:
        """Add the active adapters into the base weights: W' = W + sum_i delta_W_i (DoRA: g (W + delta_W)).

        Afterwards forward costs what the base model costs. Adapters that cannot merge refuse before anything is
        written; with `safe`, every merged weight is also checked for NaN/Inf first.
        """
        if self._merged:
            raise AdapterError(f"adapters {self._active} are already merged")
        if not self._active:
            raise AdapterError(f"no active adapter to merge; call set_active() first (loaded: {self.adapters})")
        for name in self._active:
            reason = method_class(self.configs[name]).refusal
            if reason is not None:
                raise AdapterError(f"cannot merge: adapter {name!r} is {reason}; nothing was merged")
        for layer in self.tree.layers.values():
            layer.check_merge(layer.active)
        if safe:
            for path, layer in self.tree.layers.items():
                with torch.no_grad():
                    finite = bool(torch.isfinite(layer.merged_weight(layer.active)).all())
                if not finite:
                    raise NonFiniteError(f"merging {layer.active} into {path!r} gives NaN/Inf; the adapter weights are "
                                       "broken, nothing was merged")
        for layer in self.tree.layers.values():
            layer.merge(layer.active)
        self._merged = True

    def unmerge(self) -> None:
        """Subtract merged adapters from the base weights (exact up to float rounding)."""
        if not self._merged:
            raise AdapterError("nothing is merged")
        for layer in self.tree.layers.values():
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
            for saved in self.tree.saved.values():
                saved.active = None
        self.tree.unwrap_all()
        for param_name, param in self.base_model.named_parameters():
            param.requires_grad_(self._requires_grad.get(param_name, True))
        base, self.configs, self.plans, self.hooks = self.base_model, {}, {}, {}
        self._active, self._merged = (), False
        return base

    # ---------------------------------------------------------------- checks
    def check_new_name(self, name: str) -> None:
        """Raise AdapterError unless `name` is a valid name no adapter has yet."""
        if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
            raise AdapterError(f"invalid adapter name {name!r}: use 1-64 letters, digits, '_' or '-', "
                               "starting with a letter")
        if name in self.configs:
            raise AdapterError(f"an adapter named {name!r} already exists; delete_adapter({name!r}) first or "
                               "pick another name")

    def check_known(self, names: Sequence[str]) -> None:
        """Raise AdapterError naming any of `names` that is not loaded."""
        unknown = [n for n in names if n not in self.configs]
        if unknown:
            raise AdapterError(f"unknown adapter(s) {unknown}; loaded: {list(self.adapters) or 'none'}")

    # ---------------------------------------------------------------- internals
    def _install(self, name: str, config: AdapterConfig, plan: TargetPlan) -> None:
        """Add adapter `name` (freshly initialised) to every layer of `plan`; on failure nothing of it stays."""
        self.configs[name], self.plans[name] = config, plan
        method = method_class(config)
        try:
            for target in plan.targets:
                self.tree.layer_for(target).add_adapter(name, method.for_target(target, config))
            for path in plan.modules_to_save:
                self.tree.saved_for(path).add_adapter(name)
            hooks = method.training_hooks(self.layers_of(name), name, config)
            if hooks is not None:
                self.hooks[name] = hooks
        except Exception:
            self._remove(name)
            raise

    def _remove(self, name: str) -> None:
        """Take adapter `name` out of every wrapper; wrappers left empty go back to their base modules."""
        for layer in self.tree.layers.values():
            if name in layer.adapters:
                layer.delete_adapter(name)
        for saved in self.tree.saved.values():
            if name in saved.copies:
                saved.delete_adapter(name)
        self.tree.unwrap_empty()
        del self.configs[name], self.plans[name]
        self.hooks.pop(name, None)
        self._active = tuple(n for n in self._active if n != name)

    def _activate_new(self, name: str, activate: bool | None) -> None:
        if activate or (activate is None and not self._active):
            self.set_active(name)
            return
        # an inactive newcomer is frozen and the others stay as they are: the cost of one adapter, not of every
        # adapter loaded (a server holding 1,000 spent 0.75 s per load at 300 re-freezing all of them)
        self._activate_layers(self._active)
        for param in self.adapter_parameters(name):
            param.requires_grad_(False)

    def _set_route(self, route: Route | None) -> None:
        for wrapper in (*self.tree.layers.values(), *self.tree.saved.values()):
            wrapper.route = route

    def _activate_layers(self, names: tuple[str, ...]) -> None:
        """Tell every wrapper which adapters its forward adds (none of them while merged)."""
        for layer in self.tree.layers.values():
            layer.active = () if self._merged else names
        for saved in self.tree.saved.values():
            saved.active = next((n for n in names if n in saved.copies), None)

    def _apply_active(self) -> None:
        """Activate the active set in every wrapper and make exactly the active adapters trainable."""
        self._activate_layers(self._active)
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
