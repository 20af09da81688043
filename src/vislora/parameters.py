"""Parameter report: what an adapter costs against the model and against full fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from vislora.model import AdaptedModel


@dataclass(frozen=True)
class ParameterReport:
    """Counts over one model; `base` excludes every adapter parameter and saved-module copy."""

    base: int
    adapter: int
    trainable: int
    trainable_bytes: int
    adapter_bytes: int
    per_adapter: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.base + self.adapter

    @property
    def trainable_percent(self) -> float:
        """Trainable parameters as a percentage of all parameters in the model."""
        return 100.0 * self.trainable / self.total if self.total else 0.0

    @property
    def reduction_percent(self) -> float:
        """How many fewer parameters are trained than in full fine-tuning of the base model."""
        return 100.0 * (1 - self.trainable / self.base) if self.base else 0.0

    def __str__(self) -> str:
        lines = [
            f"base parameters      {self.base:>14,}",
            f"adapter parameters   {self.adapter:>14,}",
            f"trainable parameters {self.trainable:>14,}  ({self.trainable_percent:.3f}% of "
            f"{self.total:,}; {self.reduction_percent:.1f}% fewer than full fine-tuning)",
            f"trainable size       {_bytes(self.trainable_bytes):>14}",
            f"adapter size         {_bytes(self.adapter_bytes):>14}",
        ]
        lines += [f"  adapter {name!r}: {n:,} parameters" for name, n in self.per_adapter.items()]
        return "\n".join(lines)


def parameter_report(model: nn.Module) -> ParameterReport:
    """Count base, adapter and trainable parameters of an AdaptedModel (or any nn.Module)."""
    per_adapter: dict[str, int] = {}
    adapter_ids: set[int] = set()
    if isinstance(model, AdaptedModel):
        for name in model.adapters:
            params = list(model.adapter_parameters(name))
            per_adapter[name] = sum(p.numel() for p in params)
            adapter_ids.update(id(p) for p in params)
    params = {id(p): p for p in model.parameters()}
    adapters = [p for i, p in params.items() if i in adapter_ids]
    trainable = [p for p in params.values() if p.requires_grad]
    return ParameterReport(
        base=sum(p.numel() for i, p in params.items() if i not in adapter_ids),
        adapter=sum(p.numel() for p in adapters),
        trainable=sum(p.numel() for p in trainable),
        trainable_bytes=sum(p.numel() * p.element_size() for p in trainable),
        adapter_bytes=sum(p.numel() * p.element_size() for p in adapters),
        per_adapter=per_adapter,
    )


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
