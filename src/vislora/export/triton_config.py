"""Triton model configs: the names Triton accepts, CPU or GPU instances, and config.pbtxt parsed into Triton's own
`ModelConfig` protobuf (shipped in the `tritonclient[grpc]` package), or field by field without it."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vislora.errors import ExportError

logger = logging.getLogger(__name__)

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


def batching(max_batch_size: int, gpus: Sequence[int] | None = None) -> str:
    """The end of every config.pbtxt we write: dynamic batching (preferred: half the maximum and the maximum) and
    its instances (`instance_group`)."""
    preferred = sorted({b for b in (max_batch_size // 2, max_batch_size) if b >= 1})
    return f"""dynamic_batching {{
  preferred_batch_size: [ {", ".join(map(str, preferred))} ]
  max_queue_delay_microseconds: 500
}}
{instance_group(gpus)}"""


def instance_group(gpus: Sequence[int] | None = None) -> str:
    """A config.pbtxt instance_group: one CPU instance (gpus None), one instance on each GPU listed, or one on every
    GPU Triton sees (gpus empty)."""
    if gpus is None:
        return "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n"
    if any(not isinstance(g, int) or g < 0 for g in gpus):
        raise ExportError(f"Triton GPUs must be indices >= 0, got {list(gpus)}; e.g. --triton-gpus 0,1")
    listed = f"\n    gpus: [ {', '.join(map(str, gpus))} ]" if gpus else ""
    return f"instance_group [\n  {{\n    count: 1\n    kind: KIND_GPU{listed}\n  }}\n]\n"


def parse_gpus(text: str | None) -> tuple[int, ...] | None:
    """--triton-gpus: None or '' -> None (CPU instances), 'all' -> () (every GPU), '0,1' -> (0, 1)."""
    if text is None or not text.strip():
        return None
    if text.strip() == "all":
        return ()
    try:
        gpus = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ExportError(f"--triton-gpus {text!r} is not a list of GPU indices; use e.g. 0 or 0,1, or all") from None
    if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise ExportError(f"--triton-gpus {text!r}: GPU indices must be distinct and >= 0, e.g. 0,1")
    return gpus


def parse_config(path: Path) -> tuple[Any, bool]:
    """(config.pbtxt parsed into Triton's ModelConfig protobuf, True) or (a dict of its top fields, False)."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        logger.info("tritonclient[grpc] is not installed: config.pbtxt is checked field by field, not by protobuf")
        return _fields(path.read_text()), False
    try:
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig()), True
    except text_format.ParseError as exc:
        raise ExportError(f"{path} is not a valid Triton ModelConfig: {exc}") from None


def _fields(text: str) -> dict[str, Any]:
    values = dict(re.findall(r'^(name|platform|max_batch_size): "?([^"\n]+)"?$', text, re.M))
    return {"name": values.get("name"), "platform": values.get("platform"),
            "max_batch_size": int(values.get("max_batch_size", 0))}
