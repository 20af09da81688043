"""ONNX Runtime sessions on the device an export's checks and benchmarks run on.

`providers("auto")` is the CUDA execution provider when onnxruntime offers it (onnxruntime-gpu), else the CPU;
`providers("cuda:1")` asks for GPU 1 and falls back to the CPU with a VisloraWarning when onnxruntime has no CUDA
provider. The exported ONNX file is the same whatever the device: only where it is checked and timed changes.
TF32 is switched off on the GPU, so the check against PyTorch keeps its float32 tolerance.

    session = inference_session("onnx/model.onnx", device="auto")
    session.get_providers()  # ['CUDAExecutionProvider', 'CPUExecutionProvider'] with a GPU
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vislora.devices import check_device_name
from vislora.errors import VisloraWarning

logger = logging.getLogger(__name__)

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def providers(device: str = "cpu", available: Sequence[str] | None = None) -> list[Any]:
    """onnxruntime's providers for `device` (auto | cpu | cuda | cuda:N | mps), best first; `available` defaults
    to onnxruntime.get_available_providers()."""
    check_device_name(device)
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if device.startswith("cuda") or device == "auto":
        if CUDA in available:
            index = int(device.partition(":")[2] or 0)
            return [(CUDA, {"device_id": index, "use_tf32": 0}), CPU]
        if device == "auto":
            return [CPU]
    warnings.warn(f"device {device!r} asked for the ONNX checks, but onnxruntime offers {list(available)} (no "
                  f"{CUDA if device != 'mps' else 'provider for mps'}): they run on the CPU; install onnxruntime-gpu "
                  "for CUDA, or pass --device cpu", VisloraWarning, stacklevel=2)
    return [CPU]


def inference_session(path: str | Path, device: str = "cpu", options: Any = None) -> Any:
    """An onnxruntime InferenceSession of `path` on `device`'s providers (see `providers`)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), options, providers=providers(device))
