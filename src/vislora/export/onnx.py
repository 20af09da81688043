"""ONNX export of the merged model (dynamic batch axis), checked with onnxruntime against PyTorch.

The graph comes from `torch.onnx.export(..., dynamo=True)` (the exporter PyTorch maintains; its DINOv2-S graph
ran ~20% faster in onnxruntime than the TorchScript exporter's). The file holds its weights inline (one
`model.onnx`, as Triton's onnxruntime backend expects for models under 2 GB).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vislora.errors import ExportError
from vislora.export.common import INPUT_NAME, OUTPUT_NAME

logger = logging.getLogger(__name__)

OPSET = 18
# onnxruntime's fused kernels reorder fp32 sums: |ort - torch| <= ATOL + RTOL * |torch| elementwise.
ONNX_ATOL = 1e-4
ONNX_RTOL = 1e-3


@dataclass
class OnnxCheck:
    """How far onnxruntime's outputs are from PyTorch's, per batch size tried."""

    max_abs_diff: dict[int, float]

    @property
    def worst(self) -> float:
        return max(self.max_abs_diff.values())

    def __str__(self) -> str:
        sizes = ", ".join(f"batch {b}: {d:.2e}" for b, d in self.max_abs_diff.items())
        return f"onnxruntime vs PyTorch max |diff| {sizes} (tolerance {ONNX_ATOL:g} + {ONNX_RTOL:g}·|torch|)"


def export_onnx(model: nn.Module, image_size: int, path: str | Path, opset: int = OPSET) -> Path:
    """Write `model` (images [batch, 3, size, size] -> one tensor [batch, ...]) as ONNX with a dynamic batch axis.

    Input is named "input", output "logits". The file is written to `path` (no external data file).
    """
    example = torch.zeros(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    return export_module(model, (example,), [INPUT_NAME], [OUTPUT_NAME], ({0: batch},), path, opset)


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
               seed: int = 0, output: str = OUTPUT_NAME) -> OnnxCheck:
    """Run the ONNX file (images -> `output`) with onnxruntime and PyTorch on the same random batches; raise if they
    disagree."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    differences = {}
    for batch in batches:
        x = torch.randn(batch, 3, image_size, image_size, generator=generator)
        with torch.inference_mode():
            expected = model(x).float().numpy()
        got = session.run([output], {INPUT_NAME: x.numpy()})[0]
        differences[batch] = compare_outputs(got, expected, path, f"batch {batch}")
    return OnnxCheck(differences)


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
