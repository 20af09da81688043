"""The run directory's bookkeeping: the metrics log, config comparison on resume, in-place weight loading."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from vislora.errors import VisloraError
from vislora.io import atomic_write_text


class TrainingError(VisloraError, RuntimeError):
    """Training cannot go on (NaN/Inf loss for too long, a run directory that does not match)."""


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed as written, fsynced at checkpoints.

    A kill can tear the last line; `truncate(step)` (on resume) drops torn lines and lines past `step`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None

    def write(self, row: dict[str, Any]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the run)
        self._file.write(json.dumps({**row, "time": round(time.time(), 3)}) + "\n")
        self._file.flush()

    def sync(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def truncate(self, step: int) -> None:
        """Keep the lines up to `step` (a killed run may have logged past its last checkpoint)."""
        self.close()
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if row.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))


def changed_keys(previous: dict[str, Any], current: dict[str, Any], ignore: set[str]) -> list[str]:
    """Dotted keys whose values differ between two config dumps."""
    a, b = _flatten(previous), _flatten(current)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in ignore)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key not in ("rank_pattern", "alpha_pattern"):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
