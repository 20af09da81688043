"""Open a trained run: the adapted model of an adapter folder that `vislora train` wrote, rebuilt from its task.json.

A run directory holds config.yaml (the resolved TrainConfig) and adapter folders: RUN/adapter, RUN/best and
RUN/checkpoints/step-N. Each adapter folder carries task.json: the task, the base model section of the config, the
classes, the input transform and the run's seed, so the folder works away from its run (a registry copy); a
multilabel run's also holds its attributes and tuned thresholds, a tiled run's its `tiling`. From it `load_trained`
rebuilds a classifier (single- or multi-label; tiled: vislora.tasks.tiled), `load_trained_dual` a dual encoder and
`load_trained_vlm` a generative VLM (captioning, VQA), with the adapter loaded; evaluation, reports, export, serving
and the CLI open runs this way, never through the trainer.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from vislora.data.tiling import TilingConfig, image_spec
from vislora.data.transforms import InputSpec
from vislora.dual_encoder import build_dual_encoder
from vislora.errors import AdapterFileError, VisloraWarning
from vislora.formats import load_adapter
from vislora.input_size import fit_input_size, spec_with_size
from vislora.model import AdaptedModel
from vislora.run_config import TrainConfig
from vislora.tasks.classification import build_classifier
from vislora.tasks.prompted import PROMPTED_TASK, add_logit_bias
from vislora.tasks.tiled import build_tiled_classifier
from vislora.vlm import Vlm, build_vlm, check_lm_identity, lm_identity

TASK_FILE = "task.json"
CONFIG_FILE = "config.yaml"
DUAL_TASKS = ("contrastive", "few_shot", PROMPTED_TASK)
CLASSIFIER_TASKS = ("classification", "multilabel")
GENERATIVE_TASKS = ("captioning", "vqa")


def read_task(adapter_dir: str | Path) -> dict[str, Any]:
    """The task.json of an adapter folder written by `vislora train`."""
    task_file = Path(adapter_dir) / TASK_FILE
    if not task_file.is_file():
        raise AdapterFileError(f"{adapter_dir} has no {TASK_FILE}: it was not written by `vislora train`. Give a "
                               "run's adapter/, best/ or checkpoints/step-N/ folder")
    try:
        return json.loads(task_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{task_file} is not valid JSON ({exc}); the file is corrupt or truncated") from None


def input_spec(task: dict[str, Any]) -> InputSpec:
    """The input transform (size, normalisation, interpolation) of the images the model takes: task.json's `input`,
    or for a tiled model (task.json `tiling`) whole images at tiling.image_size (None: their own size)."""
    return image_spec(model_spec(task), tiling_of(task))


def model_spec(task: dict[str, Any]) -> InputSpec:
    """The model's own input (a tiled model's: each tile's) that a task.json records, with how the backbone runs at
    that size; fields an older task.json lacks keep their defaults."""
    spec = task["input"]
    sizes = spec.get("train_sizes")
    return InputSpec(**{**spec, "mean": tuple(spec["mean"]), "std": tuple(spec["std"]),
                        "train_sizes": tuple(sizes) if sizes else None})


def resized_spec(spec: InputSpec, image_size: int | None, what: str) -> InputSpec:
    """`spec` at `image_size` (None: as recorded), with a VisloraWarning naming both sizes when the adapter never
    trained at `image_size` (a mixed-resolution run trained at each of its `train_sizes`)."""
    if image_size is None or image_size == spec.size:
        return spec
    if image_size in (spec.train_sizes or ()):
        return replace(spec, size=image_size)
    warnings.warn(f"{what} was trained at {spec.size} px and runs at {image_size} px: its base model's position "
                  "embeddings are adapted to the new size (vislora.input_size), so results may differ from those "
                  f"at {spec.size} px; check them on held-out data", VisloraWarning, stacklevel=3)
    return replace(spec, size=image_size)


def tiling_of(task: dict[str, Any]) -> TilingConfig | None:
    """How a task.json's model tiles its images (None: it takes whole images)."""
    return TilingConfig.model_validate(task["tiling"]) if task.get("tiling") else None


def run_dir(adapter_dir: str | Path) -> Path | None:
    """The run directory holding `adapter_dir` (RUN/adapter, RUN/best, RUN/checkpoints/step-N), or None for a folder
    kept outside its run."""
    adapter_dir = Path(adapter_dir)
    return next((d for d in (adapter_dir.parent, adapter_dir.parent.parent) if (d / CONFIG_FILE).is_file()), None)


def run_config(adapter_dir: str | Path) -> TrainConfig | None:
    """The config of the run that wrote `adapter_dir` (its config.yaml), or None for a folder outside its run."""
    folder = run_dir(adapter_dir)
    return TrainConfig.load(folder / CONFIG_FILE) if folder is not None else None


def run_seed(adapter_dir: str | Path) -> int:
    """The seed of the run that wrote `adapter_dir`: task.json's `seed`, or for a folder whose task.json predates it,
    run.seed in the config of the run around it."""
    task_file = Path(adapter_dir) / TASK_FILE
    if task_file.is_file() and "seed" in (task := read_task(adapter_dir)):
        return int(task["seed"])
    config = run_config(adapter_dir)
    if config is None:
        raise AdapterFileError(f"{adapter_dir} was trained on a randomly initialised base model (model.pretrained: "
                               "false), which is rebuilt from the run's seed, but its task.json has no `seed` and no "
                               f"{CONFIG_FILE} is beside or above the folder; keep the adapter inside its run "
                               "directory")
    return config.run.seed


@contextlib.contextmanager
def base_random_state(task: dict[str, Any], adapter_dir: str | Path) -> Iterator[None]:
    """Inside the block, a base model built with random weights (`pretrained: false`) draws them as the trainer did:
    from the run's seed. The caller's random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        if not task["model"].get("pretrained", True):
            torch.manual_seed(run_seed(adapter_dir))
        yield


def dual_encoder_args(model: dict[str, Any]) -> dict[str, Any]:
    """build_dual_encoder's arguments for a task.json `model` section (the run config's ModelSection)."""
    return {"spec": model["spec"], "text": model.get("text"), "pretrained": model.get("pretrained", True),
            "embed_dim": model.get("embed_dim", 256), "vision_pooling": model.get("pooling", "cls"),
            "text_pooling": model.get("text_pooling", "mean"), **model.get("kwargs", {})}


def check_rebuildable(task: dict[str, Any], adapter_dir: str | Path,
                      fix: str = "build that model in Python and load the adapter onto it with "
                                 "vislora.load_adapter(model, folder)") -> None:
    """Refuse a run whose base model task.json cannot describe: one prepared in Python and handed to the Trainer."""
    if task.get("prepared_base"):
        raise AdapterFileError(f"{adapter_dir} was trained on a base model prepared in Python (e.g. pre-aligned "
                               f"projections), which task.json cannot rebuild; {fix}")


def load_trained(adapter_dir: str | Path, image_size: int | None = None,
                 dynamic_size: bool = False) -> tuple[AdaptedModel, dict[str, Any]]:
    """The classifier of a classification or multilabel run with its adapter loaded, in eval mode, and the adapter's
    task.json with the input transform added as `input_spec`.

    `image_size` runs it at another side than it was trained at (a VisloraWarning says so; `input_spec` and
    task.json `input` then describe the new side); `dynamic_size` builds a timm ViT that takes any side per forward
    (for an ONNX export with dynamic height and width)."""
    task = read_task(adapter_dir)
    kind = task.get("task", "classification")
    if kind not in CLASSIFIER_TASKS:
        raise AdapterFileError(f"{adapter_dir} is a {kind!r} run, not a classifier; open dual-encoder runs "
                               f"({', '.join(DUAL_TASKS)}) with vislora.runs.load_trained_dual")
    model, tiling = task["model"], tiling_of(task)
    trained = model_spec(task)
    spec = resized_spec(trained, image_size, f"adapter {adapter_dir}")
    options = {"pretrained": model.get("pretrained", True), "head": model.get("head", "auto"),
               "pooling": model.get("pooling", "cls"), "image_size": spec.size, "native_size": trained.native_size,
               **model.get("kwargs", {})}
    with base_random_state(task, adapter_dir):
        base = (build_classifier(model["spec"], len(task["classes"]), dynamic_size=dynamic_size, **options)[0]
                if tiling is None else build_tiled_classifier(model["spec"], len(task["classes"]), tiling, **options))
    spec = spec_with_size(spec, getattr(base, "backbone", base))
    return load_adapter(base, adapter_dir).eval(), {**task, "input": asdict(spec),
                                                    "input_spec": image_spec(spec, tiling)}


def load_trained_dual(adapter_dir: str | Path, image_size: int | None = None) -> tuple[AdaptedModel, dict[str, Any]]:
    """The dual encoder of a contrastive, few-shot or prompted-attributes run with its adapter (and the frozen
    adapters it was trained over, task.json `frozen`) loaded and active, in eval mode; and the adapter's task.json.
    `image_size` runs the image tower at another side, as `load_trained` does."""
    task = read_task(adapter_dir)
    if task.get("task") not in DUAL_TASKS:
        raise AdapterFileError(f"{adapter_dir} is not a dual-encoder adapter of `vislora train` (task.json says "
                               f"{task.get('task')!r}); give a contrastive, few_shot or "
                               f"{PROMPTED_TASK} run's adapter/ or best/ folder, "
                               "or open classifiers with vislora.runs.load_trained")
    check_rebuildable(task, adapter_dir)
    spec = resized_spec(input_spec(task), image_size, f"adapter {adapter_dir}")
    with base_random_state(task, adapter_dir):
        base = build_dual_encoder(**dual_encoder_args(task["model"]))
    fit_input_size(base.vision_tower, spec.size)
    if task["task"] == PROMPTED_TASK:
        add_logit_bias(base)  # as training added it
    frozen = task.get("frozen", {})
    model = load_adapter(base, adapter_dir, "default", activate=False)
    for name, folder in frozen.items():
        load_adapter(model, folder, name, activate=False)
    model.set_active([*frozen, "default"])
    return model.eval(), {**task, "input": asdict(spec_with_size(spec, base.vision_tower))}


def load_trained_vlm(adapter_dir: str | Path, vlm: Vlm | None = None) -> tuple[AdaptedModel, Vlm, dict[str, Any]]:
    """The generative VLM of a captioning or VQA run with its adapter loaded and active, in eval mode; the Vlm
    (processor, image input spec) it runs with; and the adapter's task.json.

    The VLM is rebuilt from task.json `vlm` (what `vislora.vlm.build_vlm` was called with), or `vlm` is used: a model
    built in Python. Either way an adapter trained on another language model is refused, naming what differs.
    """
    task = read_task(adapter_dir)
    if task.get("task") not in GENERATIVE_TASKS:
        raise AdapterFileError(f"{adapter_dir} is not a generative VLM adapter (task.json says {task.get('task')!r}); "
                               f"give a {' or '.join(GENERATIVE_TASKS)} run's adapter/ or best/ folder, or open "
                               "classifiers with vislora.runs.load_trained")
    record = task.get("vlm") or {}
    if vlm is None:
        check_rebuildable(task, adapter_dir, "build it with vislora.vlm.build_vlm and pass it as vlm=")
        vlm = build_vlm(record["spec"], record.get("lm"), image_size=record.get("image_size"),
                        connector_hidden=record.get("connector_hidden"), max_length=record.get("max_length", 512),
                        system=record.get("system"), seed=record.get("seed", 0))
    check_lm_identity(record.get("lm_identity"), lm_identity(vlm.model), f"adapter {adapter_dir}")
    model = load_adapter(vlm.model, adapter_dir)
    return model.eval(), vlm, task
