"""LoRA on nn.MultiheadAttention's fused input projection, without merging weights around each forward.

The input projection W_in = [W_q; W_k; W_v] [3E, E] is a raw parameter that torch's forward reads
directly, so the wrapper runs the attention itself: qkv = x W_in^T + b_in + sum of active deltas
(whole weight, or per q/k/v block, as the adapters' layouts define them), then multi-head attention, then
`out_proj` called as a module, so that a `LoraLinear` put there adapts the output projection too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vislora.adapters.layer import LoraLayer
from vislora.targets import check_mha


class LoraMultiheadAttention(LoraLayer):
    """An nn.MultiheadAttention with named LoRA adapters on its in_proj_weight; a drop-in for its forward."""

    def __init__(self, base_layer: nn.MultiheadAttention) -> None:
        check_mha(base_layer)
        embed_dim = base_layer.embed_dim
        super().__init__(embed_dim, 3 * embed_dim, base_layer.in_proj_weight)
        self.base_layer = base_layer

    @property
    def base_weight(self) -> torch.Tensor:
        return self.base_layer.in_proj_weight

    @property
    def base_bias(self) -> torch.Tensor | None:
        return self.base_layer.in_proj_bias

    @property
    def embed_dim(self) -> int:
        return self.base_layer.embed_dim

    @property
    def num_heads(self) -> int:
        return self.base_layer.num_heads

    @property
    def batch_first(self) -> bool:
        return self.base_layer.batch_first

    @property
    def batch_dim(self) -> int:
        """Where a batched input holds the batch (what a MoLoRA gate over images needs)."""
        return 0 if self.batch_first else 1

    @property
    def _qkv_same_embed_dim(self) -> bool:
        return self.base_layer._qkv_same_embed_dim

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """nn.MultiheadAttention.forward with the active adapters added to the q/k/v projections.

        Inputs are (N, L, E) with batch_first, (L, N, E) without, or unbatched (L, E); masks and the
        returned weights follow nn.MultiheadAttention. As there, `is_causal` is a hint that attn_mask is
        the causal mask; here a missing attn_mask with is_causal means the causal mask.
        """
        batched = query.dim() == 3
        q, k, v = self._project_qkv(query, key, value)  # each (..., E) in the input layout
        q, k, v = (self._to_heads(t, batched) for t in (q, k, v))  # (N, H, L, D), (N, H, S, D) x 2
        # torch's rule: without padding or returned weights, the causal hint replaces the mask
        sdpa_causal = is_causal and key_padding_mask is None and not need_weights
        bias = None if sdpa_causal else _attention_bias(attn_mask, key_padding_mask, is_causal, q, k)
        dropout = self.base_layer.dropout if self.training else 0.0
        if need_weights:
            attn, weights = _attention_with_weights(q, k, v, bias, dropout)  # (N, H, L, D), (N, H, L, S)
            weights = weights.mean(dim=1) if average_attn_weights else weights  # (N, L, S) or (N, H, L, S)
        else:
            attn = F.scaled_dot_product_attention(q, k, v, bias, dropout, sdpa_causal)  # (N, H, L, D)
            weights = None
        attn = attn.transpose(1, 2).flatten(2)  # (N, H, L, D) -> (N, L, E)
        out = self.base_layer.out_proj(attn)  # (N, L, E); a module call, so a LoraLinear there applies
        return self._to_input_layout(out, batched), _squeeze_batch(weights, batched)

    def _in_projection(self, x: torch.Tensor) -> torch.Tensor:
        """x W_in^T + b_in + what the adapters add: (..., E) -> (..., 3E) in the input layout."""
        qkv = F.linear(x, self.base_layer.in_proj_weight, self.base_layer.in_proj_bias)  # (..., 3E)
        batch_dim = 1 if x.dim() == 3 and not self.batch_first else 0
        return self.adapt(x, qkv, batch_dim)

    def _project_qkv(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, k, v), each (..., E): one projection for self-attention, else each input's own slice."""
        if query is key is value:
            q, k, v = self._in_projection(query).chunk(3, dim=-1)  # (..., 3E) -> 3 x (..., E)
            return q, k, v
        # cross-attention: project each distinct input fully and keep its slice, so that every
        # adapter (whole-weight or sliced) lands on q, k and v exactly as in the merged weight
        k, v = self._in_projection(key).chunk(3, dim=-1)[1:]  # (..., E) x 2
        if value is not key:
            v = self._in_projection(value).chunk(3, dim=-1)[2]  # (..., E)
        q = self._in_projection(query).chunk(3, dim=-1)[0]  # (..., E)
        return q, k, v

    def _to_heads(self, x: torch.Tensor, batched: bool) -> torch.Tensor:
        """(L, E) | (L, N, E) | (N, L, E) -> (N, H, L, D)."""
        if not batched:
            x = x.unsqueeze(0)  # (1, L, E)
        elif not self.batch_first:
            x = x.transpose(0, 1)  # (N, L, E)
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (N, L, H, D) -> (N, H, L, D)

    def _to_input_layout(self, x: torch.Tensor, batched: bool) -> torch.Tensor:
        """(N, L, E) -> the layout the inputs came in."""
        if not batched:
            return x.squeeze(0)  # (L, E)
        return x if self.batch_first else x.transpose(0, 1)  # (N, L, E) or (L, N, E)


def _attention_with_weights(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, dropout: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(D) + bias), dropped out as torch does, and its product with v."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (N, H, L, D) @ (N, H, D, S) -> (N, H, L, S)
    if bias is not None:
        scores = scores + bias  # bias broadcasts from (L, S), (N, H, L, S) or (N, 1, 1, S)
    weights = scores.softmax(dim=-1)  # (N, H, L, S)
    if dropout > 0:
        weights = F.dropout(weights, p=dropout)
    return weights @ v, weights  # (N, H, L, S) @ (N, H, S, D) -> (N, H, L, D)


def _attention_bias(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    is_causal: bool,
    q: torch.Tensor,
    k: torch.Tensor,
) -> torch.Tensor | None:
    """attn_mask (L, S) | (N*H, L, S) plus key_padding_mask (N, S) | (S,) as one additive float bias.

    The result broadcasts against the scores (N, H, L, S); None when there is nothing to mask.
    """
    n, h, length, _ = q.shape
    source = k.shape[2]
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(length, source, dtype=torch.bool, device=q.device).triu(diagonal=1)
    bias = None
    if attn_mask is not None:
        _check_shape("attn_mask", attn_mask, ((length, source), (n * h, length, source)))
        bias = _as_bias(attn_mask, q.dtype)  # (L, S) or (N*H, L, S)
        bias = bias.view(n, h, length, source) if bias.dim() == 3 else bias
    if key_padding_mask is not None:
        allowed = ((n, source), (source,)) if n == 1 else ((n, source),)  # (S,) for unbatched inputs
        _check_shape("key_padding_mask", key_padding_mask, allowed)
        padding = _as_bias(key_padding_mask, q.dtype).view(n, 1, 1, source)  # (N, 1, 1, S)
        bias = padding if bias is None else bias + padding
    return bias


def _as_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = do not attend) as -inf/0; a float mask is already additive."""
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise RuntimeError(f"attention masks must be bool or floating point, got {mask.dtype}; use .bool()")
    return mask


def _check_shape(name: str, mask: torch.Tensor, allowed: tuple[tuple[int, ...], ...]) -> None:
    # the same error type as nn.MultiheadAttention, so callers written against it keep working
    if tuple(mask.shape) not in allowed:
        shapes = " or ".join(str(s) for s in allowed)
        raise RuntimeError(f"{name} has shape {tuple(mask.shape)}; this attention expects {shapes}")


def _squeeze_batch(weights: torch.Tensor | None, batched: bool) -> torch.Tensor | None:
    """Drop the batch dimension of the attention weights again for unbatched inputs."""
    return weights if weights is None or batched else weights.squeeze(0)
