"""What every export step shares: the adapted model rebuilt from an adapter folder, and folders built whole.

An export reads an adapter folder written by `vislora train` (its task.json names the model spec, classes and
input size; `vislora.runs.load_trained` rebuilds the classifier from it) or a bare adapter plus
the base model spec it was trained on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vislora.data.transforms import InputSpec, model_input_spec
from vislora.errors import ConfigError, ExportError
from vislora.formats import load_adapter
from vislora.io import fsync
from vislora.model import AdaptedModel
from vislora.runs import DUAL_TASKS, load_trained

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MERGE_ATOL = 1e-4



@dataclass
class Exportable:
    """An adapted model ready to export, with what its input and output mean."""

    adapted: AdaptedModel
    spec: InputSpec
    base: str
    adapter_dir: Path
    task: dict[str, Any] | None = None

    @property
    def classes(self) -> list[str] | None:
        return list(self.task["classes"]) if self.task else None

    def example(self, batch: int = 2, seed: int = 0) -> torch.Tensor:
        """A fixed random batch [batch, 3, size, size] in the model's input range (normalised pixels)."""
        size = self.spec.size
        return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def load_exportable(adapter_dir: str | Path, base: str | None = None, dynamic_size: bool = False) -> Exportable:
    """The model of a trained adapter folder (task.json), or of a bare adapter over the `base` spec, in eval mode;
    `dynamic_size` rebuilds a timm ViT to take any side per forward (`load_trained`)."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ExportError(f"{adapter_dir} is not an adapter folder (no adapter_config.json); give a run's adapter/, "
                          "best/ or checkpoints/step-N/ folder, or a folder written by save_adapter")
    task_file = adapter_dir / "task.json"
    if is_dual(adapter_dir):
        raise ExportError(f"{adapter_dir} is a dual-encoder run (contrastive / few_shot): open it for export with "
                          "vislora.export.dual.load_dual_exportable")
    if task_file.is_file():
        trained_on = json.loads(task_file.read_text())["model"]["spec"]
        if base is not None and base != trained_on:
            raise ExportError(f"{adapter_dir} was trained on {trained_on!r} (task.json) but --base is {base!r}; "
                              "drop --base: a trained adapter folder names its own base model")
        adapted, task = load_trained(adapter_dir, dynamic_size=dynamic_size)
        if task.get("tiling"):
            raise ExportError(f"{adapter_dir} is a tiled classifier (task.json `tiling`): its tiling and tile pooling "
                              "have no merged or ONNX form yet, and the backbone alone would answer differently; "
                              "serve it with `vislora serve`, or load it with vislora.runs.load_trained")
        return Exportable(adapted, task["input_spec"], trained_on, adapter_dir, task)
    if dynamic_size:
        raise ExportError(f"{adapter_dir} has no task.json: dynamic sizes are exported for trained adapter folders "
                          "(task.json records the base and its input size); export at the base's size without "
                          "--dynamic-size")
    if base is None:
        raise ExportError(f"{adapter_dir} has no task.json, so the base model is unknown; pass the spec it was "
                          "trained on, e.g. --base hf:facebook/dinov2-small or --base timm:vit_base_patch16_224")
    from vislora.assets import resolve_model_spec
    from vislora.backbones import load_base_model

    base_model = load_base_model(resolve_model_spec(base), pretrained=True)
    try:
        spec = model_input_spec(base_model)
    except ConfigError as exc:
        raise ExportError(f"cannot tell the input size of {base!r} ({exc}); export a trained adapter folder "
                          "(its task.json records the size)") from None
    return Exportable(load_adapter(base_model, adapter_dir).eval(), spec, base, adapter_dir)


def tensor_output(output: Any) -> torch.Tensor:
    """The tensor a model returns: itself, an HF output's logits or last_hidden_state, or the first item."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return output[0]


class TensorOutput(nn.Module):
    """Wrap a model so that forward(images) returns one tensor (what ONNX export and Triton need)."""

    def __init__(self, model: nn.Module, hf_backbone: bool) -> None:
        super().__init__()
        self.model = model
        self.hf_backbone = hf_backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=images) if self.hf_backbone else self.model(images)
        return tensor_output(out)


def plain_merged(item: Exportable) -> tuple[nn.Module, float]:
    """(the merged plain module returning one tensor, max |merged - adapted| on a random batch).

    The AdaptedModel is emptied (see `AdaptedModel.unload`).
    """
    from transformers import PreTrainedModel

    hf_backbone = item.task is None and isinstance(item.adapted.base_model, PreTrainedModel)
    probe = item.example(batch=2, seed=1)
    with torch.inference_mode():
        reference = TensorOutput(item.adapted, hf_backbone)(probe)
    with torch.no_grad():  # not inference mode: merged weights must stay normal tensors for the ONNX exporter
        plain = TensorOutput(item.adapted.unload(merge=True), hf_backbone).eval()
    with torch.inference_mode():
        difference = (plain(probe) - reference).abs().max().item()
    return plain, difference


@contextlib.contextmanager
def staged_dir(dest: str | Path, overwrite: bool = False, staging_parent: Path | None = None) -> Iterator[Path]:
    """Yield an empty temp folder; on success it replaces `dest` by a rename, so `dest` is never partial.

    On any error the temp folder is removed and `dest` keeps what it had. `staging_parent` (same file system)
    keeps the temp folder out of a watched folder such as a Triton model repository.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise ExportError(f"{dest} already exists; choose another output folder or pass --overwrite to replace it")
    if dest.exists() and not dest.is_dir():
        raise ExportError(f"{dest} is a file, not a folder; choose another output path")
    dest.parent.mkdir(parents=True, exist_ok=True)
    parent = staging_parent or dest.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=parent))
    try:
        yield tmp
        for path in [tmp, *tmp.rglob("*")]:  # temp files are private (0600/0700); a server may run as another user
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
            if path.is_file():
                fsync(path)
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}") if dest.exists() else None
        if old is not None:
            os.rename(dest, old)
        os.rename(tmp, dest)
        fsync(dest.parent)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def preprocessing(spec: InputSpec) -> dict[str, Any]:
    """How an exported model's images are prepared, for manifests: normalisation, resize interpolation and the DICOM
    window DICOM files are read with (vislora.data.load_image; a [center, width] pair or a name)."""
    window = list(spec.window) if isinstance(spec.window, tuple) else spec.window
    return {"mean": list(spec.mean), "std": list(spec.std), "interpolation": spec.interpolation,
            "dicom_window": window}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as indented JSON (atomically)."""
    from vislora.io import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


@dataclass
class MergeResult:
    """Where the merged model went, in which layout, and how close it is to the adapted model."""

    out: Path
    layout: str
    max_abs_diff: float
    reload_max_abs_diff: float
    load: str

    def __str__(self) -> str:
        return (f"merged model ({self.layout}) written to {self.out}; max |merged - adapted| = "
                f"{self.max_abs_diff:.2e}, reloaded from disk {self.reload_max_abs_diff:.2e} "
                f"(tolerance {MERGE_ATOL:g}). Load it with: {self.load}")


def is_dual(adapter_dir: str | Path) -> bool:
    """Whether `adapter_dir` holds a task.json of a contrastive or few-shot run."""
    task_file = Path(adapter_dir) / "task.json"
    if not task_file.is_file():
        return False
    try:
        return json.loads(task_file.read_text()).get("task") in DUAL_TASKS
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
