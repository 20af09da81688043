"""Multi-stage training as config: which tower's adapters train in which steps, at which learning-rate scale.

    stages:
      - {steps: 200, train: [text]}
      - {steps: 200, train: [vision]}
      - {steps: 100, train: [text, vision], lr_scale: 0.1}

    stages:                                  # progressive rank on any model: 4 -> 16 -> 32
      - {steps: 100, rank: 4}
      - {steps: 100, rank: 16, lr_scale: 0.5}
      - {steps: 100, rank: 32, lr_scale: 0.25}

    stages:                                  # a captioning / VQA run names VLM parts (vislora.vlm.part_of)
      - {steps: 100, train: [connector]}     # LLaVA's stage 1: align the connector, both towers frozen
      - {steps: 400, train: [lm]}            # stage 2: LoRA on the language model

A stage names towers (default: all), or a generative VLM's parts (lm, vision, connector, qformer; default: all); the
trainable set of a stage is every parameter the run trains (adapter weights, saved projections, a saved connector)
that lives in one of its towers or parts, plus the shared ones outside them (the logit scale). At a stage boundary
`apply_stage` (through Trainer.enter_stage) - the one place a stage takes effect - grows the adapter's rank if the
stage asks for more (AdaptedModel.grow_rank: output unchanged, the old entries' optimizer state kept), switches
requires_grad, rebuilds the optimizer carrying the AdamW state of parameters that stay trainable, and puts the LR
schedule (warmup + cosine over the whole run, times the stage's lr_scale) at the current step. After step s the
trainer is in the stage that runs step s + 1, so a checkpoint holds that stage's optimizer and resume re-enters it
before loading.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from vislora.errors import ConfigError
from vislora.model import AdaptedModel
from vislora.run_config import VLM_PARTS, OptimSection, StageSection
from vislora.towers import tower_of
from vislora.train.growth import replace_grown
from vislora.train.schedule import build_optimizer, build_scheduler, position_scheduler
from vislora.vlm import family_of, is_vlm, part_of

logger = logging.getLogger(__name__)


class StagePlan:
    """The stages of a run resolved against its model: step ranges and trainable parameters per stage."""

    def __init__(self, stages: list[StageSection], model: nn.Module) -> None:
        self.stages = stages
        self.candidates = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.family = family_of(model) if is_vlm(model) else None  # a generative VLM's stages name its parts
        group = tower_of if self.family is None else part_of
        self.towers = {name: group(model, name) for name in self.candidates}
        self.starts = [sum(s.steps for s in stages[:i]) for i in range(len(stages))]
        self.current: int | None = None
        rank = model.configs["default"].rank if hasattr(model, "configs") else None
        for index, stage in enumerate(stages):
            if stage.rank is not None and rank is not None and stage.rank < rank:
                raise ConfigError(f"stage {index + 1} asks for rank {stage.rank}, below the adapter's rank {rank} at "
                                  "that point; progressive schedules only grow: set adapter.rank to the first "
                                  "stage's rank and raise it from stage to stage")
            rank = stage.rank or rank
            self._check_parts(index, stage)
            if not any(self.towers[n] in stage.train for n in self.candidates):
                adapted = sorted({t for t in self.towers.values() if t})
                raise ConfigError(f"stage {index + 1} trains {stage.train}, but no trainable parameter of this model "
                                  f"lives there (towers with adapters: {adapted}); add that tower's targets "
                                  + ("(adapter.targets: lm, vision, ...; adapter.train_connector)" if self.family
                                     else "(adapter.vision_targets / text_targets)") + " or drop it")

    def _check_parts(self, index: int, stage: StageSection) -> None:
        """A generative VLM's stage names parts the model has (all of VLM_PARTS, the default, means everything)."""
        if self.family is None or set(stage.train) == set(VLM_PARTS):
            return
        missing = sorted(set(stage.train) - set(self.family.parts))
        if missing:
            raise ConfigError(f"stage {index + 1} trains {missing}, which a {self.family.name} model does not have; "
                              f"its parts are {', '.join(self.family.parts)}")

    def index_at(self, step: int) -> int:
        """The stage that runs step `step + 1` (the last stage once the run is over)."""
        return max(i for i, start in enumerate(self.starts) if start <= step)

    def lr_scale(self, step: int) -> float:
        return self.stages[self.index_at(step)].lr_scale

    def members(self, index: int) -> list[str]:
        """Names of the parameters stage `index` trains."""
        wanted = self.stages[index].train
        return [n for n, tower in self.towers.items() if tower is None or tower in wanted]

    def refresh(self, model: nn.Module) -> None:
        """Follow parameters that were replaced (rank growth) by name."""
        self.candidates = {name: p for name, p in model.named_parameters() if name in self.candidates}

    def trains(self, index: int) -> str:
        """What stage `index` trains, in words: its towers (a VLM's parts), or `everything` for a model without a
        text tower (a VLM stage naming every part)."""
        if self.family is not None:
            train = self.stages[index].train
            return "everything" if set(train) == set(VLM_PARTS) else "+".join(train)
        if "text" not in self.towers.values():
            return "everything"
        return "+".join(self.stages[index].train)

    def trainable_count(self, index: int) -> int:
        return sum(self.candidates[n].numel() for n in self.members(index))

    def describe(self) -> str:
        lines = []
        for index, (stage, start) in enumerate(zip(self.stages, self.starts, strict=True)):
            grows = f", rank {stage.rank}" if stage.rank else ""
            lines.append(f"stage {index + 1}/{len(self.stages)}: steps {start + 1}-{start + stage.steps}, train "
                         f"{self.trains(index)}, lr x{stage.lr_scale:g}{grows}, "
                         f"{self.trainable_count(index):,} trainable parameters"
                         + (" before its growth" if stage.rank and index > 0 else ""))
        return "\n".join(lines)


def apply_stage(plan: StagePlan, index: int, model: AdaptedModel, optimizer: torch.optim.Optimizer | None,
                optim: OptimSection, step: int, carry_state: bool = True,
                ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """Make stage `index` of `plan` current on `model` after `step` steps: grow the adapter's rank if the stage asks,
    set the trainable set, and return a new optimizer (the AdamW state of `optimizer` carried for parameters that
    stay trainable) and its LR schedule positioned at `step`."""
    old = getattr(optimizer, "optimizer", optimizer)  # under Accelerate, the torch optimizer it wraps
    rank = plan.stages[index].rank
    if rank is not None and rank > model.configs["default"].rank:
        grown = model.grow_rank("default", rank)
        if old is not None:
            replace_grown(old, grown)  # the old entries' AdamW state moves into the grown parameters
        plan.refresh(model)
    members = set(plan.members(index))
    for name, param in plan.candidates.items():
        param.requires_grad_(name in members)
    new = build_optimizer(model, optim)
    if carry_state and old is not None:
        for group in new.param_groups:
            for param in group["params"]:
                if param in old.state:
                    new.state[param] = old.state[param]
    scheduler = build_scheduler(new, optim, plan.lr_scale)
    position_scheduler(scheduler, step)
    plan.current = index
    return new, scheduler
