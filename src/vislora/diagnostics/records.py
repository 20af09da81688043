"""The records diagnostics produce: per-layer figures, summaries, the verdict, the whole diagnosis."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerDiagnostics:
    """One low-rank pair: delta_W = scale * B @ A (for DoRA, `change_norm` also counts the magnitude)."""

    path: str  # module path; `<path>[q]` for one slice of a fused qkv layer
    module: str  # module type: the last path segment (`q_proj`, `fc1`), `qkv[q]` for a slice, `in_proj`
    depth: int | None  # block index, None outside the block stacks
    method: str
    rank: int
    scale: float
    norm_a: float  # ||A||_F
    norm_b: float  # ||B||_F
    delta_norm: float  # ||scale * B @ A||_F
    singular_values: list[float]  # of scale * B @ A, largest first
    effective_rank: float
    energy_rank: int
    finite: bool
    weight_norm: float | None = None  # ||W||_F of the original weight (rows of the slice)
    change_norm: float | None = None  # ||W' - W||_F, the whole change (equals delta_norm for LoRA)

    @property
    def relative_norm(self) -> float | None:
        """||W' - W||_F / ||W||_F, when the base weight is known."""
        if self.weight_norm is None or self.change_norm is None or self.weight_norm == 0:
            return None
        return self.change_norm / self.weight_norm

    @property
    def utilisation(self) -> float:
        """Effective rank / rank."""
        return self.effective_rank / self.rank

    @property
    def untrained(self) -> bool:
        return self.finite and self.norm_b == 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "relative_norm": self.relative_norm, "utilisation": self.utilisation}


@dataclass
class Stats:
    """mean, std (population), min, max of some figures."""

    mean: float
    std: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Stats | None:
        values = list(values)
        if not values:
            return None
        return cls(statistics.fmean(values), statistics.pstdev(values), min(values), max(values))


@dataclass
class GroupSummary:
    """Utilisation, effective rank and relative change over the layers of one module type or one depth."""

    layers: int
    utilisation: Stats | None
    effective_rank: Stats | None
    relative_norm: Stats | None


@dataclass
class Verdict:
    """healthy | attention | untrained | broken, with the reasons (numbers) and what to do about them."""

    status: str
    reasons: list[str] = field(default_factory=list)
    recommendations: list[str] = field(default_factory=list)


@dataclass
class Diagnosis:
    """Everything `diagnose`/`inspect_adapter` found about one adapter."""

    adapter: str
    source: str
    threshold: float
    layers: list[LayerDiagnostics]
    by_module: dict[str, GroupSummary]
    by_depth: dict[str, GroupSummary]
    verdict: Verdict

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data; NaN/Inf (a broken layer) become None."""
        return json_safe({"adapter": self.adapter, "source": self.source, "threshold": self.threshold,
                          "layers": [layer.to_dict() for layer in self.layers],
                          "by_module": {k: asdict(v) for k, v in self.by_module.items()},
                          "by_depth": {k: asdict(v) for k, v in self.by_depth.items()},
                          "verdict": asdict(self.verdict)})


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float replaced by None, so that json.dumps writes strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


