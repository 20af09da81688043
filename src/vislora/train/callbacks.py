"""Extension points of the training loop: subclass TrainerCallback and override what you need.

The trainer calls, in this order for every optimizer step:
  extra_loss(trainer)          inside each micro-batch's forward: a tensor added to the task loss (regularisers)
  on_gradients(trainer)        after the last micro-batch's backward, before clipping (gradients are complete)
  on_step_end(trainer, taken)  after the optimizer step (or the skipped one), before gradients are cleared
  metrics(trainer)             merged into the step's row of metrics.jsonl
Adapter methods that need the loop (AdaLoRA's rank allocator, MoLoRA's balance loss) reach it through
AdaptedModel.auxiliary_loss() and AdaptedModel.after_optimizer_step(), which the trainer always calls; callbacks
are for what the user or the run config opts into (e.g. gradient-flow monitoring).
`trainer` is the running Trainer, seen through vislora.train.view.TrainerView: what a callback may read.
"""

from __future__ import annotations

import torch

from vislora.train.view import TrainerView


class TrainerCallback:
    """A no-op hook set; the trainer calls every method at the point its docstring names."""

    def extra_loss(self, trainer: TrainerView) -> torch.Tensor | None:
        """A term added to the loss of each micro-batch (before the division for gradient accumulation)."""
        return None

    def on_gradients(self, trainer: TrainerView) -> None:
        """Gradients of the step are complete and not yet clipped."""

    def on_step_end(self, trainer: TrainerView, taken: bool) -> None:
        """The optimizer stepped (`taken`) or skipped a non-finite step; gradients are still there."""

    def metrics(self, trainer: TrainerView) -> dict[str, float]:
        """Figures to log with this step's training row."""
        return {}
