"""Where a model runs: a device (`auto | cpu | cuda | cuda:N | mps`) and a dtype (`float32 | bfloat16 | float16`).

`Placement.resolve("auto", "bfloat16")` picks CUDA when torch sees a GPU, else Apple's MPS, else the CPU, and
refuses what cannot work (CUDA asked on a machine without it, float16 on the CPU) with the fix in the message.
Every command that runs a model (serve, eval, export checks, index build, benchmarks) reads its --device and
--dtype through this module, so the words and errors are the same everywhere:

    placement = Placement.resolve("auto", "bfloat16")
    model = placement.place(model)  # weights moved and cast
    logits = model(placement.batch([pixels_a, pixels_b])).float().cpu()  # (2, classes)

float16 on the CPU is refused: torch computes half precision there with slow, partial kernels; bfloat16 is the CPU's
16-bit type (and works on every CUDA GPU since Ampere too).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from vislora.errors import ConfigError

DeviceName = str  # auto, cpu, cuda, cuda:N or mps
DtypeName = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def check_device_name(name: str) -> str:
    """`name` if it is one of auto, cpu, cuda, cuda:N, mps (whether that device is present is checked later)."""
    if not isinstance(name, str) or not DEVICE_PATTERN.fullmatch(name):
        raise ConfigError(f"unknown device {name!r}: use {DEVICE_CHOICES} (auto = cuda when available, else mps, "
                          "else cpu)")
    return name


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device `name` asks for; auto = cuda if available, else mps if available, else cpu."""
    check_device_name(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked, but torch sees no CUDA GPU here (torch.cuda.is_available() "
                              f"is False; torch {torch.__version__}, built for CUDA {torch.version.cuda}); use "
                              "--device cpu (or auto), or install a CUDA build of torch on a machine with a GPU")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device {name!r} asked, but torch sees {count} CUDA GPU(s): use cuda:0 .. "
                              f"cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} asked, but torch.backends.mps.is_available() is False (MPS needs Apple "
                          "silicon and a macOS build of torch); use --device cpu (or auto)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype `name` asks for on `device`; float16 on the CPU is refused (use bfloat16 there)."""
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}: use {', '.join(DTYPES)}")
    if name == "float16" and device.type == "cpu":
        raise ConfigError("dtype float16 on the CPU is refused: torch's CPU half-precision kernels are slow and "
                          "partial; use --dtype bfloat16 (the CPU's 16-bit type) or float32, or float16 on a GPU")
    return DTYPES[name]


@dataclass(frozen=True)
class Placement:
    """A device and a dtype for a model and its inputs."""

    device: torch.device
    dtype: torch.dtype = torch.float32

    @classmethod
    def resolve(cls, device: str = "auto", dtype: str = "float32") -> Placement:
        resolved = resolve_device(device)
        return cls(resolved, resolve_dtype(dtype, resolved))

    @classmethod
    def cpu(cls) -> Placement:
        return cls(torch.device("cpu"), torch.float32)

    @property
    def is_cpu(self) -> bool:
        return self.device.type == "cpu"

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype_name(self) -> str:
        return next(name for name, dtype in DTYPES.items() if dtype == self.dtype)

    def describe(self) -> str:
        """E.g. 'cuda:0 bfloat16' or 'cpu float32'."""
        index = torch.cuda.current_device() if self.is_cuda and self.device.index is None else self.device.index
        return f"{self.device.type}{'' if index is None else f':{index}'} {self.dtype_name}"

    def place(self, model: nn.Module) -> nn.Module:
        """`model` moved to the device, its floating-point weights cast to the dtype (in place; returned)."""
        return model.to(device=self.device, dtype=self.dtype)

    def inputs(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` on the device, floating point cast to the dtype (integers, e.g. token ids, keep theirs); a copy
        from the host to a GPU goes through pinned memory without blocking the host."""
        if tensor.is_floating_point() and tensor.dtype != self.dtype:
            tensor = tensor.to(self.dtype)
        if self.is_cuda and tensor.device.type == "cpu":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def batch(self, samples: Sequence[torch.Tensor]) -> torch.Tensor:
        """Samples of one shape stacked into (N, ...) on the device; for a GPU they are stacked straight into pinned
        host memory (one copy fewer than stack + pin) and sent without blocking."""
        first = samples[0]
        dtype = self.dtype if first.is_floating_point() else first.dtype
        if not (self.is_cuda and first.device.type == "cpu"):
            return torch.stack(list(samples)).to(device=self.device, dtype=dtype)
        pinned = torch.empty((len(samples), *first.shape), dtype=dtype, pin_memory=True)
        for row, sample in enumerate(samples):
            pinned[row].copy_(sample)
        return pinned.to(self.device, non_blocking=True)

    def unused_gpu(self) -> str | None:
        """A hint when this placement is the CPU but torch sees a CUDA GPU (the CLIs default to the CPU)."""
        if self.is_cpu and torch.cuda.is_available():
            return f"torch sees a CUDA GPU ({torch.cuda.get_device_name(0)}): --device cuda (or auto) runs there"
        return None

    def synchronize(self) -> None:
        """Wait for the device's queued work (timings on a GPU); nothing on the CPU."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
