"""PiSSA (Meng et al. 2024): LoRA started on W's principal singular directions, W keeping only the residual.

With W = U S V^T and the top r triplets, A0 = sqrt(S_r / scale) V_r^T [r, in], B0 = U_r sqrt(S_r / scale) [out, r],
so scale * B0 A0 is W's best rank-r approximation (per q/k/v block when the adapter has blocks). The base weight
becomes the residual W_res = W - scale * B0 A0 and the output is unchanged at init. The adapter keeps (A0, B0) and
its layer adds scale * B0 A0 x back (`Residual`) whenever the adapter is not among those computing, so other adapters
and `disabled()` still see W; deleting the adapter gives W its residual back.
Saved, it is the plain LoRA of rank 2r relative to the untouched W, [A; A0] and [B, -B0], as PEFT's conversion
writes it, so the file loads onto the original model.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from vislora.adapters.lora import BaseWeight, LoRA, Pair
from vislora.errors import AdapterError, ConfigError

if TYPE_CHECKING:
    from vislora.config import AdapterConfig


def principal_pair(weight: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 [r, in], B0 [out, r]) with scale * B0 @ A0 = the best rank-r approximation of W [out, in]."""
    if rank > min(weight.shape):
        raise ConfigError(f"PiSSA rank {rank} exceeds the weight's smallest dimension {min(weight.shape)} "
                          f"(weight {tuple(weight.shape)}); lower the rank or use init='kaiming'")
    with torch.no_grad():
        u, s, vh = torch.linalg.svd(weight.to(torch.float32), full_matrices=False)
        root = (s[:rank] / scale).sqrt()  # (r,)
        return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]  # (r, in), (out, r)


class Residual:
    """The part of W a PiSSA adapter took into itself, as a forward term: out + scale * B0 A0 x."""

    def __init__(self, owner: PiSSA) -> None:
        self.owner = owner

    def add(self, x: torch.Tensor, out: torch.Tensor, base_out: torch.Tensor, base: BaseWeight) -> torch.Tensor:
        a0 = self.owner.residual_A
        return self.owner.layout.add(out, x.to(a0.dtype) @ a0.T, self.owner.residual_B, self.owner.scale)


class PiSSA(LoRA):
    """LoRA initialised from W's principal directions, holding the residual it took from W."""

    holds_residual = True
    grows = False

    @classmethod
    def saved_config(cls, config: AdapterConfig) -> AdapterConfig:
        """A plain LoRA of twice the rank (PEFT's conversion: alpha doubled, or times sqrt(2) with rsLoRA)."""
        factor = math.sqrt(2) if config.use_rslora else 2.0
        return config.model_copy(update={
            "rank": 2 * config.rank, "alpha": factor * config.alpha, "init": "kaiming",
            "rank_pattern": {k: 2 * v for k, v in config.rank_pattern.items()},
            "alpha_pattern": {k: factor * v for k, v in config.alpha_pattern.items()},
        })

    def start(self, base: BaseWeight) -> None:
        """Take W's principal part into (A, B) and keep it as the residual (A0, B0); W becomes W_res."""
        weight = base.base_weight
        pairs = [principal_pair(part, self.rank, self.scale) for part in self.layout.parts(weight)]
        a = torch.cat([pa for pa, _ in pairs])  # (S*r, in)
        b = self.layout.stack([pb for _, pb in pairs])  # (S, d, r) | (out, r)
        with torch.no_grad():
            self.lora_A.copy_(a)
            self.lora_B.copy_(b)
        self.register_buffer("residual_A", a.to(self.lora_A.dtype), persistent=False)
        self.register_buffer("residual_B", b.to(self.lora_A.dtype), persistent=False)
        self.residual = Residual(self)
        with torch.no_grad():
            weight -= self.residual_delta().to(weight.dtype)

    def residual_delta(self) -> torch.Tensor:
        """scale * B0 @ A0, dense [out, in]."""
        return (self.layout.dense(self.residual_B) * self.scale) @ self.residual_A

    def release(self, base: BaseWeight) -> None:
        """Give W its residual back: W_res + scale * B0 A0 = W."""
        weight = base.base_weight
        with torch.no_grad():
            weight += self.residual_delta().to(weight.dtype)

    def export_pair(self) -> Pair:
        """[A; A0] and [B, -B0] at rank 2r: scale * (B A - B0 A0) is exactly what the adapter changed in W."""
        pairs, rank = self.layout.pairs, self.rank
        a, b = self.lora_A.detach(), self.lora_B.detach()
        a2 = torch.cat([a.view(pairs, rank, -1), self.residual_A.view(pairs, rank, -1)], dim=1).flatten(0, 1)
        b2 = torch.cat([b, -self.residual_B], dim=-1)  # (out, 2r) | (S, d, 2r)
        return Pair(a2, b2, self.layout, 2 * rank)

    def import_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take [A; A0], [B, -B0]: (A0, B0) must be this adapter's residual, else the file started from another W."""
        pairs, rank = self.layout.pairs, self.rank
        stacked = tensors["lora_A"].reshape(pairs, 2 * rank, -1)  # (S, 2r, in)
        start_a, start_b = stacked[:, rank:].flatten(0, 1), -tensors["lora_B"][..., rank:]
        if not (torch.allclose(start_a, self.residual_A, rtol=1e-4, atol=1e-6)
                and torch.allclose(start_b, self.residual_B, rtol=1e-4, atol=1e-6)):
            raise AdapterError("the saved PiSSA adapter started from another base weight than this model's; load "
                               "it onto a fresh base model with vislora.load_adapter")
        super().import_tensors({"lora_A": stacked[:, :rank].flatten(0, 1), "lora_B": tensors["lora_B"][..., :rank]})
