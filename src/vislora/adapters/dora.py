"""DoRA's row norms without materialising W + scale * B A (Liu et al. 2024, "DoRA").

DoRA keeps a trainable magnitude m [out] over the normalised direction of the adapted weight:
W' = diag(m / ||W + dW||_row) (W + dW), with dW = B A (scale folded into B here). The norm is treated
as a constant in backward (the paper's section 4.3), so it is computed under no_grad. Row by row,

    ||w_i + b_i A||^2 = ||w_i||^2 + 2 b_i . (A w_i) + b_i (A A^T) b_i^T

which costs one [out, in] x [in, R] product plus [R, R] work instead of an [out, in] temporary.
"""

from __future__ import annotations

import torch


def row_norms(weight: torch.Tensor, weight_sq: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||W + B A||_row for W [out, in] with cached ||w_i||^2 [out], A [R, in], B [out, R] -> [out]."""
    with torch.no_grad():
        wa = weight.to(a.dtype) @ a.T  # (out, in) @ (in, R) -> (out, R): row i is A w_i
        gram = a @ a.T  # (R, in) @ (in, R) -> (R, R)
        cross = (b * wa).sum(dim=1)  # (out,)
        own = ((b @ gram) * b).sum(dim=1)  # (out, R) @ (R, R) -> (out, R) -> (out,)
        return (weight_sq + 2 * cross + own).clamp_min(0).sqrt()


def squared_row_norms(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """||w_i||^2 for every row of W [out, in] -> [out], in `dtype`."""
    with torch.no_grad():
        return weight.to(dtype).square().sum(dim=1)
