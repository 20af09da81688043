"""Which modules get adapters: roles, patterns, layer selection, per-layer rank/alpha.

A `targets` entry is one of
- a role: `q`, `k`, `v` (one low-rank pair per projection, a slice when the model fuses qkv),
  `qkv` (the query/key/value projection as the model has it: one pair on a fused layer),
  `o`, `fc1`, `fc2`, and the groups `attention` (qkv + o) and `mlp` (fc1 + fc2);
- `re:<regex>`: a regex that must match the whole module path;
- `<path>[q,v]`: chosen slices of one fused qkv layer (how a combined adapter names its targets);
- anything else: a module-path suffix on a dot boundary (`attn.proj` hits `blocks.3.attn.proj`,
  never `patch_embed.proj`).
Inside `nn.MultiheadAttention` the fused input projection is reachable as `<path>.in_proj`. A weight that is a bare
2-D nn.Parameter of a module that is not a torch layer (open_clip's `Attention.in_proj_weight`, a user's module) is
reachable as `<module path>.<parameter name>`; one named `in_proj_weight` counts as a fused qkv projection.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn
from torch.nn.utils import parametrize

from vislora.config import AdapterConfig
from vislora.errors import TargetError

QKV = ("q", "k", "v")
_ANY = r"(?:.*\.)?"
_FUSED = (rf"{_ANY}qkv", rf"{_ANY}in_proj", rf"{_ANY}in_proj_weight")
_SEPARATE = {
    "q": (rf"{_ANY}(?:q_proj|query)",),
    "k": (rf"{_ANY}(?:k_proj|key)",),
    "v": (rf"{_ANY}(?:v_proj|value)",),
}
_ROLE_PATTERNS = {
    "o": (rf"{_ANY}attn\.proj", rf"{_ANY}(?:out_proj|o_proj)", rf"{_ANY}attention\.output\.dense",
          rf"{_ANY}self_attn\.projection"),
    # language models: LLaMA/Gemma gated MLPs (gate_proj, up_proj -> down_proj), OPT's fc1/fc2 beside self_attn,
    # a BERT-style Q-Former's intermediate_query/output_query
    "fc1": (rf"{_ANY}mlp\.(?:fc1|fc1_g|fc1_x|c_fc|gate_proj|up_proj)", rf"{_ANY}intermediate(?:_query)?\.dense",
            rf"{_ANY}layers\.\d+\.fc1"),
    "fc2": (rf"{_ANY}mlp\.(?:fc2|c_proj|down_proj)", rf"{_ANY}layers?\.\d+\.output(?:_query)?\.dense",
            rf"{_ANY}layers\.\d+\.fc2"),
}
ROLE_GROUPS = {"attention": ("qkv", "o"), "mlp": ("fc1", "fc2")}
ROLES = ("qkv", *QKV, "o", "fc1", "fc2", *ROLE_GROUPS)
_SLICED = re.compile(r"(.+)\[([qkv](?:,[qkv])*)\]")
_BLOCK = re.compile(r"(?:^|\.)(?:blocks|layers?|resblocks|h)\.(\d+)(?=\.|$)")
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class RawWeight:
    """A bare 2-D nn.Parameter of a module, as a target candidate."""

    owner: nn.Module
    name: str
    out_features: int
    in_features: int


@dataclass(frozen=True)
class Target:
    """One adapted weight: a Linear, the fused input projection of a MultiheadAttention, or a raw weight."""

    path: str  # module path; "<mha path>.in_proj" for an attention's input projection; "<module>.<param>" raw
    kind: str  # "linear" | "mha_in_proj" | "parameter"
    slices: tuple[str, ...]  # () = whole weight; else the chosen roles of a fused (q, k, v) weight
    in_features: int
    out_features: int
    rank: int
    alpha: float
    scale: float

    @property
    def module_path(self) -> str:
        """Path of the adapter layer: the MultiheadAttention for its in_proj, else the target's own path."""
        return self.path.removesuffix(".in_proj") if self.kind == "mha_in_proj" else self.path

    @property
    def blocks(self) -> tuple[int, ...]:
        """The chosen slices as indices into (q, k, v)."""
        return tuple(QKV.index(s) for s in self.slices)


@dataclass
class TargetPlan:
    """Everything one adapter touches, resolved against a concrete model."""

    targets: list[Target]
    modules_to_save: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Number of adapted weights per module-name pattern (block indices replaced by N)."""
        return dict(Counter(_generic(t.path) + (f"[{','.join(t.slices)}]" if t.slices else "")
                            for t in self.targets))

    def __str__(self) -> str:
        lines = [f"{len(self.targets)} adapted weights"]
        lines += [f"  {n:>4} x {name}" for name, n in self.counts().items()]
        if self.modules_to_save:
            lines.append(f"  trained in full and saved: {', '.join(self.modules_to_save)}")
        return "\n".join(lines)


def resolve_targets(model: nn.Module, config: AdapterConfig, modules: dict[str, nn.Module] | None = None
                    ) -> TargetPlan:
    """Resolve `config` against `model` (`modules`: its `logical_modules`, if the caller has them); raises
    TargetError naming any pattern that cannot apply."""
    modules = logical_modules(model) if modules is None else modules
    candidates = _candidates(modules)
    chosen: dict[str, set[str] | None] = {}  # path -> chosen slices (None = whole weight)
    for entry in config.targets:
        for path, slice_name in _match_entry(entry, candidates, modules):
            _add(chosen, path, slice_name, entry)
    for pattern in config.exclude:
        for path in [p for p in chosen if _matches(pattern, p)]:
            del chosen[path]
    if config.layers is not None:
        chosen = _select_layers(chosen, config.layers, modules)
    if not chosen:
        raise TargetError(
            f"targets {config.targets} (exclude={config.exclude}, layers={config.layers}) left nothing to "
            "adapt in this model; loosen the exclude/layers filters"
        )
    targets = [_target(path, slices, candidates, config) for path, slices in sorted(chosen.items(),
                                                                                    key=path_order)]
    to_save = _modules_to_save(modules, config)
    return TargetPlan(targets=targets, modules_to_save=to_save)


def logical_modules(model: nn.Module) -> dict[str, nn.Module]:
    """named_modules() as if no vislora wrapper were there: a wrapper's path maps to its base layer."""
    out: dict[str, nn.Module] = {}

    def walk(path: str, module: nn.Module) -> None:
        if getattr(module, "is_vislora_wrapper", False):
            module = module.base_layer
        out[path] = module
        for name, child in module.named_children():
            if name != "parametrizations" or not parametrize.is_parametrized(module):
                walk(f"{path}.{name}" if path else name, child)

    walk("", model)
    return out


def check_mha(mha: nn.MultiheadAttention, path: str = "") -> None:
    """Raise TargetError unless vislora can adapt this attention's fused input projection (the one place that says)."""
    problems = []
    if not mha.kdim == mha.vdim == mha.embed_dim:
        problems.append(f"kdim={mha.kdim}/vdim={mha.vdim} differ from embed_dim={mha.embed_dim}")
    if mha.bias_k is not None:
        problems.append("add_bias_kv=True")
    if mha.add_zero_attn:
        problems.append("add_zero_attn=True")
    if problems:
        where = f"{path!r}: " if path else ""
        raise TargetError(
            f"{where}cannot adapt the input projection of this nn.MultiheadAttention ({', '.join(problems)}): "
            "vislora adapts the fused in_proj_weight of attention with equal q/k/v dims and no bias_k/bias_v/"
            "add_zero_attn; target its out_proj only, or exclude this layer"
        )


def raw_weights(module: nn.Module) -> dict[str, RawWeight]:
    """The bare 2-D floating-point parameters of `module` by name, unless it is a torch layer (whose weights its
    own wrapper adapts); a parametrized one counts as the parameter it stands for."""
    cls = type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)
    if cls.__module__.startswith("torch.nn"):
        return {}
    params = dict(module.named_parameters(recurse=False))
    if parametrize.is_parametrized(module):
        params.update({name: plist.original for name, plist in module.parametrizations.items()})
    return {name: RawWeight(module, name, *p.shape) for name, p in params.items()
            if p.dim() == 2 and p.is_floating_point()}


def _candidates(modules: dict[str, nn.Module]) -> dict[str, nn.Module | RawWeight]:
    """All module paths, a pseudo path `<mha>.in_proj` for each MultiheadAttention, `<module>.<param>` for raw
    weights."""
    out: dict[str, nn.Module | RawWeight] = {path: module for path, module in modules.items() if path}
    for path, module in modules.items():
        if isinstance(module, nn.MultiheadAttention):
            out[f"{path}.in_proj" if path else "in_proj"] = module
        for name, weight in raw_weights(module).items():
            out[f"{path}.{name}" if path else name] = weight
    return out


def _matches(pattern: str, path: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], path) is not None
    return path == pattern or path.endswith("." + pattern)


def _is_fused(path: str, module: nn.Module | RawWeight) -> bool:
    if isinstance(module, nn.MultiheadAttention):
        return path.endswith("in_proj")
    return isinstance(module, (nn.Linear, RawWeight)) and module.out_features % len(QKV) == 0 and any(
        re.fullmatch(p, path) for p in _FUSED
    )


def _match_entry(
    entry: str, candidates: dict[str, nn.Module | RawWeight], modules: dict[str, nn.Module]
) -> list[tuple[str, str | None]]:
    """(path, slice) pairs an entry selects; slice is None for a whole weight."""
    if entry in ROLES:
        hits = _match_role(entry, candidates)
        if not hits:
            raise TargetError(
                f"role {entry!r} found no module in this model. vislora knows the names used by timm "
                "ViT/DeiT/EVA/BEiT, Hugging Face ViT/DINOv2/CLIP/SigLIP/BERT and open_clip; for other "
                f"models name the modules by path suffix. Linear layers here include: {_examples(modules)}"
            )
        return hits
    sliced = _SLICED.fullmatch(entry)
    if sliced:
        return _match_sliced(entry, sliced.group(1), sliced.group(2).split(","), candidates)
    hits = [path for path in candidates if _matches(entry, path)]
    if not hits:
        close = difflib.get_close_matches(entry, sorted({_generic(p) for p in candidates}), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else f" Linear layers here: {_examples(modules)}"
        raise TargetError(f"target {entry!r} matches no module in this model.{hint}")
    out: list[tuple[str, str | None]] = []
    for path in hits:
        module = candidates[path]
        if isinstance(module, nn.MultiheadAttention) and not path.endswith("in_proj"):
            out += [(f"{path}.in_proj", None), (f"{path}.out_proj", None)]  # the whole attention layer
        elif isinstance(module, (nn.Linear, RawWeight)) or path.endswith("in_proj"):
            out.append((path, None))
        else:
            inner = [p for p, m in modules.items() if p.startswith(path + ".") and isinstance(m, nn.Linear)]
            hint = f" Adaptable layers inside it: {', '.join(inner[:6])}." if inner else ""
            raise TargetError(
                f"target {entry!r} matches {path!r}, a {type(module).__name__}; vislora adapts nn.Linear, "
                "nn.MultiheadAttention and bare 2-D weight parameters only. Use a more specific pattern or add it "
                f"to `exclude`.{hint}"
            )
    return out


def _match_sliced(
    entry: str, pattern: str, slices: list[str], candidates: dict[str, nn.Module | RawWeight]
) -> list[tuple[str, str | None]]:
    hits = [path for path in candidates if _matches(pattern, path)]
    if not hits:
        raise TargetError(f"target {entry!r}: {pattern!r} matches no module in this model")
    unfused = [path for path in hits if not _is_fused(path, candidates[path])]
    if unfused:
        raise TargetError(f"target {entry!r} asks for q/k/v slices of {unfused[0]!r}, which is not a fused qkv "
                          "projection (a Linear named qkv with 3*d outputs, a MultiheadAttention's in_proj, or a raw "
                          "in_proj_weight)")
    return [(path, s) for path in hits for s in slices]


def _match_role(role: str, candidates: dict[str, nn.Module | RawWeight]) -> list[tuple[str, str | None]]:
    if role in ROLE_GROUPS:
        return [hit for sub in ROLE_GROUPS[role] for hit in _match_role(sub, candidates)]
    hits: list[tuple[str, str | None]] = []
    for path, module in candidates.items():
        if role in ("qkv", *QKV) and _is_fused(path, module):
            hits += [(path, None)] if role == "qkv" else [(path, role)]
            continue
        if not isinstance(module, nn.Linear):
            continue
        names = QKV if role == "qkv" else (role,)
        patterns = [p for name in names for p in _SEPARATE.get(name, _ROLE_PATTERNS.get(name, ()))]
        if any(re.fullmatch(p, path) for p in patterns):
            hits.append((path, None))
    return hits


def _add(chosen: dict[str, set[str] | None], path: str, slice_name: str | None, entry: str) -> None:
    if path not in chosen:
        chosen[path] = None if slice_name is None else {slice_name}
        return
    current = chosen[path]
    if (current is None) != (slice_name is None):
        raise TargetError(
            f"{path!r} is targeted both as a whole fused layer and as slice {slice_name or sorted(current)} "
            f"(entry {entry!r}); choose either the whole layer (role 'qkv' or its path) or slices q/k/v"
        )
    if current is not None and slice_name is not None:
        current.add(slice_name)


def _select_layers(
    chosen: dict[str, set[str] | None], layers: list[int], modules: dict[str, nn.Module]
) -> dict[str, set[str] | None]:
    depth = _stack_depths(modules)
    kept: dict[str, set[str] | None] = {}
    for path, slices in chosen.items():
        match = _BLOCK.search(path)
        if match is None:
            continue
        stack = path[: match.start(1)]
        n = depth[stack]
        wanted = set()
        for index in layers:
            if not -n <= index < n:
                raise TargetError(f"layers={layers} asks for block {index}, but {stack!r} has {n} blocks "
                                  f"(0..{n - 1}, or -1..-{n} from the end)")
            wanted.add(index % n)
        if int(match.group(1)) in wanted:
            kept[path] = slices
    return kept


def block_prefix(path: str) -> str | None:
    """The path of the transformer block holding `path` (`blocks.3` of `blocks.3.mlp.fc1`), or None."""
    match = _BLOCK.search(path)
    return path[: match.end()] if match else None


def _stack_depths(modules: dict[str, nn.Module]) -> dict[str, int]:
    """Number of blocks in each stack, keyed by the path prefix up to the block index."""
    depth: dict[str, int] = {}
    for path in modules:
        match = _BLOCK.search(path)
        if match:
            stack = path[: match.start(1)]
            depth[stack] = max(depth.get(stack, 0), int(match.group(1)) + 1)
    return depth


def _target(path: str, slices: set[str] | None, candidates: dict[str, nn.Module | RawWeight],
            config: AdapterConfig) -> Target:
    module = candidates[path]
    # PEFT adapts a MultiheadAttention as one module: its rank/alpha_pattern keys name the attention
    parent = path.rpartition(".")[0]
    owner = parent if isinstance(candidates.get(parent), nn.MultiheadAttention) else path
    rank = _pattern_value(config.rank_pattern, path, _pattern_value(config.rank_pattern, owner, config.rank))
    alpha = _pattern_value(config.alpha_pattern, path, _pattern_value(config.alpha_pattern, owner, config.alpha))
    if isinstance(module, nn.MultiheadAttention):
        check_mha(module, path)
        kind, n_in, n_out = "mha_in_proj", module.embed_dim, 3 * module.embed_dim
    elif isinstance(module, RawWeight):
        kind, n_in, n_out = "parameter", module.in_features, module.out_features
    else:
        kind, n_in, n_out = "linear", module.in_features, module.out_features
    ordered = tuple(s for s in QKV if slices and s in slices)
    return Target(path, kind, ordered, n_in, n_out, rank, float(alpha), config.scale_for(rank, alpha))


def _pattern_value(pattern: dict, path: str, default: float) -> float:
    """PEFT's rule: the first key that matches the end of the path on a dot boundary (keys are regexes)."""
    for key, value in pattern.items():
        regex = key[3:] if key.startswith("re:") else key
        if re.match(rf"(.*\.)?({regex})$", path):
            return value
    return default


def _modules_to_save(modules: dict[str, nn.Module], config: AdapterConfig) -> list[str]:
    paths = []
    for pattern in config.modules_to_save:
        hits = [p for p in modules if p and _matches(pattern, p)]
        if not hits:
            raise TargetError(f"modules_to_save entry {pattern!r} matches no module in this model "
                              f"(top-level modules: {', '.join(n for n, _ in modules[''].named_children())})")
        paths += hits
    if config.train_norms:
        paths += [p for p, m in modules.items() if isinstance(m, _NORM_TYPES) or type(m).__name__.endswith(
            ("LayerNorm", "RMSNorm"))]
    # a module inside another saved module is saved with it
    paths = sorted(set(paths), key=path_order)
    return [p for p in paths if not any(p.startswith(q + ".") for q in paths)]


def _generic(path: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".N", path)


def path_order(item: str | tuple) -> list:
    """Sort key for module paths (or (path, ...) tuples) that reads block indices as numbers: 2 before 10."""
    path = item[0] if isinstance(item, tuple) else item
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.split(".")]


def _examples(modules: dict[str, nn.Module]) -> str:
    names = sorted({_generic(p) for p, m in modules.items() if isinstance(m, nn.Linear)})
    return ", ".join(names[:8]) or "(none)"


def scoped_regexes(model: nn.Module, prefix: str, entries: list[str],
                   exclude: Sequence[str] = ()) -> list[tuple[str, tuple[str, ...]]]:
    """(regex over full module paths, slices) covering what `entries` (roles, paths, patterns) select inside the
    submodule at `prefix` of `model` (a base model: a dual encoder's tower, a VLM's part).

    Block indices become \\d+ (the final config's `layers` / `exclude` select among them again).
    """
    part = model.get_submodule(prefix)
    probe = AdapterConfig.parse({"targets": entries, "exclude": list(exclude)})
    by_slices: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for target in resolve_targets(part, probe).targets:
        generic = r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in target.path.split("."))
        if generic not in by_slices[target.slices]:
            by_slices[target.slices].append(generic)
    scope = re.escape(prefix)
    return [(f"{scope}\\.(?:{'|'.join(paths)})", slices) for slices, paths in by_slices.items()]
