"""LoRA (Hu et al. 2021) and the contract every adapter method keeps.

One adapter of one weight W [out, in] is a module whose parameters are all of its tensors: the one list that
freezing, parameter counts, files, deletion and cache keys read. LoRA's are A [S*r, in] and B (the layout's shape,
[out, r] for a whole weight), and

    y = W x + b + scale * B (A dropout(x)),    delta_W = scale * B @ A,    scale = alpha / r (or alpha / sqrt(r)).

A starts Kaiming-uniform (as nn.Linear and PEFT do) or N(0, 1/r) ("gaussian"); B starts at zero, so the output is
unchanged at init. Other methods subclass this: DoRA, PiSSA, AdaLoRA change the forward term, the folded pair and
the merge; MoLoRA has no single delta_W and refuses merge, per-sample routing and combination (`refusal`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from vislora.adapters.layout import Whole, layout_for

if TYPE_CHECKING:
    from vislora.config import AdapterConfig
    from vislora.targets import Target

Grown = tuple[nn.Parameter, nn.Parameter, tuple[int, int]]  # (old, new, (old rank, grown dim)) for an optimizer


class BaseWeight(Protocol):
    """What an adapter reads of the layer it sits on."""

    @property
    def base_weight(self) -> torch.Tensor: ...

    @property
    def base_bias(self) -> torch.Tensor | None: ...

    batch_dim: int  # where the layer's input holds the batch


@dataclass(frozen=True)
class Pair:
    """A low-rank pair relative to the original W in `layout`: delta_W = scale * layout.dense(b) @ a."""

    a: torch.Tensor  # (S*r, in)
    b: torch.Tensor  # layout.b_shape(out, r)
    layout: Whole
    rank: int  # per block

    def dense_b(self) -> torch.Tensor:
        return self.layout.dense(self.b)  # (out, S*r)


@dataclass(frozen=True)
class MergePart:
    """What one adapter writes into W on merge: W + delta, or g * (W + delta) for a row factor g (DoRA)."""

    g: torch.Tensor | None  # (out,) DoRA's row factor, recorded so that unmerge divides by the same g
    delta: torch.Tensor  # (out, in) delta_W


class TrainingHooks:
    """What a method adds to a training loop over all layers of one adapter (AdaLoRA's budget, MoLoRA's balance)."""

    def loss(self) -> torch.Tensor | None:
        """A regulariser to add to the task loss (None: nothing)."""
        return None

    def after_step(self, step: int, total_steps: int) -> None:
        """Act on a finished optimizer step while its gradients exist."""

    def metrics(self) -> dict[str, float]:
        """Figures to log."""
        return {}

    def ranks(self) -> dict[str, int] | None:
        """The rank each layer has now, if the method changes it while training (None: as configured)."""
        return None

    def state(self) -> dict[str, torch.Tensor]:
        """What resuming needs besides the adapter's tensors, as named tensors."""
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take back what `state()` returned."""


class LoRA(nn.Module):
    """delta_W = scale * B @ A on a whole weight or on chosen q/k/v blocks of a fused one."""

    refusal: ClassVar[str | None] = None  # "adapter 'x' is <refusal>": why it has no single delta_W, so merge,
    # per-sample routing and combination refuse it
    merge_alone: ClassVar[str | None] = None  # why it cannot be merged together with other adapters of a layer
    peft_keys: ClassVar[dict[str, str]] = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}  # file key suffixes
    peft_options: ClassVar[dict[str, Any]] = {}  # PEFT LoraConfig fields this method sets
    exact_sum = True  # its change of W is low-rank, so combine(how="exact") can take it
    grows = True  # progressive rank growth can raise its rank
    holds_residual = False  # it took part of W into itself (PiSSA)
    reads_base_weight = False  # its term depends on W itself (DoRA's row norms)
    keeps_training_state = False  # training needs more than its file to go on exactly (AdaLoRA)
    peft_type = "LORA"

    def __init__(self, rank: int, scale: float, dropout: float = 0.0, blocks: tuple[int, ...] = (),
                 init: str = "kaiming") -> None:
        super().__init__()
        self.rank, self.scale, self.init_name = rank, scale, init
        self.layout = layout_for(blocks)
        self.dropout_rate = dropout
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @classmethod
    def for_target(cls, target: Target, config: AdapterConfig) -> LoRA:
        """The adapter `config` puts on `target`."""
        return cls(target.rank, target.scale, config.dropout, target.blocks, config.init)

    @classmethod
    def training_hooks(cls, adapters: dict[str, LoRA], name: str, config: AdapterConfig) -> TrainingHooks | None:
        """Hooks over all layers (path -> this method's module) of adapter `name`; None if the method needs none."""
        return None

    @classmethod
    def file_shapes(cls, target: Target, config: AdapterConfig) -> dict[str, tuple[int, ...]]:
        """The shapes of `export_tensors()` for `target` as a file holds them (q/k/v blocks stacked along the rank)."""
        rank = target.rank * max(1, len(target.slices))
        return {"lora_A": (rank, target.in_features), "lora_B": (target.out_features, rank)}

    @classmethod
    def saved_config(cls, config: AdapterConfig) -> AdapterConfig:
        """The config that describes this method's saved file."""
        return config

    # ------------------------------------------------------------ tensors
    def build(self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device) -> None:
        """Create the tensors for a weight [out_features, in_features] and initialise them."""
        self.lora_A = nn.Parameter(self.initial_a(self.layout.pairs * self.rank, in_features, dtype, device))
        self.lora_B = nn.Parameter(torch.zeros(self.layout.b_shape(out_features, self.rank), dtype=dtype,
                                               device=device))

    def initial_a(self, rows: int, in_features: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A [rows, in] drawn as `init` says: Kaiming-uniform (as nn.Linear and PEFT do) or N(0, 1/r)."""
        a = torch.empty(rows, in_features, dtype=dtype, device=device)
        if self.init_name == "gaussian":
            return nn.init.normal_(a, std=1.0 / self.rank)
        return nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def start(self, base: BaseWeight) -> None:
        """Initialise what depends on the base weight (nothing for LoRA)."""

    def versions(self) -> tuple[int, ...]:
        """Version counters of every tensor: any in-place change (an optimizer step, a load, pruning) changes one."""
        return tuple(p._version for p in self._parameters.values())

    # ------------------------------------------------------------ forward
    def add(self, x: torch.Tensor, out: torch.Tensor, base_out: torch.Tensor, base: BaseWeight) -> torch.Tensor:
        """out + this adapter's term for input x (..., in); base_out = W x + b."""
        h = self.dropout(x.to(self.lora_A.dtype)) @ self.lora_A.T  # (..., in) @ (in, S*r) -> (..., S*r)
        return self.layout.add(out, h, self.lora_B, self.scale)

    # ------------------------------------------------------------ the adapter as matrices
    def folded_pair(self, base: BaseWeight) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [R, in], B' [out, R]) with delta_W = B' @ A: the scale folded into B', blocks as a block-sparse B'."""
        return self.lora_A, self.layout.dense(self.lora_B) * self.scale

    def routed_pair(self, base: BaseWeight) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
        """(A [R, in], B [out, R], factor still to apply to B, DoRA's g [out] or None) for per-sample routing. A
        whole-weight pair is the adapter's own tensors, scaled once with the whole stack: a server mixes adapters
        anew in every batch, and folding each first would double the work."""
        return self.lora_A, self.layout.dense(self.lora_B), self.scale, None

    def delta_weight(self, base: BaseWeight) -> torch.Tensor:
        """delta_W = scale * B @ A as a dense [out, in] matrix (zero rows outside chosen blocks)."""
        a, b = self.folded_pair(base)
        return b @ a  # (out, R) @ (R, in)

    def merge_part(self, base: BaseWeight) -> MergePart:
        return MergePart(None, self.delta_weight(base))

    def export_pair(self) -> Pair:
        """The pair relative to the original W, in this adapter's layout, unscaled."""
        return Pair(self.lora_A.detach(), self.lora_B.detach(), self.layout, self.rank)

    def export_tensors(self) -> dict[str, torch.Tensor]:
        """What a file holds for this adapter, by tensor name (see `peft_keys`): the export pair, and any other."""
        pair = self.export_pair()
        return {"lora_A": pair.a, "lora_B": pair.b}

    def import_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the tensors from `export_tensors()`'s form (checked shapes)."""
        with torch.no_grad():
            for key, value in tensors.items():
                self._parameters[key].copy_(value)

    def change(self, base: BaseWeight) -> torch.Tensor:
        """What this adapter does to the original W, dense [out, in]."""
        with torch.no_grad():
            pair = self.export_pair()
            return (pair.dense_b() * self.scale) @ pair.a  # (out, R) @ (R, in)

    # ------------------------------------------------------------ progressive rank
    def grow(self, rank: int) -> list[Grown]:
        """Raise the rank to `rank` without changing the output: new rows of A drawn like a fresh adapter's, new
        columns of B zero, the scale kept. Returns (old, new, (old rank, grown dim)) for A and B."""
        extra, pairs = rank - self.rank, self.layout.pairs
        old_a, old_b = self.lora_A, self.lora_B
        fresh = torch.empty(pairs * extra, old_a.shape[1], dtype=old_a.dtype, device=old_a.device)
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))
        with torch.no_grad():
            a = torch.cat([old_a.view(pairs, self.rank, -1), fresh.view(pairs, extra, -1)], dim=1)  # (S, r', in)
            b = torch.cat([old_b, old_b.new_zeros(*old_b.shape[:-1], extra)], dim=-1)  # (..., r + extra)
        self.lora_A = nn.Parameter(a.flatten(0, 1), requires_grad=old_a.requires_grad)
        self.lora_B = nn.Parameter(b, requires_grad=old_b.requires_grad)
        grown = [(old_a, self.lora_A, (self.rank, 1)), (old_b, self.lora_B, (self.rank, -1))]
        self.rank = rank
        return grown

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, layout={self.layout}, dropout={self.dropout_rate:g}"

