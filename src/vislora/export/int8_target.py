"""Which INT8 settings suit the CPU a model will run on: its instruction set read, a target chosen, settings for it.

onnxruntime's x86 kernels multiply UINT8 activations by INT8 weights. Without VNNI (AVX2, or AVX-512 without
VNNI) they use `vpmaddubsw`, which adds two u8 x s8 products into a 16-bit lane and saturates there:
2 x 255 x 127 = 64,770 > 32,767. `reduce_range` quantizes the weights to [-64, 64] instead of [-127, 127], so the
pair sum stays <= 2 x 255 x 64 = 32,640 and never saturates, at the cost of one bit of weight precision.
VNNI (`vpdpbusd`, AVX-VNNI and AVX-512 VNNI) and AMX accumulate straight into 32 bits, and ARM64's NEON and dot
product kernels do not saturate either, so there the full 8-bit range is kept.

Targets (`vislora export onnx --int8 --int8-target ...`):
    auto      the CPU doing the export (the report's latency and accuracy are measured on it too)
    vnni      x86 with AVX-VNNI, AVX-512 VNNI or AMX-INT8: full-range INT8 weights
    avx512    x86 with AVX-512BW but no VNNI: 7-bit weights (reduce_range)
    avx2      x86 with AVX2 but no VNNI: 7-bit weights (reduce_range)
    arm64     aarch64 (NEON; sdot/i8mm where present): full-range INT8 weights
    portable  any CPU, e.g. a mixed fleet or an unknown one: 7-bit weights, which saturate nowhere
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vislora.errors import ExportError

CPUINFO = Path("/proc/cpuinfo")
OP_TYPES = ("MatMul",)

# (cpuinfo flag, instruction set name), best first: the first flag present names the CPU's INT8 instruction set.
X86_ISAS = (("amx_int8", "amx_int8"), ("avx512_vnni", "avx512_vnni"), ("avx_vnni", "avx_vnni"),
            ("avx512bw", "avx512bw"), ("avx2", "avx2"))
ARM64_ISAS = (("i8mm", "arm64_i8mm"), ("asimddp", "arm64_dotprod"), ("asimd", "arm64"))
TARGET_OF_ISA = {"amx_int8": "vnni", "avx512_vnni": "vnni", "avx_vnni": "vnni", "avx512bw": "avx512",
                 "avx2": "avx2", "arm64_i8mm": "arm64", "arm64_dotprod": "arm64", "arm64": "arm64",
                 "unknown": "portable"}
TARGETS = ("auto", "vnni", "avx512", "avx2", "arm64", "portable")


@dataclass(frozen=True)
class CpuInfo:
    """A CPU as INT8 cares about it: model name, architecture, and its best INT8 instruction set."""

    model: str
    arch: str
    isa: str  # one of TARGET_OF_ISA's keys
    int8_flags: tuple[str, ...] = ()  # the INT8-relevant flags seen, best first

    @property
    def target(self) -> str:
        """The INT8 target this CPU is (vnni, avx512, avx2, arm64 or portable)."""
        return TARGET_OF_ISA[self.isa]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "int8_flags": list(self.int8_flags)}


@dataclass(frozen=True)
class Int8Settings:
    """onnxruntime `quantize_static` settings for one target, and why (recorded in int8_report.json).

    Targets differ only in `reduce_range`; the fields after `reason` are the same for all (docs/export.md says why)
    and are recorded so a report names everything the file was made with."""

    target: str
    reduce_range: bool
    reason: str
    format: str = "QDQ"
    per_channel: bool = True
    weights: str = "int8 symmetric"
    activations: str = "uint8"
    calibration: str = "MinMax"
    op_types: tuple[str, ...] = field(default=OP_TYPES)

    @property
    def weight_range(self) -> tuple[int, int]:
        """The integer range the weights are quantized to: [-64, 64] with reduce_range, else [-127, 127]."""
        return (-64, 64) if self.reduce_range else (-127, 127)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "op_types": list(self.op_types), "weight_range": list(self.weight_range)}


_FULL = "no 16-bit saturation on {}: full-range INT8 weights"
_REDUCED = ("u8 x s8 pair sums saturate at 16 bits in vpmaddubsw without VNNI ({}): 7-bit weights (reduce_range) "
            "keep them <= 32,640")
SETTINGS = {
    "vnni": Int8Settings("vnni", False, _FULL.format("VNNI/AMX (vpdpbusd accumulates in 32 bits)")),
    "avx512": Int8Settings("avx512", True, _REDUCED.format("AVX-512BW")),
    "avx2": Int8Settings("avx2", True, _REDUCED.format("AVX2")),
    "arm64": Int8Settings("arm64", False, _FULL.format("ARM64 (NEON widening multiplies, sdot/udot)")),
    "portable": Int8Settings("portable", True, "target CPU unknown: 7-bit weights (reduce_range) saturate on none"),
}


def parse_cpuinfo(text: str, machine: str | None = None) -> CpuInfo:
    """The CpuInfo described by a /proc/cpuinfo text (its first processor); `machine` defaults to this one's."""
    fields = _first_processor(text)
    arch = (machine or platform.machine()).lower()
    if arch in ("x86_64", "amd64", "i686", "i386"):
        flags = set(fields.get("flags", "").split())
        model = fields.get("model name") or platform.processor() or arch
        table = X86_ISAS
    elif arch in ("aarch64", "arm64"):
        flags = set(fields.get("features", "").split())
        model = fields.get("model name") or _arm_model(fields) or arch
        table = ARM64_ISAS
    else:
        return CpuInfo(fields.get("model name") or fields.get("cpu") or arch, arch, "unknown")
    seen = tuple(flag for flag, _ in table if flag in flags)
    isa = next((name for flag, name in table if flag in flags), "unknown")
    return CpuInfo(model, arch, isa, seen)


def _first_processor(text: str) -> dict[str, str]:
    """`key: value` lines of the first block (keys lower-cased); ARM kernels put Features in it too."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    return fields


def _arm_model(fields: dict[str, str]) -> str | None:
    implementer, part = fields.get("cpu implementer"), fields.get("cpu part")
    return f"ARM implementer {implementer} part {part}" if implementer and part else None


def this_cpu(cpuinfo: Path = CPUINFO) -> CpuInfo:
    """This machine's CpuInfo, read from /proc/cpuinfo (isa "unknown" where there is none, e.g. macOS)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        text = ""
    return parse_cpuinfo(text)


def int8_settings(target: str = "auto", cpu: CpuInfo | None = None) -> Int8Settings:
    """The settings for `target`; "auto" takes `cpu`'s target (default: this machine's)."""
    if target not in TARGETS:
        raise ExportError(f"unknown INT8 target {target!r}; use one of {', '.join(TARGETS)} (auto: the CPU doing the "
                          "export; avx2 for x86 without VNNI, vnni with it, portable when unsure)")
    if target == "auto":
        target = (cpu or this_cpu()).target
    return SETTINGS[target]
