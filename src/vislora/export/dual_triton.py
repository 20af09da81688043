"""`vislora export triton` for dual-encoder runs: two Triton models in one repository.

    REPO/NAME_image/config.pbtxt, 1/model.onnx   input [batch, 3, size, size] fp32 -> image_embeds [batch, dim]
    REPO/NAME_text/config.pbtxt,  1/model.onnx   input_ids, attention_mask [batch, tokens] int64 -> text_embeds
                                  tokenizer/     the tokenizer files the client runs before calling it

Both folders carry export.json (preprocessing, tokenizer settings, logit scale, zero-shot classifier when the run
has class names). Each is built beside the repository and renamed into it; each config.pbtxt is parsed into
Triton's ModelConfig protobuf, checked against its ONNX file, and run with onnxruntime at batch 1 and max_batch_size.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vislora.errors import ExportError
from vislora.export.common import staged_dir
from vislora.export.dual import (
    INT8_REFUSAL,
    TowerCheck,
    load_dual_exportable,
    plain_dual,
    save_tokenizer,
    write_dual_metadata,
    write_towers,
)
from vislora.export.runtime import inference_session
from vislora.export.triton_config import MODEL_NAME, batching, parse_config

logger = logging.getLogger(__name__)

TYPES = {"tensor(float)": ("TYPE_FP32", np.float32), "tensor(int64)": ("TYPE_INT64", np.int64)}


@dataclass
class DualTritonExport:
    """The two model folders written into the repository and what was measured."""

    model_dirs: dict[str, Path]
    configs: dict[str, str]
    check: TowerCheck
    validated_with_protobuf: bool

    @property
    def model_dir(self) -> Path:
        return self.model_dirs["image"]

    def lines(self) -> list[str]:
        checked = "parsed as Triton's ModelConfig" if self.validated_with_protobuf else "checked field by field"
        return [str(self.check),
                f"wrote {self.model_dirs['image']} and {self.model_dirs['text']} (version 1, fp32); config.pbtxt "
                f"{checked}"]


def tower_config(name: str, path: Path, max_batch_size: int, note: str, gpus: Sequence[int] | None = None) -> str:
    """config.pbtxt of one ONNX tower: its inputs and outputs as the file declares them, after the batch axis."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def tensors(items: list[Any], image: bool) -> str:
        blocks = []
        for item in items:
            if item.type not in TYPES:
                raise ExportError(f"{path}: {item.name} has type {item.type}; the Triton export handles "
                                  f"{', '.join(TYPES)}")
            dims = ", ".join(str(d) if isinstance(d, int) else "-1" for d in item.shape[1:])
            layout = "\n    format: FORMAT_NCHW" if image and len(item.shape) == 4 else ""
            blocks.append(f"  {{\n    name: \"{item.name}\"\n    data_type: {TYPES[item.type][0]}{layout}\n"
                          f"    dims: [ {dims} ]\n  }}")
        return ",\n".join(blocks)

    return f"""# written by vislora export triton; {note}
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [
{tensors(session.get_inputs(), True)}
]
output [
{tensors(session.get_outputs(), False)}
]
{batching(max_batch_size, gpus)}"""


def check_tower_dir(model_dir: Path, name: str, device: str = "cpu") -> bool:
    """Parse config.pbtxt, compare it with 1/model.onnx, run it at batch 1 and max_batch_size (onnxruntime on
    `device`'s provider); True if the config was parsed with Triton's protobuf."""
    config, validated = parse_config(model_dir / "config.pbtxt")
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key)
    if get("name") != name or get("platform") != "onnxruntime_onnx":
        raise ExportError(f"{model_dir}/config.pbtxt names model {get('name')!r} on {get('platform')!r}; Triton "
                          f"needs name {name!r} (the folder name) and platform 'onnxruntime_onnx'")
    path = model_dir / "1" / "model.onnx"
    session = inference_session(path, device)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if validated:
        declared = {i.name: list(i.dims) for i in config.input}
        for item in inputs:
            got = [d if isinstance(d, int) else -1 for d in item.shape[1:]]
            if declared.get(item.name) != got:
                raise ExportError(f"{path}: input {item.name} dims {got} differ from config.pbtxt's "
                                  f"{declared.get(item.name)}")
        if {o.name for o in config.output} != {o.name for o in outputs}:
            raise ExportError(f"{path}: outputs {[o.name for o in outputs]} differ from config.pbtxt's")
    for batch in sorted({1, get("max_batch_size")}):
        feed = {}
        for item in inputs:
            dims = [d if isinstance(d, int) else 4 for d in item.shape[1:]]  # 4 tokens where the length is free
            feed[item.name] = np.ones((batch, *dims), dtype=TYPES[item.type][1])
        (y,) = session.run([outputs[0].name], feed)
        if y.shape[0] != batch or not np.isfinite(y).all():
            raise ExportError(f"{path} returned shape {y.shape} (finite: {np.isfinite(y).all()}) for a batch of "
                              f"{batch}; Triton's dynamic batching needs a dynamic, finite batch axis")
    return validated


def export_dual_triton(adapter_dir: str | Path, repo: str | Path, name: str, base: str | None = None,
                       int8: bool = False, max_batch_size: int = 8, overwrite: bool = False,
                       log: Any = logger.info, device: str = "cpu", gpus: Sequence[int] | None = None
                       ) -> DualTritonExport:
    """Write REPO/NAME_image and REPO/NAME_text (see the module docstring); `gpus` and `device` as in
    vislora.export.triton.export_triton."""
    names = {"image": f"{name}_image", "text": f"{name}_text"}
    if not all(MODEL_NAME.fullmatch(n) for n in names.values()):
        raise ExportError(f"model name {name!r} is not usable as a Triton model folder; use letters, digits, '_', "
                          "'-' or '.', e.g. clip_dinov2")
    if max_batch_size < 1:
        raise ExportError(f"max_batch_size must be >= 1 (got {max_batch_size}); it bounds Triton's dynamic batches")
    if int8:
        raise ExportError(INT8_REFUSAL)
    repo = Path(repo)
    for tower, folder_name in names.items():
        if (repo / folder_name).exists() and not overwrite:
            raise ExportError(f"{repo / folder_name} already exists (the {tower} tower of {name!r}); choose another "
                              "name or pass --overwrite to replace it")
    item = load_dual_exportable(adapter_dir, base)
    plain, difference, _ = plain_dual(item)
    staging = repo.resolve().parent
    with staged_dir(repo / names["image"], overwrite, staging) as image_dir, \
            staged_dir(repo / names["text"], overwrite, staging) as text_dir:
        check, sequence = write_towers(item, plain, image_dir / "1", log, device)
        (text_dir / "1").mkdir()
        shutil.move(image_dir / "1" / "text.onnx", text_dir / "1" / "model.onnx")
        (image_dir / "1" / "image.onnx").rename(image_dir / "1" / "model.onnx")
        tokenizer = save_tokenizer(plain, text_dir / "tokenizer")
        for folder in (image_dir, text_dir):
            write_dual_metadata(folder, item, plain, check, difference, sequence, tokenizer,
                                {"image": f"../{names['image']}/1/model.onnx",
                                 "text": f"../{names['text']}/1/model.onnx"}, text_onnx=text_dir / "1" / "model.onnx")
        configs, validated = {}, True
        for tower, folder in (("image", image_dir), ("text", text_dir)):
            note = (f"the {tower} tower of {name!r} (version 1 = fp32); "
                    + ("pixels -> image_embeds" if tower == "image" else "tokenize with tokenizer/ -> text_embeds"))
            configs[tower] = tower_config(names[tower], folder / "1" / "model.onnx", max_batch_size, note, gpus)
            (folder / "config.pbtxt").write_text(configs[tower])
            validated = check_tower_dir(folder, names[tower], device) and validated
    return DualTritonExport({t: repo / n for t, n in names.items()}, configs, check, validated)
