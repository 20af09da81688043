"""Tower-aware adapter configs: separate targets, rank and alpha for the image and the text tower of a dual encoder.

`tower_adapter_config` resolves each tower's targets (roles such as `q`, `v`, `fc1`, or path patterns) inside
that tower only, and writes ONE `AdapterConfig` whose targets are regexes scoped to each tower's module prefix
and whose `rank_pattern` / `alpha_pattern` carry the per-tower values; the file it saves is an ordinary PEFT
adapter config. Which parameters belong to which tower (for multi-stage training) is `tower_of`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from vislora.config import AdapterConfig
from vislora.errors import ConfigError
from vislora.targets import scoped_regexes

TOWERS = ("vision", "text")


def tower_adapter_config(model: nn.Module, vision_targets: Sequence[str] | None = None,
                         text_targets: Sequence[str] | None = None, *, rank: int = 8, alpha: float = 16.0,
                         vision_rank: int | None = None, vision_alpha: float | None = None,
                         text_rank: int | None = None, text_alpha: float | None = None, train_heads: bool = True,
                         train_logit_scale: bool | None = None, **fields: Any) -> AdapterConfig:
    """One AdapterConfig adapting `vision_targets` in the image tower and `text_targets` in the text tower.

    `model` is a dual encoder (it names its towers in `model.towers` and projections in `model.heads`).
    Per-tower rank/alpha default to `rank`/`alpha`. With `train_heads` the projections of adapted towers are
    trained in full and saved; with `train_logit_scale` (default: as `train_heads`) the temperature too. Other
    `fields` (dropout, use_rslora, layers, exclude, method, init, ...) go to AdapterConfig unchanged.
    """
    towers, heads = _towers(model)
    wanted = {"vision": vision_targets, "text": text_targets}
    if not any(wanted.values()):
        raise ConfigError("no tower is adapted: give vision_targets and/or text_targets (roles such as q, k, v, o, "
                          "fc1, fc2, or module-path patterns)")
    values = {"vision": (vision_rank or rank, vision_alpha or alpha), "text": (text_rank or rank, text_alpha or alpha)}
    targets, rank_pattern, alpha_pattern, to_save = [], {}, {}, list(fields.pop("modules_to_save", []))
    for tower, entries in wanted.items():
        if not entries:
            continue
        scoped = scoped_regexes(getattr(model, "base_model", model), towers[tower], list(entries),
                                fields.get("exclude", []))
        for body, slices in scoped:
            targets.append(f"re:{body}" + (f"[{','.join(slices)}]" if slices else ""))
            rank_pattern[body], alpha_pattern[body] = values[tower]
        if train_heads and tower in heads:
            to_save.append(heads[tower])
    if (train_heads if train_logit_scale is None else train_logit_scale) and hasattr(model, "logit_scale"):
        to_save.append("logit_scale")
    return AdapterConfig.parse({**fields, "rank": rank, "alpha": alpha, "targets": targets,
                                "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
                                "modules_to_save": list(dict.fromkeys(to_save))})


def _towers(model: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    base = getattr(model, "base_model", model)
    towers, heads = getattr(base, "towers", None), getattr(base, "heads", {})
    if not towers:
        raise ConfigError(f"a {type(base).__name__} has no towers; vision_targets/text_targets need a dual encoder "
                          "(vislora.dual_encoder.build_dual_encoder)")
    return towers, heads


def tower_of(model: nn.Module, parameter_name: str) -> str | None:
    """Which tower a parameter of `model` (a dual encoder, adapted or not) belongs to: its encoder or its head.

    Parameters outside both towers (the logit scale) give None. A model without towers is all `vision`.
    """
    base = getattr(model, "base_model", model)
    towers = getattr(base, "towers", None)
    if not towers:
        return "vision"
    name = parameter_name.removeprefix("base_model.")
    heads = getattr(base, "heads", {})
    for tower in TOWERS:
        for prefix in (towers.get(tower), heads.get(tower)):
            if prefix and (name == prefix or name.startswith(prefix + ".")):
                return tower
    return None
