"""AdaLoRA (Zhang et al. 2023): SVD-form adapters whose ranks are pruned to a global budget while training.

A layer's delta is scale * B diag(E) A: A [P*r, in] (rows: right singular vectors), B [out, r] (or [S, d, r] per q/k/v
slice), E [P*r] singular values; r triplets per pair. The allocator keeps, per entry of A, B and E, the smoothed
sensitivity I = |w * grad| (EMA beta1) and its uncertainty U = |I - EMA(I)| (EMA beta2); a triplet's score is
s(E_j) + mean_i s(A_ji) + mean_o s(B_oj) with s = EMA(I) * U. The budget (total triplets kept) falls from the
initial count to target_rank per pair on a cubic schedule between tinit and total - tfinal; every delta_t steps the
lowest-scoring triplets get E = 0. From total - tfinal on the pattern is fixed and re-applied after every step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vislora.adapters.linear import LoraLayer
    from vislora.config import AdaLoraOptions

KINDS = ("A", "B", "E")


class RankAllocator:
    """The budget of one AdaLoRA adapter over all its layers; `step()` runs after each optimizer step."""

    def __init__(self, layers: dict[str, LoraLayer], name: str, options: AdaLoraOptions) -> None:
        self.layers, self.name, self.options = layers, name, options
        self.initial_budget = sum(layer.lora_E[name].numel() for layer in layers.values())
        self.target_budget = options.target_rank * sum(layer.specs[name].n_pairs for layer in layers.values())
        self.ipt: dict[str, torch.Tensor] = {}  # "<path>.<kind>" -> EMA of the sensitivity
        self.unc: dict[str, torch.Tensor] = {}  # "<path>.<kind>" -> EMA of its uncertainty
        self.final_mask: dict[str, torch.Tensor] = {}  # "<path>" -> kept triplets, once the pattern is fixed

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

    def step(self, step: int, total_steps: int) -> None:
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
                for path, layer in self.layers.items():
                    layer.lora_E[self.name].mul_(self.final_mask[path])

    def _update_scores(self) -> None:
        beta1, beta2 = self.options.beta1, self.options.beta2
        with torch.no_grad():
            for path, layer in self.layers.items():
                for kind, param in zip(KINDS, _params(layer, self.name), strict=True):
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
        for path in self.layers:
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
                self.layers[path].lora_E[self.name].mul_(kept.view_as(score))
                keep[path] = kept.view_as(score)
        return keep

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


def orthogonality(layers: dict[str, LoraLayer], name: str) -> torch.Tensor:
    """Mean over all pairs of ||A A^T - I||_F and ||B^T B - I||_F: keeps A's rows and B's columns orthonormal."""
    terms = []
    for layer in layers.values():
        spec = layer.specs[name]
        a = layer.lora_A[name].view(spec.n_pairs, spec.rank, -1)  # (P, r, in)
        b = layer.lora_B[name].view(spec.n_pairs, -1, spec.rank)  # (P, out, r)
        eye = torch.eye(spec.rank, dtype=a.dtype, device=a.device)
        terms.append(torch.linalg.matrix_norm(a @ a.transpose(1, 2) - eye))  # (P,)
        terms.append(torch.linalg.matrix_norm(b.transpose(1, 2) @ b - eye))  # (P,)
    return torch.cat(terms).mean()


def kept_ranks(layers: dict[str, LoraLayer], name: str) -> dict[str, int]:
    """Triplets with E != 0 per layer path: the ranks the adapter has now."""
    return {path: int((layer.lora_E[name] != 0).sum()) for path, layer in layers.items()}


def _params(layer: LoraLayer, name: str) -> tuple[torch.Tensor, ...]:
    return layer.lora_A[name], layer.lora_B[name], layer.lora_E[name]
