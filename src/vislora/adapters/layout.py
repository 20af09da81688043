"""Where an adapter's rows land on a weight W [out, in]: the whole weight, or chosen q/k/v blocks of a fused one.

Whole:  A [r, in], B [out, r];  delta_W = B A.
Blocks: a fused W = [W_q; W_k; W_v] (each [d, in], out = 3d) with one pair per chosen block s, stored stacked,
        A [S*r, in], B [S, d, r];  delta_W holds B_s A_s in block s's rows and zeros elsewhere.
A layout knows B's shape, how to add a low-rank term to an output, B as one dense [out, S*r] matrix, and how to scale
B's rows; the adapter methods (LoRA, DoRA, ...) use it and never branch on it.
"""

from __future__ import annotations

import torch

from vislora.targets import QKV


class Whole:
    """The pair covers every row of W."""

    blocks: tuple[int, ...] = ()
    pairs = 1

    def b_shape(self, out_features: int, rank: int) -> tuple[int, ...]:
        return (out_features, rank)

    def add(self, out: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        """out + scale * h B^T for h = A x (..., r)."""
        if out.dtype != h.dtype:  # a half-precision base under fp32 adapters
            return out + (h @ b.T * scale).to(out.dtype)  # (..., r) @ (r, out)
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), b.T, alpha=scale)
        return flat.view(out.shape)  # one GEMM that also adds: (T, r) @ (r, out) + (T, out)

    def dense(self, b: torch.Tensor) -> torch.Tensor:
        """B as one [out, R] matrix."""
        return b

    def scale_rows(self, b: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """diag(g) B for row factors g [out]."""
        return g[:, None] * b  # (out, 1) * (out, r)

    def parts(self, weight: torch.Tensor) -> list[torch.Tensor]:
        """The [rows, in] pieces of W that the pairs cover, in pair order."""
        return [weight]

    def stack(self, bs: list[torch.Tensor]) -> torch.Tensor:
        """One B from the pairs' own B [rows, r] (inverse of splitting B by pair)."""
        return bs[0]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Whole)

    def __hash__(self) -> int:
        return hash(())

    def __repr__(self) -> str:
        return "Whole()"


class Blocks(Whole):
    """One pair per chosen q/k/v block of a fused weight; `blocks` are indices into (q, k, v)."""

    def __init__(self, blocks: tuple[int, ...]) -> None:
        self.blocks = tuple(blocks)
        self.pairs = len(self.blocks)

    def b_shape(self, out_features: int, rank: int) -> tuple[int, ...]:
        return (self.pairs, out_features // len(QKV), rank)

    def add(self, out: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        h = h.unflatten(-1, (self.pairs, b.shape[-1]))  # (..., S, r)
        delta = torch.einsum("...sr,sdr->...sd", h, b) * scale  # (..., S, r) x (S, d, r) -> (..., S, d)
        blocks = out.unflatten(-1, (len(QKV), -1))  # (..., 3, d)
        index = torch.tensor(self.blocks, device=out.device)
        return blocks.index_add(-2, index, delta.to(out.dtype)).flatten(-2)

    def dense(self, b: torch.Tensor) -> torch.Tensor:
        """B [S, d, r] placed block-diagonally into (q, k, v) rows: [3d, S*r]."""
        pairs, rows, rank = b.shape
        index = torch.tensor(self.blocks, device=b.device)
        full = b.new_zeros(len(QKV), pairs, rows, rank)  # (3, S, d, r)
        full = full.index_put((index, torch.arange(pairs, device=b.device)), b)
        return full.permute(0, 2, 1, 3).reshape(len(QKV) * rows, pairs * rank)  # (3d, S*r)

    def scale_rows(self, b: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        rows = g.unflatten(0, (len(QKV), -1))[list(self.blocks)]  # (S, d)
        return rows[..., None] * b  # (S, d, 1) * (S, d, r)

    def parts(self, weight: torch.Tensor) -> list[torch.Tensor]:
        return [weight.unflatten(0, (len(QKV), -1))[s] for s in self.blocks]

    def stack(self, bs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(bs)  # (S, d, r)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Blocks) and other.blocks == self.blocks

    def __hash__(self) -> int:
        return hash(self.blocks)

    def __repr__(self) -> str:
        return f"Blocks({', '.join(QKV[s] for s in self.blocks)})"


def layout_for(blocks: tuple[int, ...]) -> Whole:
    """Whole() for no blocks, else Blocks(blocks)."""
    return Blocks(blocks) if blocks else Whole()
