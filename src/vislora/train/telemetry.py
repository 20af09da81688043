"""Training telemetry: step time (data loading apart), peak memory per logging interval, checkpoint size.

The trainer merges `Telemetry.row()` into every train row of metrics.jsonl:

  step_s                  seconds per optimizer step (mean over the steps since the last train row): from the end
                          of the previous step's bookkeeping (evaluation, checkpoint) to the end of this step's
                          optimizer update, so evaluation and checkpoint writing are not in it
  data_s                  the part of step_s spent waiting for the DataLoader (mean per step)
  peak_rss_mib            the process's peak resident memory since the last train row (MiB): VmHWM of
                          /proc/self/status, reset at every row by writing 5 to /proc/self/clear_refs (Linux);
                          where that reset is refused the figure is the lifetime peak (getrusage ru_maxrss), and
                          `MemoryProbe.scope` (in summary.json) says "lifetime" instead of "interval". The reset
                          also lowers what ru_maxrss reports for this process (the kernel reads the same counter)
  peak_cuda_mib           on CUDA: torch.cuda.max_memory_allocated since the last row (reset_peak_memory_stats)
  peak_cuda_reserved_mib  on CUDA: torch.cuda.max_memory_reserved, what the caching allocator held

Checkpoint writes are rows of their own (split "checkpoint": path, bytes on disk, seconds to write).
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

MIB = 1024 * 1024
STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")

T = TypeVar("T")


def status_mib(field: str) -> float | None:
    """A memory line of /proc/self/status (VmRSS, VmHWM, ...) in MiB; None where /proc is not there."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024  # the kernel writes kB
    except OSError:
        return None
    return None


def lifetime_peak_rss_mib() -> float:
    """getrusage's ru_maxrss: the peak resident memory since the process started (KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024


def reset_peak_rss() -> bool:
    """Set VmHWM back to the current RSS (Linux >= 4.0); False where the kernel or /proc refuses."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return status_mib("VmHWM") is not None


class MemoryProbe:
    """Peak memory of this process since the last `reset()`: resident memory, and CUDA memory on a CUDA device."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.scope = "interval" if reset_peak_rss() else "lifetime"
        self.reset()

    def reset(self) -> None:
        if self.scope == "interval":
            reset_peak_rss()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peaks(self) -> dict[str, float]:
        """peak_rss_mib, and on CUDA peak_cuda_mib / peak_cuda_reserved_mib, rounded to 0.1 MiB."""
        rss = status_mib("VmHWM") if self.scope == "interval" else None
        peaks = {"peak_rss_mib": round(rss if rss is not None else lifetime_peak_rss_mib(), 1)}
        if self.cuda:
            peaks["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(self.device) / MIB, 1)
            peaks["peak_cuda_reserved_mib"] = round(torch.cuda.max_memory_reserved(self.device) / MIB, 1)
        return peaks


class Telemetry:
    """Step clock and memory probe of one training process; `row()` closes a logging interval."""

    def __init__(self, device: torch.device) -> None:
        self.memory = MemoryProbe(device)
        self.rss_at_start_mib = status_mib("VmRSS")
        self._step_start = time.perf_counter()
        self._waiting = 0.0  # DataLoader wait of the step under way
        self._steps, self._step_seconds, self._data_seconds = 0, 0.0, 0.0

    def start_step(self) -> None:
        """The next optimizer step starts now (its first micro-batch is fetched after this)."""
        self._step_start = time.perf_counter()
        self._waiting = 0.0

    def waited(self, seconds: float) -> None:
        """Seconds the step under way spent waiting for a micro-batch."""
        self._waiting += seconds

    def end_step(self) -> float:
        """The optimizer step is done; its wall time in seconds."""
        seconds = time.perf_counter() - self._step_start
        self._steps += 1
        self._step_seconds += seconds
        self._data_seconds += self._waiting
        return seconds

    def row(self) -> dict[str, float]:
        """Mean step and data time of the steps since the last row, and the peak memory since then; then reset."""
        steps = max(self._steps, 1)
        row = {"step_s": round(self._step_seconds / steps, 6), "data_s": round(self._data_seconds / steps, 6),
               **self.memory.peaks()}
        self._steps, self._step_seconds, self._data_seconds = 0, 0.0, 0.0
        self.memory.reset()
        return row

    def summary(self) -> dict[str, Any]:
        """What summary.json records about the measurements: device, peak RSS scope, RSS when training started."""
        return {"device": str(self.memory.device), "peak_rss_scope": self.memory.scope,
                "rss_at_start_mib": round(self.rss_at_start_mib, 1) if self.rss_at_start_mib is not None else None}


def timed(items: Iterable[T], record: Callable[[float], None]) -> Iterator[T]:
    """`items`, with the seconds spent producing each one passed to `record` (the DataLoader wait of a step)."""
    iterator = iter(items)
    while True:
        start = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        record(time.perf_counter() - start)
        yield item


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under `folder`: what a checkpoint takes on disk (file sizes, not blocks)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
