"""DoRA (Liu et al. 2024): a trainable magnitude per output row over the normalised direction of W + delta_W.

W' = diag(g) (W + dW) with g = m / ||W + dW||_row, dW = scale * B A and m [out] the magnitude (m = ||W||_row at
init, so g = 1). The norm is a constant in backward (the paper's section 4.3). The forward is
out + (g - 1) * W x + (g * scale * B) A dropout(x): dropout on the adapter branch never needs a second base matmul,
and g is folded into B's rows. The row norms never materialise W + dW: row by row,

    ||w_i + b_i A||^2 = ||w_i||^2 + 2 b_i . (A w_i) + b_i (A A^T) b_i^T

which costs one [out, in] x [in, R] product plus [R, R] work instead of an [out, in] temporary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from vislora.adapters.lora import BaseWeight, LoRA, MergePart

if TYPE_CHECKING:
    from vislora.config import AdapterConfig
    from vislora.targets import Target


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


class DoRA(LoRA):
    """LoRA plus a magnitude m [out]: W' = (m / ||W + dW||_row) (W + dW)."""

    peft_keys: ClassVar[dict[str, str]] = {**LoRA.peft_keys, "lora_magnitude": "lora_magnitude_vector"}
    peft_options: ClassVar[dict[str, Any]] = {"use_dora": True}
    exact_sum = False  # g (W + dW) - W is not low-rank
    reads_base_weight = True
    merge_alone: ClassVar[str | None] = "rescales the whole weight"

    @classmethod
    def file_shapes(cls, target: Target, config: AdapterConfig) -> dict[str, tuple[int, ...]]:
        return {**super().file_shapes(target, config), "lora_magnitude": (target.out_features,)}

    def start(self, base: BaseWeight) -> None:
        self._norms: tuple[tuple, torch.Tensor] | None = None
        self._weight_sq: tuple[tuple, torch.Tensor] | None = None
        self.lora_magnitude = nn.Parameter(self.norms(base).clone())  # g = 1 at init

    def norms(self, base: BaseWeight) -> torch.Tensor:
        """||W + delta_W|| per output row, a constant (no gradient).

        While no gradient is recorded (inference) the result is cached until a tensor's version changes; in-place edits
        through `.data` bypass version counters, so training, where A and B change every step, never caches.
        """
        weight = base.base_weight
        key = (self.lora_A._version, self.lora_B._version, weight._version, weight.data_ptr(),
               torch.is_inference_mode_enabled())
        if self._norms is not None and self._norms[0] == key and not torch.is_grad_enabled():
            return self._norms[1]
        with torch.no_grad():
            a, b = LoRA.folded_pair(self, base)
            norm = row_norms(weight, self._squared_norms(weight), a, b)
        if not torch.is_grad_enabled():
            self._norms = (key, norm)
        return norm

    def factor(self, base: BaseWeight) -> torch.Tensor:
        """g = m / ||W + delta_W||_row [out]: differentiable in the magnitude m, the norm is a constant."""
        return self.lora_magnitude / self.norms(base)

    def add(self, x: torch.Tensor, out: torch.Tensor, base_out: torch.Tensor, base: BaseWeight) -> torch.Tensor:
        g = self.factor(base)  # (out,)
        bias = base.base_bias
        plain = base_out if bias is None else base_out - bias  # W x
        out = out + ((g - 1) * plain).to(out.dtype)
        h = self.dropout(x.to(self.lora_A.dtype)) @ self.lora_A.T  # (..., in) @ (in, S*r) -> (..., S*r)
        return self.layout.add(out, h, self.layout.scale_rows(self.lora_B, g), self.scale)

    def folded_pair(self, base: BaseWeight) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, diag(g) B'): what the forward adds besides (g - 1) W."""
        a, b = LoRA.folded_pair(self, base)
        return a, self.factor(base)[:, None] * b

    def routed_pair(self, base: BaseWeight) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
        a, b = self.folded_pair(base)
        return a, b, 1.0, self.factor(base)

    def delta_weight(self, base: BaseWeight) -> torch.Tensor:
        """delta_W = scale * B @ A, before the magnitude rescales W + delta_W."""
        a, b = LoRA.folded_pair(self, base)
        return b @ a

    def merge_part(self, base: BaseWeight) -> MergePart:
        return MergePart(self.factor(base), self.delta_weight(base))

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().export_tensors(), "lora_magnitude": self.lora_magnitude.detach()}

    def change(self, base: BaseWeight) -> torch.Tensor:
        """g (W + delta_W) - W."""
        with torch.no_grad():
            weight = base.base_weight.to(self.lora_A.dtype)
            return self.factor(base)[:, None] * (weight + self.delta_weight(base)) - weight

    def _squared_norms(self, weight: torch.Tensor) -> torch.Tensor:
        """||w_i||^2 of the base weight, cached until the weight changes."""
        key = (weight._version, weight.data_ptr(), torch.is_inference_mode_enabled())
        if self._weight_sq is None or self._weight_sq[0] != key:
            self._weight_sq = (key, squared_row_norms(weight, self.lora_A.dtype))
        return self._weight_sq[1]
