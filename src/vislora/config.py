"""Adapter configuration: pydantic model, task presets, YAML/JSON load and save."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vislora.errors import ConfigError, VisloraWarning
from vislora.io import atomic_write_text, read_mapping

Init = Literal["kaiming", "gaussian", "pissa"]
Method = Literal["lora", "dora", "adalora", "molora"]

HIGH_RANK = 64
LOW_ALPHA_PER_RANK = 0.5

# The seed guide's task presets. Targets are roles (see vislora.targets.ROLES), resolved per model family.
PRESETS: dict[str, dict[str, Any]] = {
    "image_classification": {"rank": 8, "alpha": 16, "targets": ["qkv", "o"]},
    "image_captioning": {"rank": 32, "alpha": 32, "targets": ["q", "v", "o"]},
    "visual_question_answering": {"rank": 16, "alpha": 16, "targets": ["q", "k", "v"]},
    "medical": {"rank": 32, "alpha": 32, "targets": ["q", "v", "fc1", "fc2"]},
    "satellite": {"rank": 16, "alpha": 16, "targets": ["qkv", "o"]},
    "driving": {"rank": 24, "alpha": 24, "targets": ["q", "k", "v", "o"]},
    "few_shot": {"rank": 8, "alpha": 16, "targets": ["q", "v"], "dropout": 0.0},
}


class AdaLoraOptions(BaseModel):
    """AdaLoRA's rank budget (Zhang et al. 2023): each layer starts at the adapter's `rank` and the triplets of least
    importance are pruned until the average rank per layer is `target_rank`."""

    model_config = ConfigDict(extra="forbid")

    target_rank: int = Field(4, ge=1, description="Average rank per layer once the budget has fallen.")
    tinit: int = Field(0, ge=0, description="Steps at the full budget before ranks start to fall.")
    tfinal: int = Field(0, ge=0, description="Last steps at the target budget, with the rank pattern fixed.")
    delta_t: int = Field(10, ge=1, description="Steps between two budget allocations while the budget falls.")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA factor of the sensitivity |w * grad|.")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA factor of the sensitivity's uncertainty.")
    orth_reg_weight: float = Field(
        0.5, ge=0, description="Weight of the orthogonality regulariser ||A A^T - I||_F + ||B^T B - I||_F."
    )


class MoLoraOptions(BaseModel):
    """A mixture of LoRA experts per layer with a learned softmax gate over the top-k experts."""

    model_config = ConfigDict(extra="forbid")

    experts: int = Field(4, ge=2, description="LoRA experts per layer, each of the adapter's rank.")
    top_k: int = Field(2, ge=1, description="Experts mixed for each token (or image).")
    gate: Literal["token", "image"] = Field(
        "token", description="token: a gate decision per token; image: one per image (mean of its tokens)."
    )
    balance_weight: float = Field(
        0.01, ge=0, description="Weight of the load-balancing loss E * sum_e f_e * P_e (Switch Transformer)."
    )


class AdapterConfig(BaseModel):
    """How one named adapter is shaped and where it goes.

    `targets` entries are roles (`q`, `k`, `v`, `qkv`, `o`, `fc1`, `fc2`, `attention`, `mlp`) resolved
    for the model's family, module-path suffixes (`attn.qkv`), or regexes prefixed `re:`.
    delta_W = scale * B @ A with scale = alpha / rank, or alpha / sqrt(rank) when `use_rslora`. A target can
    also be a module path with slices, `blocks.0.attn.qkv[q,v]`.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    rank: int = Field(8, ge=1, description="Rank r of each low-rank pair.")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: scale = alpha / r (or / sqrt(r)).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter branch input.")
    use_rslora: bool = Field(False, description="Scale by alpha / sqrt(rank) (rsLoRA).")
    targets: list[str] = Field(default_factory=lambda: ["qkv", "o"], min_length=1)
    exclude: list[str] = Field(default_factory=list, description="Patterns removed after matching.")
    layers: list[int] | None = Field(
        None, description="Block indices to adapt (negative counts from the end); None = all."
    )
    rank_pattern: dict[str, int] = Field(default_factory=dict, description="Per-layer rank overrides.")
    alpha_pattern: dict[str, float] = Field(default_factory=dict, description="Per-layer alpha overrides.")
    train_norms: bool = Field(False, description="Also train LayerNorm weights (frozen by default).")
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full and saved with the adapter (e.g. head)."
    )
    method: Method = Field(
        "lora", description="lora: W + scale*BA; dora: a trainable magnitude per output row over the normalised "
        "direction of W + scale*BA (DoRA); adalora: scale*B diag(E) A with ranks pruned to a budget during "
        "training (AdaLoRA); molora: a gated mixture of LoRA experts (MoLoRA)."
    )
    adalora: AdaLoraOptions | None = Field(None, description="AdaLoRA's budget (method='adalora'; defaults filled).")
    molora: MoLoraOptions | None = Field(None, description="MoLoRA's experts (method='molora'; defaults filled).")
    init: Init = Field(
        "kaiming", description="kaiming: A Kaiming-uniform, B zeros; gaussian: A ~ N(0, 1/r), B zeros; pissa: A, B "
        "from W's top-r singular vectors and W replaced by the residual (PiSSA)."
    )

    @field_validator("targets", "exclude", "modules_to_save", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("rank_pattern")
    @classmethod
    def _positive_ranks(cls, value: dict[str, int]) -> dict[str, int]:
        bad = {k: v for k, v in value.items() if v < 1}
        if bad:
            raise ValueError(f"rank_pattern ranks must be >= 1, got {bad}")
        return value

    @field_validator("alpha_pattern")
    @classmethod
    def _positive_alphas(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if v <= 0}
        if bad:
            raise ValueError(f"alpha_pattern alphas must be > 0, got {bad}")
        return value

    @model_validator(mode="after")
    def _advise(self) -> AdapterConfig:
        if self.init == "pissa" and self.method != "lora":
            raise ValueError(f"init='pissa' with method={self.method!r} is not supported: PiSSA rewrites W, which "
                             f"{self.method} relies on; use method='lora' with PiSSA, or init='kaiming'")
        for method, options in (("adalora", AdaLoraOptions), ("molora", MoLoraOptions)):
            given = getattr(self, method)
            if self.method == method and given is None:
                object.__setattr__(self, method, options())
            elif self.method != method and given is not None:
                raise ValueError(f"`{method}` options are set but method={self.method!r}; set method='{method}' "
                                 f"or remove the `{method}` block")
        if self.adalora is not None and self.adalora.target_rank > self.rank:
            raise ValueError(f"adalora.target_rank={self.adalora.target_rank} exceeds rank={self.rank}, the rank "
                             "every layer starts at; AdaLoRA only prunes")
        if self.molora is not None and self.molora.top_k > self.molora.experts:
            raise ValueError(f"molora.top_k={self.molora.top_k} exceeds molora.experts={self.molora.experts}")
        if self.rank > HIGH_RANK:
            warnings.warn(
                f"rank={self.rank} is very high for an adapter (> {HIGH_RANK}); ranks 8-32 rarely lose "
                "accuracy and cost far less. Lower the rank unless you measured a gain.",
                VisloraWarning,
                stacklevel=2,
            )
        if self.alpha / self.rank < LOW_ALPHA_PER_RANK:
            warnings.warn(
                f"alpha/rank = {self.alpha}/{self.rank} = {self.alpha / self.rank:.2f} is below "
                f"{LOW_ALPHA_PER_RANK}: the adapter's updates are scaled down hard and it will learn slowly. "
                "Raise alpha (alpha = rank or 2*rank is usual) or set use_rslora=True.",
                VisloraWarning,
                stacklevel=2,
            )
        return self

    def __init__(self, **data: Any) -> None:
        """As pydantic's, but a bad value raises one ConfigError that names each field, as `parse` does."""
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(f"invalid adapter config: {_problems(exc)}") from None

    def scale_for(self, rank: int, alpha: float) -> float:
        """scale = alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> AdapterConfig:
        """A task preset (see PRESETS) with any field overridden."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
        return cls.parse({**PRESETS[name], **overrides})

    @classmethod
    def parse(cls, data: dict[str, Any]) -> AdapterConfig:
        """Validate a mapping, turning pydantic's errors into one ConfigError that names each field."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"invalid adapter config: {_problems(exc)}") from None

    @classmethod
    def load(cls, path: str | Path) -> AdapterConfig:
        """Read a config from .yaml/.yml or .json."""
        return cls.parse(read_mapping(path, "adapter config", "AdapterConfig fields, e.g. rank, alpha, targets"))

    def save(self, path: str | Path) -> None:
        """Write the config as .json, or YAML for any other suffix; atomically."""
        path = Path(path)
        data = self.model_dump(mode="json")
        text = json.dumps(data, indent=2) if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
        atomic_write_text(path, text)


def _problems(exc: ValidationError) -> str:
    """pydantic's errors as `field: message (got value)`, joined by '; '."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']} (got {err.get('input')!r})"
                     for err in exc.errors())
