"""The parts of a generative vision-language model and the adapter targets that name them.

A generative VLM is a vision tower, a connector (projector) into the language model's embedding width, the causal
language model itself, and for BLIP-2 a Q-Former between tower and connector. Each supported transformers family
names where its parts live; adapter targets name a part (`lm`, `vision`, `connector`, `qformer`: the part's preset
roles) or a role or pattern inside one (`lm:q`, `vision:qkv`, `lm:mlp`, `qformer:re:.*crossattention.*`), and resolve
to regexes scoped to that part's module path, so one `AdapterConfig` (an ordinary PEFT config) covers every part.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from vislora.config import AdapterConfig
from vislora.errors import ConfigError
from vislora.model import AdaptedModel
from vislora.targets import scoped_regexes

PARTS = ("lm", "vision", "connector", "qformer")
# the roles each part's name stands for in `targets`; a connector is adapted on every linear layer it has
PART_PRESETS: dict[str, tuple[str, ...]] = {
    "lm": ("q", "k", "v", "o", "mlp"),
    "vision": ("q", "v"),
    "connector": (),  # every linear layer in it
    "qformer": ("q", "k", "v", "o"),
}


@dataclass(frozen=True)
class Family:
    """One transformers VLM family: its `model_type`s and the module path of each part it has."""

    name: str
    model_types: tuple[str, ...]
    parts: Mapping[str, str]
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # part -> further paths (BLIP-2 query tokens)

    def path(self, part: str) -> str:
        """The module path of `part`; ConfigError naming the parts this family has when it lacks one."""
        if part not in PARTS:
            raise ConfigError(f"unknown VLM part {part!r}; parts are {', '.join(PARTS)}")
        if part not in self.parts:
            raise ConfigError(f"a {self.name} model has no {part!r} part; its parts are {', '.join(self.parts)}")
        return self.parts[part]


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("llava", ("llava",), {"vision": "model.vision_tower", "connector": "model.multi_modal_projector",
                                     "lm": "model.language_model"}),
        # BLIP has no connector module: its text decoder cross-attends to the image (adapt it with lm:q, lm:v, ...)
        Family("blip", ("blip",), {"vision": "vision_model", "lm": "text_decoder"}),
        Family("blip2", ("blip-2",), {"vision": "vision_model", "qformer": "qformer",
                                      "connector": "language_projection", "lm": "language_model"},
               extra={"qformer": ("query_tokens",)}),
        Family("idefics3", ("idefics3", "smolvlm"), {"vision": "model.vision_model", "connector": "model.connector",
                                                     "lm": "model.text_model"}),
        Family("paligemma", ("paligemma",), {"vision": "model.vision_tower",
                                             "connector": "model.multi_modal_projector",
                                             "lm": "model.language_model"}),
    )
}


def family_of(model: nn.Module) -> Family:
    """The VLM family of `model` (adapted or not), read from its config's `model_type`."""
    base = unwrap(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = ", ".join(t for f in FAMILIES.values() for t in f.model_types)
    raise ConfigError(f"a {type(base).__name__} (model_type {model_type!r}) is not a generative VLM vislora knows; "
                      f"supported model types: {known} (or compose one with vislora.vlm.build_vlm(vision, lm=...))")


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under an AdaptedModel (whose own `base_model` property means something else)."""
    return model.base_model if isinstance(model, AdaptedModel) else model


def is_vlm(model: nn.Module) -> bool:
    """Whether `model` (adapted or not) belongs to a known VLM family."""
    try:
        family_of(model)
    except ConfigError:
        return False
    return True


def parts_of(model: nn.Module) -> dict[str, str]:
    """part -> module path, for the parts `model` has."""
    return dict(family_of(model).parts)


def part_of(model: nn.Module, parameter_name: str) -> str | None:
    """The part a parameter of `model` (adapted or not; a `base_model.` prefix is ignored) belongs to, None outside
    every part (embeddings and output head of a LLaVA model, for instance)."""
    family = family_of(model)
    name = parameter_name.removeprefix("base_model.")
    for part, prefix in family.parts.items():
        for path in (prefix, *family.extra.get(part, ())):
            if name == path or name.startswith(path + "."):
                return part
    return None


def vlm_adapter_config(model: nn.Module, targets: Sequence[str], *, rank: int = 8, alpha: float = 16.0,
                       part_ranks: Mapping[str, int] | None = None, part_alphas: Mapping[str, float] | None = None,
                       train_connector: bool = False, **fields: Any) -> AdapterConfig:
    """One AdapterConfig adapting `targets` of a VLM.

    An entry is a part (`lm`: its q, k, v, o and MLP; `vision`: q and v; `connector`: its linear layers; `qformer`:
    q, k, v, o), a part and what to adapt inside it (`lm:q`, `vision:qkv`, `lm:re:.*self_attn.*`), or anything
    `AdapterConfig.targets` takes, matched across the whole model. `part_ranks` / `part_alphas` override rank and
    alpha per part; `train_connector` trains the connector in full and saves it with the adapter (LLaVA's stage 1).
    Other `fields` go to AdapterConfig unchanged.
    """
    family = family_of(model)
    base = unwrap(model)
    by_part: dict[str, list[str]] = {}
    plain: list[str] = []
    for entry in targets:
        part, sep, inner = entry.partition(":")
        if part in PARTS:
            by_part.setdefault(part, []).extend([inner] if sep else PART_PRESETS[part])
        elif entry in family.parts.values() or not sep or part == "re":
            plain.append(entry)
        else:
            raise ConfigError(f"target {entry!r} names no VLM part; write <part>:<role or pattern> with a part of "
                              f"{', '.join(family.parts)} (e.g. lm:q), or a part alone (e.g. lm)")
    ranks, alphas = dict(part_ranks or {}), dict(part_alphas or {})
    unknown = sorted((set(ranks) | set(alphas)) - set(family.parts))
    if unknown:
        raise ConfigError(f"part_ranks/part_alphas name {unknown}, which a {family.name} model does not have; its "
                          f"parts are {', '.join(family.parts)}")
    resolved = list(plain)
    rank_pattern, alpha_pattern = dict(fields.pop("rank_pattern", {})), dict(fields.pop("alpha_pattern", {}))
    for part, entries in by_part.items():
        prefix = family.path(part)
        module = base.get_submodule(prefix)
        if isinstance(module, nn.Linear):  # a connector that is one linear layer
            bodies = [(re.escape(prefix), ())]
        elif not entries:  # every linear layer of the part
            paths = [re.escape(f"{prefix}.{n}") for n, m in module.named_modules() if isinstance(m, nn.Linear)]
            bodies = [(f"(?:{'|'.join(paths)})", ())]
        else:
            bodies = scoped_regexes(base, prefix, list(dict.fromkeys(entries)), fields.get("exclude", []))
        for body, slices in bodies:
            resolved.append(f"re:{body}" + (f"[{','.join(slices)}]" if slices else ""))
            if part in ranks or part in alphas:
                rank_pattern[body] = ranks.get(part, rank)
                alpha_pattern[body] = alphas.get(part, alpha)
    to_save = list(fields.pop("modules_to_save", []))
    if train_connector:
        to_save.append(family.path("connector"))
    if not resolved:
        raise ConfigError("no VLM target given: name a part (lm, vision, connector, qformer) or part:role entries")
    return AdapterConfig.parse({**fields, "rank": rank, "alpha": alpha, "targets": resolved,
                                "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
                                "modules_to_save": list(dict.fromkeys(to_save))})
