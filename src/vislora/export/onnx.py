"""ONNX export of the merged model (dynamic batch axis, and optionally dynamic height and width), checked with
onnxruntime against PyTorch.

The graph comes from `torch.onnx.export(..., dynamo=True)` (the exporter PyTorch maintains; its DINOv2-S graph
ran ~20% faster in onnxruntime than the TorchScript exporter's). The file holds its weights inline (one
`model.onnx`, as Triton's onnxruntime backend expects for models under 2 GB).

Dynamic height and width (`SizeAxes`) are exported for backbones that take any side per forward
(vislora.input_size.runs_at_any_size: a timm ViT built with dynamic_img_size, a Hugging Face ViT, DINOv2, CLIP or
SigLIP); sides are multiples of the patch. The graph is traced at a side whose patch grid differs from the
stored position-embedding grid: at that grid timm and Hugging Face skip the interpolation, which would fix the
traced side into the graph.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vislora.errors import ExportError
from vislora.export.common import INPUT_NAME, OUTPUT_NAME
from vislora.export.runtime import inference_session
from vislora.input_size import input_size_of, runs_at_any_size, stored_side

logger = logging.getLogger(__name__)

OPSET = 18
# onnxruntime's fused kernels reorder fp32 sums: |ort - torch| <= ATOL + RTOL * |torch| elementwise.
ONNX_ATOL = 1e-4
ONNX_RTOL = 1e-3
MAX_SIDE = 4096  # the largest height or width a dynamic-size export accepts


@dataclass
class OnnxCheck:
    """How far onnxruntime's outputs are from PyTorch's, per batch size tried."""

    max_abs_diff: dict[int, float]
    sides: dict[int, float] = field(default_factory=dict)  # dynamic-size exports: max |diff| at other sides, batch 1

    @property
    def worst(self) -> float:
        return max([*self.max_abs_diff.values(), *self.sides.values()])

    def __str__(self) -> str:
        probes = [*(f"batch {b}: {d:.2e}" for b, d in self.max_abs_diff.items()),
                  *(f"{side} px: {d:.2e}" for side, d in self.sides.items())]
        return (f"onnxruntime vs PyTorch max |diff| {', '.join(probes)} (tolerance {ONNX_ATOL:g} + "
                f"{ONNX_RTOL:g}·|torch|)")


@dataclass(frozen=True)
class SizeAxes:
    """Dynamic height and width of an ONNX export: multiples of `multiple` (the patch side), from two patches to
    MAX_SIDE, traced at `trace` px."""

    multiple: int
    trace: int

    def to_dict(self) -> dict[str, int]:
        largest = MAX_SIDE // self.multiple * self.multiple
        return {"multiple_of": self.multiple, "min": 2 * self.multiple, "max": largest}


def size_axes(backbone: nn.Module, size: int) -> SizeAxes:
    """The dynamic height/width axes for exporting `backbone` (its image size `size`); ExportError for a backbone that
    runs at one side per build (open_clip, a timm ViT built without dynamic_img_size) or has no patch grid."""
    record = input_size_of(backbone)
    patch = record.patch_size
    if not runs_at_any_size(backbone) or not patch or record.position_embeddings == "none":
        raise ExportError(f"a {type(backbone).__name__} ({record.position_embeddings} position embeddings) cannot be "
                          "exported with dynamic height and width: that needs a backbone that interpolates its "
                          "position embeddings every forward (a timm ViT, Hugging Face ViT, DINOv2, CLIP or SigLIP); "
                          f"export it at its trained size ({size} px) without --dynamic-size")
    stored = stored_side(backbone)
    trace = next(side for side in (size, size + patch, size + 2 * patch) if side != stored and side >= 2 * patch)
    return SizeAxes(patch, trace)


def export_onnx(model: nn.Module, image_size: int, path: str | Path, opset: int = OPSET,
                axes: SizeAxes | None = None) -> Path:
    """Write `model` (images [batch, 3, size, size] -> one tensor [batch, ...]) as ONNX with a dynamic batch axis,
    and with `axes`, dynamic height and width.

    Input is named "input", output "logits". The file is written to `path` (no external data file).
    """
    batch = torch.export.Dim("batch", min=1, max=4096)
    if axes is None:
        return export_module(model, (torch.zeros(2, 3, image_size, image_size),), [INPUT_NAME], [OUTPUT_NAME],
                             ({0: batch},), path, opset)
    patches = {name: torch.export.Dim(f"{name}_patches", min=2, max=MAX_SIDE // axes.multiple)
               for name in ("height", "width")}
    shapes = ({0: batch, 2: axes.multiple * patches["height"], 3: axes.multiple * patches["width"]},)
    return export_module(model, (torch.zeros(2, 3, axes.trace, axes.trace),), [INPUT_NAME], [OUTPUT_NAME], shapes,
                         path, opset)


def export_module(model: nn.Module, example: tuple[torch.Tensor, ...], input_names: list[str],
                  output_names: list[str], dynamic_shapes: tuple[dict[int, Any], ...], path: str | Path,
                  opset: int = OPSET) -> Path:
    """Write `model` called on `example` as one ONNX file (weights inline) with the given dynamic axes."""
    path = Path(path)
    model.eval()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        try:
            program = torch.onnx.export(model, example, input_names=input_names, output_names=output_names,
                                        dynamic_shapes=dynamic_shapes, opset_version=opset, dynamo=True,
                                        verbose=False, optimize=True)
        except Exception as exc:  # the exporter raises many types; the user needs the model and the cause
            raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {exc}") from exc
    program.save(str(path), external_data=False)
    return path


def check_onnx(model: nn.Module, path: str | Path, image_size: int, batches: tuple[int, ...] = (1, 3),
               seed: int = 0, output: str = OUTPUT_NAME, sides: tuple[int, ...] = (), device: str = "cpu"
               ) -> OnnxCheck:
    """Run the ONNX file (images -> `output`) with onnxruntime on `device`'s provider (vislora.export.runtime) and
    PyTorch on the CPU on the same random batches at `image_size`, and one image at each of `sides` (a dynamic-size
    export); raise if they disagree."""
    session = inference_session(path, device)
    generator = torch.Generator().manual_seed(seed)

    def probe(batch: int, side: int, label: str) -> float:
        x = torch.randn(batch, 3, side, side, generator=generator)
        with torch.inference_mode():
            expected = model(x).float().numpy()
        try:
            got = session.run([output], {INPUT_NAME: x.numpy()})[0]
        except Exception as exc:  # onnxruntime's errors share no base class; a fixed axis refuses the input
            raise ExportError(f"{path}: onnxruntime refused {label} ({exc}); an axis did not export as "
                              "dynamic") from None
        return compare_outputs(got, expected, path, label)

    return OnnxCheck({batch: probe(batch, image_size, f"batch {batch}") for batch in batches},
                     {side: probe(1, side, f"{side} px") for side in sides})


def compare_outputs(got: np.ndarray, expected: np.ndarray, path: str | Path, label: str) -> float:
    """max |onnxruntime - PyTorch| for one probe (`label`, e.g. "batch 3"); ExportError when the shapes differ (a
    dynamic axis did not export as dynamic) or an element is off by more than ONNX_ATOL + ONNX_RTOL·|torch|."""
    if got.shape != expected.shape:
        raise ExportError(f"{path}: onnxruntime returned shape {got.shape} for {label}, PyTorch {expected.shape}; "
                          "a dynamic axis did not export as dynamic")
    difference = float(np.abs(got - expected).max())
    if not np.allclose(got, expected, rtol=ONNX_RTOL, atol=ONNX_ATOL):
        raise ExportError(f"{path}: onnxruntime's outputs differ from PyTorch's by up to {difference:.3g} at {label} "
                          f"(tolerance {ONNX_ATOL:g} + {ONNX_RTOL:g}·|x|); the export is wrong")
    return difference
