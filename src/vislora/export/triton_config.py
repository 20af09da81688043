"""Triton model configs: the names Triton accepts, and config.pbtxt parsed into Triton's own `ModelConfig` protobuf
(shipped in the `tritonclient[grpc]` package), or field by field without it."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from vislora.errors import ExportError

logger = logging.getLogger(__name__)

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


def batching(max_batch_size: int) -> str:
    """The end of every config.pbtxt we write: dynamic batching (preferred: half the maximum and the maximum) and
    one CPU instance."""
    preferred = sorted({b for b in (max_batch_size // 2, max_batch_size) if b >= 1})
    return f"""dynamic_batching {{
  preferred_batch_size: [ {", ".join(map(str, preferred))} ]
  max_queue_delay_microseconds: 500
}}
instance_group [
  {{
    count: 1
    kind: KIND_CPU
  }}
]
"""


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
