"""PiSSA initialisation (Meng et al. 2024): start the adapter on W's principal singular directions.

With W = U S V^T and the top r triplets, A0 = sqrt(S_r / scale) V_r^T [r, in], B0 = U_r sqrt(S_r / scale)
[out, r], so scale * B0 A0 is W's best rank-r approximation. The base weight becomes the residual
W_res = W - scale * B0 A0 and the model's output is unchanged at initialisation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vislora.targets import QKV

if TYPE_CHECKING:
    from vislora.adapters.linear import LoraLayer


def principal_pair(weight: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 [r, in], B0 [out, r]) with scale * B0 @ A0 = the best rank-r approximation of W [out, in]."""
    if rank > min(weight.shape):
        raise ValueError(f"PiSSA rank {rank} exceeds the weight's smallest dimension {min(weight.shape)}")
    with torch.no_grad():
        u, s, vh = torch.linalg.svd(weight.to(torch.float32), full_matrices=False)
        root = (s[:rank] / scale).sqrt()  # (r,)
        return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]  # (r, in), (out, r)


def start_from_principal(layer: LoraLayer, name: str) -> None:
    """Initialise adapter `name` on W's principal directions (per q/k/v slice if it has slices), make W the
    residual, and record (A0, B0) on the layer so the original W can always be restored."""
    spec = layer.specs[name]
    weight = layer.base_weight
    blocks = [weight] if not spec.slices else [weight.unflatten(0, (len(QKV), -1))[s] for s in spec.slices]
    pairs = [principal_pair(block, spec.rank, spec.scale) for block in blocks]
    a = torch.cat([pa for pa, _ in pairs])  # (S*r, in)
    b = torch.stack([pb for _, pb in pairs]) if spec.slices else pairs[0][1]  # (S, d, r) | (out, r)
    with torch.no_grad():
        layer.lora_A[name].copy_(a)
        layer.lora_B[name].copy_(b)
    layer.residual_owner = name
    layer.residual_A, layer.residual_B = a.to(layer._adapter_dtype), b.to(layer._adapter_dtype)
    with torch.no_grad():
        weight -= layer._residual_delta().to(weight.dtype)
