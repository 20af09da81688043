"""The numbers of one low-rank pair delta_W = scale * B @ A (A [r, in], B [out, r]), from the small factors.

With A^T = Q_a R_a and B = Q_b R_b, B A = Q_b (R_b R_a^T) Q_a^T: the singular values of B A are those of the
r x r matrix R_b R_a^T, so [out, in] is never formed. From the singular values s:
- effective rank (Roy & Vetterli 2007) = exp(H(p)), p = s / sum(s), H the Shannon entropy;
- energy rank = how many of the largest s hold `threshold` (e.g. 90%) of sum(s^2);
- rank utilisation = effective rank / rank.
"""

from __future__ import annotations

import math

import torch

from vislora.diagnostics.records import LayerDiagnostics
from vislora.targets import block_prefix


def low_rank_singular_values(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Singular values of scale * B @ A for A [r, in], B [out, r], largest first, without forming [out, in]."""
    _, r_a = torch.linalg.qr(a.detach().double().T)  # A^T (in, r) = Q_a R_a, R_a (k, r)
    _, r_b = torch.linalg.qr(b.detach().double())  # B (out, r) = Q_b R_b, R_b (k', r)
    return torch.linalg.svdvals(r_b @ r_a.T) * abs(scale)  # (k', r) @ (r, k) -> (k', k)


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp of the Shannon entropy of s / sum(s) (Roy & Vetterli 2007); 0 for an all-zero spectrum."""
    s = singular_values.double()
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(-(p * p.log()).sum().item())


def energy_rank(singular_values: torch.Tensor, threshold: float = 0.9) -> int:
    """The number of largest singular values whose squares hold `threshold` of the total; 0 if all are zero."""
    energy = singular_values.double().sort(descending=True).values ** 2
    total = energy.sum()
    if total <= 0:
        return 0
    share = energy.cumsum(0) / total
    return int((share < threshold - 1e-12).sum().item()) + 1


def analyse_pair(path: str, module: str, a: torch.Tensor, b: torch.Tensor, scale: float, method: str = "lora",
                 threshold: float = 0.9, weight: torch.Tensor | None = None, change: torch.Tensor | None = None,
                 extra_finite: bool = True) -> LayerDiagnostics:
    """Diagnostics of delta_W = scale * B @ A; `weight` [out, in] is the original W, `change` a DoRA's W' - W."""
    finite = extra_finite and bool(torch.isfinite(a).all() and torch.isfinite(b).all())
    s = low_rank_singular_values(a, b, scale) if finite else torch.zeros(0)
    delta_norm = float(s.square().sum().sqrt()) if finite else math.nan  # ||M||_F^2 = sum of s^2
    weight_norm = float(weight.detach().double().norm()) if weight is not None else None
    if change is not None:
        change_norm = float(change.detach().double().norm())
    else:
        change_norm = delta_norm if weight is not None else None
    prefix = block_prefix(path)
    return LayerDiagnostics(
        path=path, module=module, depth=int(prefix.rpartition(".")[2]) if prefix else None, method=method,
        rank=a.shape[0], scale=scale, norm_a=float(a.detach().double().norm()),
        norm_b=float(b.detach().double().norm()), delta_norm=delta_norm, singular_values=s.tolist(),
        effective_rank=effective_rank(s) if finite else math.nan,
        energy_rank=energy_rank(s, threshold) if finite else 0, finite=finite, weight_norm=weight_norm,
        change_norm=change_norm)


