"""The run config's rules for captioning / VQA runs (a generative VLM, vislora.vlm), and for generative settings on
other runs: TrainConfig validation calls `check_generative` or `check_not_generative`.

A generative run names VLM parts (lm, vision, connector, qformer) where dual encoders name towers: in its stages
(default: every part) and in adapter.targets; it measures the held-out loss (and exact match for VQA), so
run.best_metric defaults to loss.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

GENERATIVE_KINDS = ("captioning", "vqa")  # task kinds that train a generative VLM
VLM_PARTS = ("lm", "vision", "connector", "qformer")  # what a generative run's stages train (vislora.vlm.PARTS)
TOWERS = ("vision", "text")  # what the other runs' stages train
VLM_FIELDS = ("train_connector", "part_ranks", "part_alphas")  # adapter fields of generative runs only
TASK_FIELDS = ("prompt", "max_length", "system", "generations", "max_new_tokens")  # task fields of generative runs


def changed(section: BaseModel, fields: tuple[str, ...]) -> list[str]:
    """The `fields` of `section` whose values differ from their defaults (a resolved config.yaml sets every field)."""
    defaults = type(section).model_fields
    return [f for f in fields if getattr(section, f) != defaults[f].get_default(call_default_factory=True)]


def check_generative(config: Any, other_adapter_fields: tuple[str, ...]) -> None:
    """ValueError for what a captioning / VQA TrainConfig cannot use (`other_adapter_fields`: the adapter fields of
    classifiers and dual encoders); stages without `train` get every VLM part; best_metric defaults to loss."""
    kind, model = config.task.kind, config.model
    if model.connector_hidden is not None and model.lm is None:
        raise ValueError("model.connector_hidden sizes the connector composed between model.spec and model.lm; set "
                         "model.lm (a causal LM), or drop connector_hidden for a whole Hugging Face VLM")
    if config.data.image_sizes:
        raise ValueError(f"data.image_sizes trains at several sides, but a {kind} run's VLM takes a fixed number of "
                         "image tokens per image; set one data.image_size")
    if model.text:
        raise ValueError(f"model.text pairs a text tower with a dual encoder; a {kind} run composes a VLM with "
                         "model.lm (a causal LM): use model.lm, or drop model.text")
    others = changed(config.adapter, other_adapter_fields)
    if others:
        raise ValueError(f"adapter.{', adapter.'.join(others)} belong to dual encoders and classifiers; a {kind} run "
                         "names VLM parts in adapter.targets (lm, lm:q, vision, connector, qformer) with "
                         "adapter.part_ranks / part_alphas")
    for index, stage in enumerate(config.stages):
        if "train" not in stage.model_fields_set:
            stage.train = list(VLM_PARTS)
        elif "text" in stage.train:
            raise ValueError(f"stages[{index}].train names `text`, a dual-encoder tower; a {kind} run trains VLM "
                             f"parts: {', '.join(VLM_PARTS)}")
    measured = ("loss", "exact_match") if kind == "vqa" and config.task.generations else ("loss",)
    if config.run.best_metric not in measured:
        if "best_metric" in config.run.model_fields_set:
            raise ValueError(f"run.best_metric {config.run.best_metric} is not measured by this {kind} run; use "
                             f"{' or '.join(measured)} (exact_match: vqa runs with task.generations > 0)")
        config.run.best_metric = "loss"


def check_not_generative(config: Any) -> None:
    """ValueError for generative settings (model.lm, adapter.train_connector, task.prompt, VLM parts in stages) in a
    run of another task kind."""
    kind = config.task.kind
    named = [f"model.{f}" for f in changed(config.model, ("lm", "connector_hidden"))]
    named += [f"adapter.{f}" for f in changed(config.adapter, VLM_FIELDS)]
    named += [f"task.{f}" for f in changed(config.task, TASK_FIELDS)]
    if named:
        raise ValueError(f"{', '.join(named)} configure captioning / VQA runs, but task.kind is {kind!r}; set "
                         "task.kind: captioning or vqa, or drop them")
    for index, stage in enumerate(config.stages):
        parts = sorted(set(stage.train) - set(TOWERS))
        if parts:
            raise ValueError(f"stages[{index}].train names {parts}, VLM parts of captioning / vqa runs; a {kind} "
                             "run's stages train towers: vision, text")
