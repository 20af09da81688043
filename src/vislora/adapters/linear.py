"""LoRA and DoRA on nn.Linear, including one low-rank pair per chosen slice (q|k|v) of a fused qkv layer.

For a whole weight W [out, in]:   y = W x + b + scale * B (A dropout(x)),  A [r, in], B [out, r].
For slices of a fused W = [W_q; W_k; W_v] (each [d, in]) every chosen slice s gets its own pair
A_s [r, in], B_s [d, r]; they are stored stacked: A [S*r, in], B [S, d, r].

DoRA (`method="dora"`): y = b + g * (W x + scale * B A x) with g = m / ||W + scale * B A||_row, the norm
detached as in the paper. It is computed as out + (g - 1) * W x + (g * scale * B) A dropout(x): dropout on
the adapter branch never needs a second base matmul, and g is folded into B's rows.

PiSSA (`init="pissa"`): the pair starts on W's principal singular directions and the base weight becomes
W_res = W - scale * B0 A0. The layer keeps (A0, B0) as its residual and adds scale * B0 A0 x back whenever
its owner is not among the adapters computing, so other adapters and `disabled()` still see W.

AdaLoRA (`method="adalora"`): delta_W = scale * B diag(E) A; E [S*r] is folded into A wherever a pair is used, so
routing, merge and export work unchanged (see adapters/adalora.py for the budget). MoLoRA (`method="molora"`):
X experts A [X*r, in], B [X, out, r] mixed by a gate [X, in] (adapters/molora.py); input-dependent, never merged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from vislora.adapters import dora, molora
from vislora.adapters.pissa import start_from_principal
from vislora.config import MoLoraOptions
from vislora.errors import AdapterError
from vislora.targets import QKV

if TYPE_CHECKING:
    from vislora.adapters.routing import Route


@dataclass(frozen=True)
class PairSpec:
    """Shape, scaling and kind of one named adapter on one weight."""

    rank: int
    scale: float
    dropout: float
    slices: tuple[int, ...] = ()  # indices into (q, k, v); () = the whole weight
    init: str = "kaiming"
    method: str = "lora"  # "lora" | "dora" | "adalora" | "molora"
    molora: MoLoraOptions | None = None  # experts, top-k and gate of a MoLoRA adapter

    @property
    def n_pairs(self) -> int:
        """Low-rank pairs stored stacked in A: one per q/k/v slice, or one per expert."""
        return self.molora.experts if self.molora else max(1, len(self.slices))


@dataclass(frozen=True)
class MergeRecord:
    """What merge() wrote into W, so that unmerge() takes exactly that out again."""

    names: tuple[str, ...]
    residual: bool  # the PiSSA residual was added back (its owner was not merged)
    dora_factor: torch.Tensor | None  # g [out] of a merged DoRA adapter: W' = g * (W + dW)


class LoraLayer(nn.Module):
    """Named low-rank updates of one base weight [out_features, in_features].

    `active` lists the adapters a plain forward adds; `route` (set by AdaptedModel for one call) replaces
    it with a per-sample choice; after merge() the forward is the base layer's alone.
    """

    is_vislora_wrapper = True  # targets.logical_modules looks through it to `base_layer`

    def __init__(self, in_features: int, out_features: int, weight: torch.Tensor) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude = nn.ParameterDict()  # DoRA adapters only
        self.lora_E = nn.ParameterDict()  # AdaLoRA's singular values
        self.lora_gate = nn.ParameterDict()  # MoLoRA's gates
        self.lora_dropout = nn.ModuleDict()
        self.expert_stats: dict[str, molora.ExpertStats] = {}
        self.specs: dict[str, PairSpec] = {}
        self.active: tuple[str, ...] = ()
        self.merge_record: MergeRecord | None = None
        self.route: Route | None = None
        self.path = ""  # set by AdaptedModel; names the layer in errors
        self.batch_dim = 0  # where this layer's input holds the batch (1 in sequence-first blocks)
        self.residual_owner: str | None = None  # the PiSSA adapter whose residual W lacks
        self.register_buffer("residual_A", None, persistent=False)
        self.register_buffer("residual_B", None, persistent=False)
        # half-precision bases keep fp32 adapters: low-rank updates underflow in fp16/bf16
        self._adapter_dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        self._device = weight.device
        self._cache: dict[str, tuple[tuple, object]] = {}

    # ------------------------------------------------------------ the base layer (subclasses say which)
    @property
    def base_weight(self) -> torch.Tensor:
        """The frozen weight W [out, in] that the adapters update."""
        raise NotImplementedError

    @property
    def base_bias(self) -> torch.Tensor | None:
        raise NotImplementedError

    @property
    def merged(self) -> tuple[str, ...]:
        return self.merge_record.names if self.merge_record else ()

    # ------------------------------------------------------------ adding and removing adapters
    def add_adapter(self, name: str, spec: PairSpec) -> None:
        self._check_combination(name, spec)
        kwargs = {"dtype": self._adapter_dtype, "device": self._device}
        a = torch.empty(spec.n_pairs * spec.rank, self.in_features, **kwargs)
        stacked = (spec.n_pairs,) if spec.slices or spec.molora else ()
        b = torch.zeros(*stacked, self._rows(spec), spec.rank, **kwargs)
        if spec.method == "adalora":  # PEFT's AdaLoRA start: P, Q small, singular values zero
            nn.init.normal_(a, std=0.02)
            nn.init.normal_(b, std=0.02)
            self.lora_E[name] = nn.Parameter(torch.zeros(a.shape[0], **kwargs))
        elif spec.init == "gaussian":
            nn.init.normal_(a, std=1.0 / spec.rank)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear and PEFT do
        if spec.molora:
            self.lora_gate[name] = nn.Parameter(torch.randn(spec.molora.experts, self.in_features, **kwargs) * 0.02)
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        self.lora_dropout[name] = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.specs[name] = spec
        if spec.init == "pissa":
            start_from_principal(self, name)
        if spec.method == "dora":
            self.lora_magnitude[name] = nn.Parameter(dora.layer_norms(self, name).clone())  # g = 1 at init

    def delete_adapter(self, name: str) -> None:
        if name == self.residual_owner:
            self.release()
        for store in (self.lora_A, self.lora_B, self.lora_magnitude, self.lora_E, self.lora_gate, self.lora_dropout):
            if name in store:
                del store[name]
        self.expert_stats.pop(name, None)
        del self.specs[name]
        self.active = tuple(n for n in self.active if n != name)
        self._cache.clear()

    def release(self) -> None:
        """Give W back its PiSSA residual (W_res + scale * B0 A0 = W) unless a merge already accounts for it."""
        if self.residual_owner is None:
            return
        if self.merge_record is None:
            weight = self.base_weight
            with torch.no_grad():
                weight += self._residual_delta().to(weight.dtype)
        self.residual_owner = self.residual_A = self.residual_B = None

    def _check_combination(self, name: str, spec: PairSpec) -> None:
        if spec.molora and spec.slices:
            raise AdapterError(f"{self.path}: MoLoRA experts adapt whole weights; target the fused layer as a whole "
                               f"(role 'qkv' or its path) instead of q/k/v slices for {name!r}")
        has_dora = any(s.method == "dora" for s in self.specs.values())
        if spec.init == "pissa" and self.residual_owner is not None:
            raise AdapterError(f"{self.path}: adapter {self.residual_owner!r} already holds a PiSSA residual of this "
                               f"weight; {name!r} cannot start from it too. Use init='kaiming' for {name!r}.")
        if (spec.init == "pissa" and has_dora) or (spec.method == "dora" and self.residual_owner is not None):
            raise AdapterError(f"{self.path}: DoRA and PiSSA adapters cannot share a layer (DoRA normalises W, which "
                               f"PiSSA rewrites); put {name!r} on other targets or change its init/method")

    # ------------------------------------------------------------ forward
    def adapt(self, x: torch.Tensor, out: torch.Tensor, batch_dim: int = 0) -> torch.Tensor:
        """out = W x + b for input x, plus what the adapters add (nothing once merged)."""
        if self.merge_record is not None:
            return out
        if self.route is not None:
            return self.route.adapt(self, x, out, batch_dim)
        base_out = out
        if self.residual_owner is not None and self.residual_owner not in self.active:
            out = self.add_residual(x, out)
        for name in self.active:
            out = self.add_delta(name, x, out, base_out, batch_dim)
        return out

    def add_delta(
        self, name: str, x: torch.Tensor, out: torch.Tensor, base_out: torch.Tensor, batch_dim: int = 0
    ) -> torch.Tensor:
        """out + adapter `name`'s contribution; `base_out` = W x + b, which DoRA rescales."""
        spec, a, b = self.specs[name], self.lora_A[name], self.lora_B[name]
        if spec.method == "molora":
            return molora.add_experts(self, name, x, out, batch_dim)
        if spec.method == "adalora":
            a = self.lora_E[name][:, None] * a  # B diag(E) A
        elif spec.method == "dora":
            g = self.dora_factor(name)  # (out,)
            out = out + ((g - 1) * self.without_bias(base_out)).to(out.dtype)
            b = self.scale_rows(b, g, spec)
        return self.add_low_rank(x, out, a, b, spec, self.lora_dropout[name])

    def add_residual(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out + scale * B0 A0 x: the part of W that PiSSA moved into its adapter."""
        return self.add_low_rank(x, out, self.residual_A, self.residual_B, self.specs[self.residual_owner])

    def add_low_rank(
        self, x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, spec: PairSpec,
        dropout: nn.Module | None = None,
    ) -> torch.Tensor:
        """out + scale * B A dropout(x), on the whole output or on the chosen q/k/v slices."""
        h = (dropout(x.to(a.dtype)) if dropout is not None else x.to(a.dtype)) @ a.T  # (..., in) @ (in, S*r)
        if not spec.slices:
            if out.dtype != h.dtype:
                return out + (h @ b.T * spec.scale).to(out.dtype)  # (..., r) @ (r, out)
            flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), b.T, alpha=spec.scale)
            return flat.view(out.shape)  # one GEMM that also adds: (T, r) @ (r, out) + (T, out)
        h = h.unflatten(-1, (len(spec.slices), spec.rank))  # (..., S, r)
        delta = torch.einsum("...sr,sdr->...sd", h, b) * spec.scale  # (..., S, r) x (S, d, r) -> (..., S, d)
        blocks = out.unflatten(-1, (len(QKV), -1))  # (..., 3, d)
        index = torch.tensor(spec.slices, device=out.device)
        return blocks.index_add(-2, index, delta.to(out.dtype)).flatten(-2)

    def without_bias(self, base_out: torch.Tensor) -> torch.Tensor:
        return base_out if self.base_bias is None else base_out - self.base_bias

    # ------------------------------------------------------------ training
    def training_metrics(self) -> dict[str, float]:
        """Figures about this layer's adapters to log while training (MoLoRA: each expert's share of the gate's top-k
        slots since the last call)."""
        return molora.expert_shares(self.expert_stats)

    # ------------------------------------------------------------ the adapters as matrices
    def folded_pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [R, in], B' [out, R]) with delta_W = B' @ A: scale (and AdaLoRA's E) folded in, slices as a
        block-sparse B'."""
        spec = self.specs[name]
        if spec.method == "molora":
            raise AdapterError(f"adapter {name!r} is a mixture of experts: its change of W depends on the input "
                               "through the gate, so it has no single delta_W to merge, route, combine or export")
        a = self.lora_E[name][:, None] * self.lora_A[name] if spec.method == "adalora" else self.lora_A[name]
        return a, self.dense_b(self.lora_B[name], spec) * spec.scale

    def dense_b(self, b: torch.Tensor, spec: PairSpec) -> torch.Tensor:
        """B as one [out, S*r] matrix: per-slice B [S, d, r] placed block-diagonally into (q, k, v) rows."""
        if not spec.slices:
            return b
        n_slices, rows, rank = b.shape
        index = torch.tensor(spec.slices, device=b.device)
        blocks = b.new_zeros(len(QKV), n_slices, rows, rank)  # (3, S, d, r)
        blocks = blocks.index_put((index, torch.arange(n_slices, device=b.device)), b)
        return blocks.permute(0, 2, 1, 3).reshape(len(QKV) * rows, n_slices * rank)  # (3d, S*r)

    def scale_rows(self, b: torch.Tensor, g: torch.Tensor, spec: PairSpec) -> torch.Tensor:
        """diag(g) B for output-row factors g [out], in B's own layout."""
        if not spec.slices:
            return g[:, None] * b  # (out, 1) * (out, r)
        rows = g.unflatten(0, (len(QKV), -1))[list(spec.slices)]  # (S, d)
        return rows[..., None] * b  # (S, d, 1) * (S, d, r)

    def delta_weight(self, name: str) -> torch.Tensor:
        """delta_W = scale * B @ A as a dense [out, in] matrix (zero rows outside chosen slices)."""
        a, b = self.folded_pair(name)
        return b @ a  # (out, R) @ (R, in)

    def _residual_delta(self) -> torch.Tensor:
        spec = self.specs[self.residual_owner]
        return (self.dense_b(self.residual_B, spec) * spec.scale) @ self.residual_A

    def export_pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(A, B, rank per pair) in the stored layout, relative to the original W.

        For a PiSSA adapter that is [A; A0] and [B, -B0] (rank 2r): scale * (B A - B0 A0) is exactly what it
        changed in W, so the pair loads onto an untouched base model. For AdaLoRA: the kept triplets as a plain
        pair, E folded into A, in the whole-weight layout (A [k, in], B [out, k]).
        """
        spec, a, b = self.specs[name], self.lora_A[name].detach(), self.lora_B[name].detach()
        if spec.method == "adalora":
            a, b = self.folded_pair(name)
            kept = self.lora_E[name].detach() != 0
            return a.detach()[kept], (b.detach() / spec.scale)[:, kept], int(kept.sum())
        if name != self.residual_owner:
            return a, b, spec.rank
        pairs, rank = spec.n_pairs, spec.rank
        a2 = torch.cat([a.view(pairs, rank, -1), self.residual_A.view(pairs, rank, -1)], dim=1).flatten(0, 1)
        b2 = torch.cat([b, -self.residual_B], dim=-1)  # (out, 2r) | (S, d, 2r)
        return a2, b2, 2 * rank

    def change(self, name: str) -> torch.Tensor:
        """What adapter `name` does to the original W, dense [out, in]: its delta_W (for a PiSSA adapter the
        delta from its starting point), or g (W + delta_W) - W for DoRA."""
        spec = self.specs[name]
        with torch.no_grad():
            if spec.method == "dora":
                weight = self.base_weight.to(self._adapter_dtype)
                return self.dora_factor(name)[:, None] * (weight + self.delta_weight(name)) - weight
            a, b = self.export_dense(name)
            return (b * spec.scale) @ a  # (out, R) @ (R, in)

    def export_dense(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """export_pair with B as one dense [out, R] matrix (q/k/v slices block-sparse); the scale not folded in."""
        spec = self.specs[name]
        a, b, _ = self.export_pair(name)
        return a, b if spec.method == "adalora" else self.dense_b(b, spec)  # AdaLoRA exports dense already

    def import_pair(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Set adapter `name` from a pair in the stored layout relative to the original W (export_pair's inverse).

        For a PiSSA adapter the pair is [A; A0], [B, -B0]: (A0, B0) must be this layer's residual, else the file
        started from another base weight and loading it would be wrong.
        """
        if name == self.residual_owner:
            spec = self.specs[name]
            pairs, rank = spec.n_pairs, spec.rank
            stacked = a.reshape(pairs, 2 * rank, -1)  # (S, 2r, in)
            start_a, start_b = stacked[:, rank:].flatten(0, 1), -b[..., rank:]
            if not (torch.allclose(start_a, self.residual_A, rtol=1e-4, atol=1e-6)
                    and torch.allclose(start_b, self.residual_B, rtol=1e-4, atol=1e-6)):
                raise AdapterError(f"{self.path}: the saved PiSSA adapter {name!r} started from another base weight "
                                   "than this model's; load it onto a fresh base model with vislora.load_adapter")
            a, b = stacked[:, :rank].flatten(0, 1), b[..., :rank]
        with torch.no_grad():
            self.lora_A[name].copy_(a)
            self.lora_B[name].copy_(b)

    # ------------------------------------------------------------ DoRA
    def dora_factor(self, name: str) -> torch.Tensor:
        """g = m / ||W + delta_W||_row [out]: differentiable in the magnitude m, the norm is a constant."""
        return self.lora_magnitude[name] / dora.layer_norms(self, name)

    # ------------------------------------------------------------ merge
    def merged_weight(self, names: tuple[str, ...]) -> torch.Tensor:
        """W with `names` merged in: W_res + residual (unless its owner merges) + sum of deltas; DoRA g (W + dW)."""
        weight = self.base_weight.detach().to(self._adapter_dtype)
        for name in names:
            self.folded_pair(name)  # a MoLoRA adapter refuses here, before anything is computed
        dora_names = [n for n in names if self.specs[n].method == "dora"]
        with torch.no_grad():
            if dora_names:
                if len(names) > 1:
                    raise AdapterError(f"{self.path}: cannot merge {list(names)} together: DoRA adapter "
                                       f"{dora_names[0]!r} rescales the whole weight; merge it on its own")
                name = dora_names[0]
                return self.dora_factor(name)[:, None] * (weight + self.delta_weight(name))
            if self.residual_owner is not None and self.residual_owner not in names:
                weight = weight + self._residual_delta()
            return weight + sum((self.delta_weight(n) for n in names), torch.zeros_like(weight))

    def merge(self, names: tuple[str, ...]) -> None:
        """W := merged_weight(names); the forward then costs what the base layer costs."""
        weight = self.base_weight
        dora_factor = None
        if any(self.specs[n].method == "dora" for n in names):
            dora_factor = self.dora_factor(names[0]).detach().clone()
        record = MergeRecord(names, self.residual_owner is not None and self.residual_owner not in names,
                             dora_factor)
        with torch.no_grad():
            weight.copy_(self.merged_weight(names).to(weight.dtype))
        self.merge_record, self.active = record, ()

    def unmerge(self) -> tuple[str, ...]:
        """Take out exactly what merge() put in (up to float rounding); returns the adapters that were merged."""
        record, weight = self.merge_record, self.base_weight
        if record is None:
            return ()
        with torch.no_grad():
            current = weight.to(self._adapter_dtype)
            if record.dora_factor is not None:
                restored = current / record.dora_factor[:, None] - self.delta_weight(record.names[0])
            else:
                restored = current - sum((self.delta_weight(n) for n in record.names), torch.zeros_like(current))
                if record.residual:
                    restored = restored - self._residual_delta()
            weight.copy_(restored.to(weight.dtype))
        self.merge_record = None
        return record.names

    def _rows(self, spec: PairSpec) -> int:
        return self.out_features // len(QKV) if spec.slices else self.out_features


class LoraLinear(LoraLayer):
    """An nn.Linear with named LoRA adapters: forward = base + each active (unmerged) adapter."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer.in_features, base_layer.out_features, base_layer.weight)
        self.base_layer = base_layer

    @property
    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def base_bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapt(x, self.base_layer(x), self.batch_dim)
