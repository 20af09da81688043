"""A Triton Inference Server model repository: REPO/NAME/config.pbtxt, 1/model.onnx (fp32), 2/model.onnx (INT8).

The model folder is built beside the repository and renamed into it, so a polling tritonserver never sees
a partial model. `check_model_dir` parses config.pbtxt into Triton's own `ModelConfig` protobuf (shipped in
the `tritonclient[grpc]` package), checks it against each ONNX file's inputs and outputs, and runs every
version with onnxruntime at batch 1 and at max_batch_size.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vislora.errors import ExportError
from vislora.export.common import INPUT_NAME, OUTPUT_NAME, is_dual, staged_dir
from vislora.export.dual_triton import DualTritonExport, export_dual_triton
from vislora.export.int8_target import int8_settings
from vislora.export.onnx import OnnxCheck
from vislora.export.pipeline import Log, load_and_merge, prepare_int8, write_metadata, write_onnx_pair
from vislora.export.quantize import QuantizeReport
from vislora.export.runtime import inference_session
from vislora.export.triton_config import MODEL_NAME, batching, parse_config

logger = logging.getLogger(__name__)

VERSIONS = {1: "fp32", 2: "INT8"}


@dataclass
class TritonExport:
    """The model folder written into the repository, what it holds, and what was measured."""

    model_dir: Path
    versions: dict[int, str]
    config: str
    check: OnnxCheck
    report: QuantizeReport | None
    validated_with_protobuf: bool


def config_pbtxt(name: str, image_size: int, output_dims: list[int], max_batch_size: int, versions: list[int],
                 labels: bool, gpus: Sequence[int] | None = None) -> str:
    """config.pbtxt for the onnxruntime backend: dynamic batching, a CPU instance (or one on each of `gpus`, every
    GPU if empty), all versions served."""
    label = '\n    label_filename: "labels.txt"' if labels else ""
    policy = "version_policy: { all { } }\n" if len(versions) > 1 else ""
    notes = ", ".join(f"{v} = {VERSIONS[v]}" for v in versions)
    return f"""# written by vislora export triton; versions: {notes}
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
{policy}input [
  {{
    name: "{INPUT_NAME}"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, {image_size}, {image_size} ]
  }}
]
output [
  {{
    name: "{OUTPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ {", ".join(map(str, output_dims))} ]{label}
  }}
]
{batching(max_batch_size, gpus)}"""


def export_triton(adapter_dir: str | Path, repo: str | Path, name: str, base: str | None = None,
                  int8: bool = False, calibration: str | Path | None = None, eval_data: str | Path | None = None,
                  calibration_limit: int | None = 128, eval_limit: int | None = None, max_batch_size: int = 8,
                  threads: int | None = None, overwrite: bool = False, log: Log = logger.info,
                  int8_target: str = "auto", device: str = "cpu", gpus: Sequence[int] | None = None
                  ) -> TritonExport | DualTritonExport:
    """Write REPO/NAME as a Triton model: fp32 ONNX as version 1 and, with `int8`, the INT8 model as version 2.
    `gpus` gives Triton KIND_GPU instances (one on each GPU listed, on every GPU if empty; None: one CPU instance);
    `device` is where the export's own onnxruntime checks run (vislora.export.runtime).

    A contrastive or few-shot run becomes two models, REPO/NAME_image and REPO/NAME_text
    (`vislora.export.dual_triton`). `int8_target` names the CPU the INT8 model will run on (auto: this one)."""
    if is_dual(adapter_dir):
        return export_dual_triton(adapter_dir, repo, name, base=base, int8=int8, max_batch_size=max_batch_size,
                                  overwrite=overwrite, log=log, device=device, gpus=gpus)
    if not MODEL_NAME.fullmatch(name):
        raise ExportError(f"model name {name!r} is not usable as a Triton model folder; use letters, digits, '_', "
                          "'-' or '.', e.g. fmnist_dinov2")
    if max_batch_size < 1:
        raise ExportError(f"max_batch_size must be >= 1 (got {max_batch_size}); it bounds Triton's dynamic batches")
    if int8:
        int8_settings(int8_target)  # an unknown target fails before any work
    data = prepare_int8(adapter_dir, calibration, eval_data, calibration_limit, eval_limit) if int8 else None
    item, plain, difference = load_and_merge(adapter_dir, base)
    repo = Path(repo)
    versions = [1, 2] if int8 else [1]
    with staged_dir(repo / name, overwrite, staging_parent=repo.resolve().parent) as tmp:
        check, report = write_onnx_pair(item, plain, tmp / "1" / "model.onnx",
                                        tmp / "2" / "model.onnx" if int8 else None, data, max_batch_size, threads, log,
                                        int8_target=int8_target, device=device)
        write_metadata(tmp, item, check, difference, report)
        dims = output_dims(tmp / "1" / "model.onnx")
        text = config_pbtxt(name, item.spec.size, dims, max_batch_size, versions, labels=bool(item.classes),
                            gpus=gpus)
        (tmp / "config.pbtxt").write_text(text)
        validated = check_model_dir(tmp, name, device)
    return TritonExport(repo / name, {v: VERSIONS[v] for v in versions}, text, check, report, validated)


def output_dims(path: Path) -> list[int]:
    """The output's dims after the batch axis (-1 where the ONNX file leaves a dim symbolic)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    output = next(o for o in graph.output if o.name == OUTPUT_NAME)
    dims = output.type.tensor_type.shape.dim[1:]
    return [d.dim_value if d.HasField("dim_value") else -1 for d in dims]


def check_model_dir(model_dir: str | Path, name: str | None = None, device: str = "cpu") -> bool:
    """Check a model folder as tritonserver would load it, and run each version (onnxruntime on `device`'s
    provider); True if protobuf-validated."""
    model_dir = Path(model_dir)
    config, validated = parse_config(model_dir / "config.pbtxt")
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key)
    expected = name or model_dir.name
    if get("name") != expected or get("platform") != "onnxruntime_onnx":
        raise ExportError(f"{model_dir}/config.pbtxt names model {get('name')!r} on {get('platform')!r}; Triton "
                          f"needs name {expected!r} (the folder name) and platform 'onnxruntime_onnx'")
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions or versions[0] < 1:
        raise ExportError(f"{model_dir} has no version folder (1/, 2/, ...) holding model.onnx")
    for version in versions:
        _run_version(model_dir / str(version) / "model.onnx", config if validated else None, get("max_batch_size"),
                     device)
    return validated


def _run_version(path: Path, config: Any, max_batch_size: int, device: str = "cpu") -> None:
    if not path.is_file():
        raise ExportError(f"{path} is missing: every version folder needs its model.onnx")
    session = inference_session(path, device)
    (inp,), outputs = session.get_inputs(), {o.name: o for o in session.get_outputs()}
    if inp.name != INPUT_NAME or OUTPUT_NAME not in outputs:
        raise ExportError(f"{path} has input {inp.name!r} and outputs {list(outputs)}; config.pbtxt declares "
                          f"{INPUT_NAME!r} -> {OUTPUT_NAME!r}")
    if config is not None:
        declared_in, declared_out = list(config.input[0].dims), list(config.output[0].dims)
        if list(inp.shape[1:]) != declared_in:
            raise ExportError(f"{path}: input dims {inp.shape[1:]} differ from config.pbtxt's {declared_in}")
        got_out = [d if isinstance(d, int) else -1 for d in outputs[OUTPUT_NAME].shape[1:]]
        if got_out != declared_out:
            raise ExportError(f"{path}: output dims {got_out} differ from config.pbtxt's {declared_out}")
    for batch in sorted({1, max_batch_size}):
        x = np.zeros((batch, *inp.shape[1:]), dtype=np.float32)
        (y,) = session.run([OUTPUT_NAME], {INPUT_NAME: x})
        if y.shape[0] != batch or not np.isfinite(y).all():
            raise ExportError(f"{path} returned shape {y.shape} (finite: {np.isfinite(y).all()}) for a batch of "
                              f"{batch}; Triton's dynamic batching needs a dynamic, finite batch axis")
