"""PEFT's layout of adapter tensors, and the exact equivalents written for shapes PEFT has no word for.

Keys are `base_model.model.<module>.lora_A.weight` [r, in], `.lora_B.weight` [out, r] and, for DoRA,
`.lora_magnitude_vector` [out], where <module> is
- the target's own path for a Linear;
- `<mha>` for an nn.MultiheadAttention's input projection and `<mha>.base_layer.out_proj` for its out_proj: both
  pairs zero-padded to one rank and B rescaled to one shared scale, as PEFT adapts the attention as one module;
- the owning module for a raw weight parameter (PEFT's `target_parameters`), whose adapted child modules PEFT then
  keys under `<owner>.base_layer.<child>` (a module with several adapted raw weights keys each as `<owner>.<name>`,
  which only vislora reads).
q/k/v blocks of a fused layer are written as one stacked-rank LoRA on the fused weight: A [S*r, in] and a
block-sparse B [3d, S*r]; rank_pattern/alpha_pattern make PEFT's scale equal ours.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from vislora.errors import AdapterFileError
from vislora.targets import QKV, Target, TargetPlan, logical_modules

PREFIX = "base_model.model."
PEFT_LORA = "LORA"
PAIR = ("lora_A", "lora_B")  # the tensors the layout translates; others (DoRA's magnitude) pass through


@dataclass(frozen=True)
class FileLayout:
    """Where PEFT keys the tensors of one plan: its nn.MultiheadAttention modules (two pairs kept under the
    attention's path) and the modules whose one raw weight is adapted (PEFT wraps the module itself)."""

    attentions: dict[str, int]  # attention path -> embed_dim
    raw_owners: frozenset[str]

    @classmethod
    def of(cls, model: nn.Module, plan: TargetPlan, modules: dict[str, nn.Module] | None = None) -> FileLayout:
        modules = logical_modules(model) if modules is None else modules
        found = {p: m.embed_dim for p, m in modules.items() if isinstance(m, nn.MultiheadAttention)}
        owners = Counter(t.path.rpartition(".")[0] for t in plan.targets if t.kind == "parameter")
        return cls(found, frozenset(owner for owner, n in owners.items() if n == 1))

    def attention(self, target: Target) -> str | None:
        """The attention whose in_proj or out_proj `target` is, else None."""
        if target.kind == "mha_in_proj":
            return target.module_path
        parent = target.path.rpartition(".")[0]
        return parent if parent in self.attentions and target.path.endswith(".out_proj") else None

    def module(self, target: Target) -> str:
        """The module path PEFT keys `target`'s tensors under."""
        mha = self.attention(target)
        if mha is not None:
            return mha if target.kind == "mha_in_proj" else f"{mha}.base_layer.out_proj"
        if target.kind == "parameter" and target.path.rpartition(".")[0] in self.raw_owners:
            return target.path.rpartition(".")[0]
        owner = next((o for o in self.raw_owners if target.path.startswith(o + ".")), None)
        return target.path if owner is None else f"{owner}.base_layer{target.path[len(owner):]}"


def shared_scale(plan: TargetPlan, mha: str) -> float:
    """The scale an attention's two pairs share in the file: in_proj's if adapted, else out_proj's."""
    in_proj = next((t for t in plan.targets if t.kind == "mha_in_proj" and t.module_path == mha), None)
    if in_proj is not None:
        return in_proj.scale
    return next(t.scale for t in plan.targets if t.path == f"{mha}.out_proj")


def stack_blocks(b: torch.Tensor, target: Target) -> torch.Tensor:
    """Per-block B [S, d, r] -> block-sparse B [3d, S*r] of the equivalent stacked-rank LoRA."""
    n_blocks, rows, rank = b.shape
    full = b.new_zeros(len(QKV), rows, n_blocks, rank)
    for j, index in enumerate(target.blocks):
        full[index, :, j] = b[j]
    return full.flatten(2).flatten(0, 1)


def unstack_blocks(b_full: torch.Tensor, target: Target, rank: int) -> torch.Tensor:
    """Inverse of stack_blocks; raises if B has weight outside the blocks."""
    n_blocks = len(target.blocks)
    full = b_full.reshape(len(QKV), -1, n_blocks, rank)
    b = torch.stack([full[index, :, j] for j, index in enumerate(target.blocks)])
    rest = full.clone()
    for j, index in enumerate(target.blocks):
        rest[index, :, j] = 0
    if rest.abs().max() > 0:
        raise AdapterFileError(f"{target.path}: lora_B has weights outside the q/k/v slices "
                               f"{list(target.slices)} that vislora_adapter.json declares; the file was edited "
                               "or belongs to another adapter")
    return b
