"""DoRA's row norms without materialising W + scale * B A (Liu et al. 2024, "DoRA").

DoRA keeps a trainable magnitude m [out] over the normalised direction of the adapted weight:
W' = diag(m / ||W + dW||_row) (W + dW), with dW = B A (scale folded into B here). The norm is treated
as a constant in backward (the paper's section 4.3), so it is computed under no_grad. Row by row,

    ||w_i + b_i A||^2 = ||w_i||^2 + 2 b_i . (A w_i) + b_i (A A^T) b_i^T

which costs one [out, in] x [in, R] product plus [R, R] work instead of an [out, in] temporary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vislora.adapters.linear import LoraLayer


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


def layer_norms(layer: LoraLayer, name: str) -> torch.Tensor:
    """||W + delta_W|| per output row of adapter `name` on `layer`, from cached ||w_i||^2 and low-rank terms.

    While no gradient is recorded (inference) the result is cached until a tensor's version changes; in-place edits
    through `.data` bypass version counters, so training, where A and B change every step, never caches.
    """
    weight = layer.base_weight
    a, b = layer.lora_A[name], layer.lora_B[name]
    key = (a._version, b._version, weight._version, weight.data_ptr(), torch.is_inference_mode_enabled())
    cached = layer._cache.get(f"norm:{name}")
    if cached is not None and cached[0] == key and not torch.is_grad_enabled():
        return cached[1]
    with torch.no_grad():
        pair_a, pair_b = layer.folded_pair(name)
        norm = row_norms(weight, _weight_sq(layer), pair_a, pair_b)
    if not torch.is_grad_enabled():
        layer._cache[f"norm:{name}"] = (key, norm)
    return norm


def _weight_sq(layer: LoraLayer) -> torch.Tensor:
    """||w_i||^2 of the layer's base weight, cached until the weight changes."""
    weight = layer.base_weight
    key = (weight._version, weight.data_ptr(), torch.is_inference_mode_enabled())
    cached = layer._cache.get("weight_sq")
    if cached is None or cached[0] != key:
        cached = (key, squared_row_norms(weight, layer._adapter_dtype))
        layer._cache["weight_sq"] = cached
    return cached[1]
