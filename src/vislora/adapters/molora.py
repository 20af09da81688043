"""Mixture of LoRA experts: X low-rank experts per layer and a learned gate that mixes the top-k of them.

Per token (or per image, from the mean of its tokens) the gate scores the experts, g = x W_g^T [X]; the top-k are
mixed with softmax weights w over their scores: delta = scale * sum_e w_e B_e A_e x. All experts are computed as one
stacked low-rank product (A [X*r, in], B [X, out, r]); r is small, so the dense mixture is cheaper than dispatch.
The load-balancing loss is Switch Transformer's: X * sum_e f_e P_e, with f_e the share of top-k slots that went to
expert e and P_e its mean full-softmax probability, so the gate is pushed to use every expert.
The delta depends on the input through the gate: it cannot be merged into W, routed per sample, nor combined.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from vislora.adapters.lora import BaseWeight, LoRA, Pair, TrainingHooks
from vislora.errors import AdapterError

if TYPE_CHECKING:
    from vislora.config import AdapterConfig, MoLoraOptions
    from vislora.targets import Target

REFUSAL = ("a mixture of experts: its change of W depends on the input through the gate, so it has no single "
           "delta_W to merge, route, combine or export")


class MoLoRA(LoRA):
    """X experts A [X*r, in], B [X, out, r] and a gate [X, in]; the top-k experts of each token (or image) mixed."""

    refusal: ClassVar[str | None] = REFUSAL
    peft_keys: ClassVar[dict[str, str]] = {**LoRA.peft_keys, "lora_gate": "lora_gate.weight"}
    peft_type = "VISLORA_MOLORA"  # PEFT refuses this type instead of loading something else
    grows = False
    exact_sum = False

    def __init__(self, rank: int, scale: float, options: MoLoraOptions, dropout: float = 0.0,
                 init: str = "kaiming") -> None:
        super().__init__(rank, scale, dropout, (), init)
        self.options = options
        self.slots: torch.Tensor | None = None  # (X,) top-k slots per expert since the last read
        self.balance: torch.Tensor | None = None  # the last training forward's balance loss, with grad

    @classmethod
    def for_target(cls, target: Target, config: AdapterConfig) -> MoLoRA:
        if target.blocks:
            raise AdapterError(f"{target.path}: MoLoRA experts adapt whole weights; target the fused layer as a whole "
                               f"(role 'qkv' or its path) instead of q/k/v slices {list(target.slices)}")
        return cls(target.rank, target.scale, config.molora, config.dropout, config.init)

    @classmethod
    def file_shapes(cls, target: Target, config: AdapterConfig) -> dict[str, tuple[int, ...]]:
        experts, rank = config.molora.experts, target.rank
        return {"lora_A": (experts * rank, target.in_features), "lora_B": (experts, target.out_features, rank),
                "lora_gate": (experts, target.in_features)}

    @classmethod
    def training_hooks(cls, adapters: dict[str, LoRA], name: str, config: AdapterConfig) -> TrainingHooks:
        return GateBalance(adapters, name, config.molora.balance_weight)

    def build(self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device) -> None:
        experts = self.options.experts
        self.lora_A = nn.Parameter(self.initial_a(experts * self.rank, in_features, dtype, device))
        self.lora_B = nn.Parameter(torch.zeros(experts, out_features, self.rank, dtype=dtype, device=device))
        self.lora_gate = nn.Parameter(torch.randn(experts, in_features, dtype=dtype, device=device) * 0.02)

    def add(self, x: torch.Tensor, out: torch.Tensor, base_out: torch.Tensor, base: BaseWeight) -> torch.Tensor:
        """out + scale * sum over the gate's top-k experts of w_e B_e A_e dropout(x); records the gate's choices."""
        x = x.to(self.lora_A.dtype)
        weights, logits = self.gate_weights(x, base.batch_dim)  # (..., X) each
        h = self.dropout(x) @ self.lora_A.T  # (..., in) @ (in, X*r) -> (..., X*r)
        delta = mixture(h, self.lora_B, weights) * self.scale  # (..., out)
        counts = (weights.detach() > 0).flatten(0, -2).sum(0).float()  # (X,) top-k slots per expert
        self.slots = counts if self.slots is None else self.slots + counts
        if self.training and torch.is_grad_enabled():
            self.balance = balance_loss(weights, logits)
        return out + delta.to(out.dtype)

    def gate_weights(self, x: torch.Tensor, batch_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mixing weights (..., X) with k non-zeros per row, gate logits (..., X)) for input x (..., in)."""
        logits = x @ self.lora_gate.T  # (..., in) @ (in, X) -> (..., X)
        if self.options.gate == "image" and logits.dim() > 2:
            token_dims = [d for d in range(logits.dim() - 1) if d != batch_dim]
            logits = logits.mean(dim=token_dims, keepdim=True).expand_as(logits)  # one decision per image
        top, index = logits.topk(self.options.top_k, dim=-1)  # (..., k)
        weights = torch.zeros_like(logits).scatter(-1, index, top.softmax(dim=-1))  # (..., X)
        return weights, logits

    def expert_shares(self) -> torch.Tensor | None:
        """Each expert's share of the top-k slots since the last call (X,); resets the counts."""
        slots, self.slots = self.slots, None
        return None if slots is None or slots.sum() == 0 else slots / slots.sum()

    # ------------------------------------------------------------ what it cannot do
    def folded_pair(self, base: BaseWeight) -> tuple[torch.Tensor, torch.Tensor]:
        raise AdapterError(f"this adapter is {REFUSAL}")

    def routed_pair(self, base: BaseWeight) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
        raise AdapterError(f"this adapter is {REFUSAL}")

    def export_pair(self) -> Pair:
        raise AdapterError(f"this adapter is {REFUSAL}")

    def export_tensors(self) -> dict[str, torch.Tensor]:
        """Its own tensors as they are: experts A [X*r, in], B [X, out, r] and the gate [X, in]."""
        return {key: param.detach() for key, param in self._parameters.items()}


class GateBalance(TrainingHooks):
    """MoLoRA over all layers of one adapter: the mean balance loss of the last forward, and the experts' shares."""

    def __init__(self, adapters: dict[str, MoLoRA], name: str, weight: float) -> None:
        self.adapters, self.name, self.weight = adapters, name, weight

    def loss(self) -> torch.Tensor | None:
        balances = [a.balance for a in self.adapters.values() if a.balance is not None]
        for adapter in self.adapters.values():  # each forward's term is used once
            adapter.balance = None
        return self.weight * torch.stack(balances).mean() if balances and self.weight > 0 else None

    def metrics(self) -> dict[str, float]:
        """Each expert's share of the top-k slots, averaged over the layers that computed since the last call."""
        shares = [s for s in (a.expert_shares() for a in self.adapters.values()) if s is not None]
        if not shares:
            return {}
        mean = torch.stack(shares).mean(0)
        return {f"molora.{self.name}.expert_{e}": float(v) for e, v in enumerate(mean)}


def mixture(h: torch.Tensor, b: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_e w_e B_e h_e for h (..., X*r) = the experts' A x, B [X, out, r], weights (..., X) -> (..., out)."""
    experts, out, rank = b.shape
    mixed = h.unflatten(-1, (experts, rank)) * weights[..., None]  # (..., X, r)
    return mixed.flatten(-2) @ b.permute(0, 2, 1).reshape(experts * rank, out)  # (..., X*r) @ (X*r, out)


def balance_loss(weights: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """X * sum_e f_e P_e over all tokens: f from the top-k choices (no gradient), P from the full softmax."""
    experts = logits.shape[-1]
    chosen = (weights > 0).flatten(0, -2).float()  # (T, X)
    share = chosen.sum(0) / chosen.sum()  # (X,)
    probability = logits.flatten(0, -2).softmax(dim=-1).mean(0)  # (X,)
    return experts * (share * probability).sum()
