"""PiSSA initialisation (Meng et al. 2024): start the adapter on W's principal singular directions.

With W = U S V^T and the top r triplets, A0 = sqrt(S_r / scale) V_r^T [r, in], B0 = U_r sqrt(S_r / scale)
[out, r], so scale * B0 A0 is W's best rank-r approximation. The base weight becomes the residual
W_res = W - scale * B0 A0 and the model's output is unchanged at initialisation.
"""

from __future__ import annotations

import torch


def principal_pair(weight: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 [r, in], B0 [out, r]) with scale * B0 @ A0 = the best rank-r approximation of W [out, in]."""
    if rank > min(weight.shape):
        raise ValueError(f"PiSSA rank {rank} exceeds the weight's smallest dimension {min(weight.shape)}")
    with torch.no_grad():
        u, s, vh = torch.linalg.svd(weight.to(torch.float32), full_matrices=False)
        root = (s[:rank] / scale).sqrt()  # (r,)
        return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]  # (r, in), (out, r)
