"""AdaLoRA (Zhang et al. 2023): SVD-form adapters whose ranks are pruned to a global budget while training.

A layer's delta is scale * B diag(E) A: A [P*r, in] (rows: right singular vectors), B [out, r] (or [S, d, r] per q/k/v
block), E [P*r] singular values; r triplets per pair. E is folded into A wherever a pair is used, so routing, merge and
export work as for LoRA; saved, the kept triplets are an exactly equivalent plain LoRA.
The allocator keeps, per entry of A, B and E, the smoothed sensitivity I = |w * grad| (EMA beta1) and its uncertainty
U = |I - EMA(I)| (EMA beta2); a triplet's score is s(E_j) + mean_i s(A_ji) + mean_o s(B_oj) with s = EMA(I) * U. The
budget (total triplets kept) falls from the initial count to target_rank per pair on a cubic schedule between tinit and
total - tfinal; every delta_t steps the lowest-scoring triplets get E = 0. From total - tfinal on the pattern is fixed
and re-applied after every step. The training loss adds orth_reg_weight * (||A A^T - I||_F + ||B^T B - I||_F).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from vislora.adapters.layout import Whole
from vislora.adapters.lora import BaseWeight, LoRA, Pair, TrainingHooks

if TYPE_CHECKING:
    from vislora.config import AdaLoraOptions, AdapterConfig

KINDS = {"A": "lora_A", "B": "lora_B", "E": "lora_E"}  # short names in the allocator's state keys


class AdaLoRA(LoRA):
    """delta_W = scale * B diag(E) A with E pruned by the rank budget; A, B start N(0, 0.02^2), E at zero (as PEFT)."""

    grows = False
    keeps_training_state = True  # its file is the pruned LoRA; the full A, B, E and the budget go beside it

    @classmethod
    def training_hooks(cls, adapters: dict[str, LoRA], name: str, config: AdapterConfig) -> TrainingHooks:
        return RankAllocator(adapters, name, config.adalora)

    def build(self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device) -> None:
        super().build(in_features, out_features, dtype, device)
        with torch.no_grad():
            nn.init.normal_(self.lora_A, std=0.02)
            nn.init.normal_(self.lora_B, std=0.02)
        self.lora_E = nn.Parameter(torch.zeros(self.lora_A.shape[0], dtype=dtype, device=device))

    def add(self, x: torch.Tensor, out: torch.Tensor, base_out: torch.Tensor, base: BaseWeight) -> torch.Tensor:
        h = self.dropout(x.to(self.lora_A.dtype)) @ (self.lora_E[:, None] * self.lora_A).T  # (..., in) -> (..., S*r)
        return self.layout.add(out, h, self.lora_B, self.scale)

    def folded_pair(self, base: BaseWeight) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_E[:, None] * self.lora_A, self.layout.dense(self.lora_B) * self.scale

    def routed_pair(self, base: BaseWeight) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
        a, b = self.folded_pair(base)
        return a, b, 1.0, None

    def export_pair(self) -> Pair:
        """The kept triplets as a plain whole-weight pair, E folded into A: A [k, in], B [out, k]."""
        kept = self.lora_E.detach() != 0
        a = (self.lora_E[:, None] * self.lora_A).detach()
        b = self.layout.dense(self.lora_B.detach())
        return Pair(a[kept], b[:, kept], Whole(), int(kept.sum()))

    def kept(self) -> int:
        """Triplets with E != 0: the rank the adapter has now."""
        return int((self.lora_E != 0).sum())


class RankAllocator(TrainingHooks):
    """The budget of one AdaLoRA adapter over all its layers; `after_step()` runs after each optimizer step."""

    def __init__(self, adapters: dict[str, AdaLoRA], name: str, options: AdaLoraOptions) -> None:
        self.adapters, self.name, self.options = adapters, name, options
        self.initial_budget = sum(adapter.lora_E.numel() for adapter in adapters.values())
        self.target_budget = options.target_rank * sum(adapter.layout.pairs for adapter in adapters.values())
        self.ipt: dict[str, torch.Tensor] = {}  # "<path>.<kind>" -> EMA of the sensitivity
        self.unc: dict[str, torch.Tensor] = {}  # "<path>.<kind>" -> EMA of its uncertainty
        self.final_mask: dict[str, torch.Tensor] = {}  # "<path>" -> kept triplets, once the pattern is fixed

    # ------------------------------------------------------------ training hooks
    def loss(self) -> torch.Tensor | None:
        weight = self.options.orth_reg_weight
        return weight * orthogonality(self.adapters) if weight > 0 else None

    def after_step(self, step: int, total_steps: int) -> None:
        """Update the scores from this step's gradients and prune to the budget when the schedule says so."""
        final_start = total_steps - self.options.tfinal
        if step < final_start:
            self._update_scores()
            budget, mask = self.budget(step, total_steps)
            if mask:
                self._mask_to(budget)
        elif step == final_start or not self.final_mask:
            self._update_scores()
            self.final_mask = self._mask_to(self.target_budget)
            self.ipt, self.unc = {}, {}
        else:
            with torch.no_grad():
                for path, adapter in self.adapters.items():
                    adapter.lora_E.mul_(self.final_mask[path])

    def metrics(self) -> dict[str, float]:
        return {f"adalora.{self.name}.rank_budget": float(sum(self.ranks().values()))}

    # ------------------------------------------------------------ the budget
    def ranks(self) -> dict[str, int]:
        """Triplets kept per layer path."""
        return {path: adapter.kept() for path, adapter in self.adapters.items()}

    def budget(self, step: int, total_steps: int) -> tuple[int, bool]:
        """(triplets to keep, whether to mask at this step)."""
        tinit, tfinal = self.options.tinit, self.options.tfinal
        if step <= tinit:
            return self.initial_budget, False
        if step > total_steps - tfinal:
            return self.target_budget, True
        progress = 1 - (step - tinit) / max(1, total_steps - tfinal - tinit)
        budget = int((self.initial_budget - self.target_budget) * progress**3 + self.target_budget)
        return budget, step % self.options.delta_t == 0

    def _update_scores(self) -> None:
        beta1, beta2 = self.options.beta1, self.options.beta2
        with torch.no_grad():
            for path, adapter in self.adapters.items():
                for kind, attribute in KINDS.items():
                    param = getattr(adapter, attribute)
                    if param.grad is None:
                        continue
                    key = f"{path}.{kind}"
                    sensitivity = (param * param.grad).abs()
                    ipt = self.ipt.get(key, torch.zeros_like(param))
                    ipt = beta1 * ipt + (1 - beta1) * sensitivity
                    unc = self.unc.get(key, torch.zeros_like(param))
                    self.ipt[key], self.unc[key] = ipt, beta2 * unc + (1 - beta2) * (sensitivity - ipt).abs()

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Score of every triplet, per layer path: [P*r]."""
        scores = {}
        for path in self.adapters:
            if f"{path}.E" not in self.ipt:
                continue
            s = {kind: self.ipt[f"{path}.{kind}"] * self.unc[f"{path}.{kind}"] for kind in KINDS}
            b = s["B"].mean(dim=-2)  # (out, r) -> (r,) | (S, d, r) -> (S, r)
            scores[path] = s["E"] + s["A"].mean(dim=1) + b.flatten()
        return scores

    def _mask_to(self, budget: int) -> dict[str, torch.Tensor]:
        """Set E = 0 for all but the `budget` best triplets; returns the kept masks per layer.

        Exactly `budget` survive (ties broken by position): a threshold on the k-th score, as PEFT does, drops every
        triplet tied with it and can fall below the budget.
        """
        scores = self.triplet_scores()
        if not scores:
            return {}
        flat = torch.cat([s.flatten() for s in scores.values()])
        kept_flat = torch.zeros_like(flat)
        kept_flat[flat.topk(min(budget, flat.numel())).indices] = 1
        keep: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for (path, score), kept in zip(scores.items(), kept_flat.split([s.numel() for s in scores.values()]),
                                           strict=True):
                self.adapters[path].lora_E.mul_(kept.view_as(score))
                keep[path] = kept.view_as(score)
        return keep

    # ------------------------------------------------------------ resume
    def state(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume the allocation exactly, as named tensors."""
        out = {f"ipt.{k}": v for k, v in self.ipt.items()}
        out.update({f"unc.{k}": v for k, v in self.unc.items()})
        out.update({f"mask.{k}": v for k, v in self.final_mask.items()})
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.ipt = {k[4:]: v.clone() for k, v in tensors.items() if k.startswith("ipt.")}
        self.unc = {k[4:]: v.clone() for k, v in tensors.items() if k.startswith("unc.")}
        self.final_mask = {k[5:]: v.clone() for k, v in tensors.items() if k.startswith("mask.")}


def orthogonality(adapters: dict[str, AdaLoRA]) -> torch.Tensor:
    """Mean over all pairs of ||A A^T - I||_F and ||B^T B - I||_F: keeps A's rows and B's columns orthonormal."""
    terms = []
    for adapter in adapters.values():
        pairs, rank = adapter.layout.pairs, adapter.rank
        a = adapter.lora_A.view(pairs, rank, -1)  # (P, r, in)
        b = adapter.lora_B.view(pairs, -1, rank)  # (P, out, r)
        eye = torch.eye(rank, dtype=a.dtype, device=a.device)
        terms.append(torch.linalg.matrix_norm(a @ a.transpose(1, 2) - eye))  # (P,)
        terms.append(torch.linalg.matrix_norm(b.transpose(1, 2) @ b - eye))  # (P,)
    return torch.cat(terms).mean()
