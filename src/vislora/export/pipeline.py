"""`vislora export onnx`: adapter folder -> merged model -> model.onnx (+ model.int8.onnx and its report).

Every input is checked before any work (calibration and evaluation images first), and the output folder
is built in a temp folder and renamed into place, so it is either complete or absent.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from vislora.data.datasets import ImageDataset
from vislora.errors import ExportError
from vislora.export.calibration import (
    CalibrationReader,
    check_resolutions,
    open_images,
    run_config,
    training_resolutions,
)
from vislora.export.common import (
    INPUT_NAME,
    MERGE_ATOL,
    OUTPUT_NAME,
    Exportable,
    is_dual,
    load_exportable,
    plain_merged,
    preprocessing,
    staged_dir,
    write_json,
)
from vislora.export.dual import DualOnnxExport, export_dual_onnx_dir
from vislora.export.int8_target import int8_settings, this_cpu
from vislora.export.onnx import ONNX_ATOL, ONNX_RTOL, OnnxCheck, SizeAxes, check_onnx, export_onnx, size_axes
from vislora.export.quantize import QuantizeReport, compare_accuracy, measure_latency, quantize_int8, session
from vislora.tasks.multilabel import exported_task

logger = logging.getLogger(__name__)

Log = Callable[[str], Any]


@dataclass
class Int8Data:
    """Checked calibration and held-out images for INT8."""

    calibration: ImageDataset
    calibration_source: str
    evaluation: ImageDataset
    evaluation_source: str


@dataclass
class OnnxExport:
    """What `export_onnx_dir` wrote and measured."""

    out: Path
    model: Path
    int8: Path | None
    check: OnnxCheck
    merge_max_abs_diff: float
    report: QuantizeReport | None
    classes: list[str] | None
    image_size: int
    axes: SizeAxes | None = None  # dynamic height and width, when exported with them


def prepare_int8(adapter_dir: str | Path, calibration: str | Path | None, eval_data: str | Path | None = None,
                 calibration_limit: int | None = 128, eval_limit: int | None = None, seed: int = 0) -> Int8Data:
    """Open and check the calibration and held-out images: empty, unreadable, wrong resolution -> ExportError.

    Without `eval_data` the run's validation data (config.yaml `data.val`, `data.val_limit`) is used.
    """
    adapter_dir = Path(adapter_dir)
    if calibration is None:
        raise ExportError("INT8 needs calibration images: pass --calibration DIR|MANIFEST (images like the "
                          "training data, e.g. fashion-mnist:train for the demo)")
    task_file = adapter_dir / "task.json"
    classes = json.loads(task_file.read_text())["classes"] if task_file.is_file() else None
    config = run_config(adapter_dir)
    if eval_data is None and config is not None and config.data.val:
        eval_data, eval_limit = config.data.val, eval_limit or config.data.val_limit
    if eval_data is None or classes is None:
        raise ExportError("the INT8 accuracy report needs labelled held-out images and the class list of a trained "
                          "adapter folder (task.json): pass --eval-data DIR|MANIFEST and a run's adapter folder")
    if str(eval_data) == str(calibration):
        raise ExportError(f"calibration and evaluation data are the same ({calibration}); accuracy must be measured "
                          "on images the INT8 ranges were not fitted on: use e.g. the training split to calibrate")
    cal = open_images(calibration, calibration_limit, seed, "calibration")
    check_resolutions(cal, training_resolutions(adapter_dir))
    evaluation = open_images(eval_data, eval_limit, seed, "evaluation", classes=classes)
    if any(label < 0 for label in evaluation.labels()):
        raise ExportError(f"evaluation data {str(eval_data)!r} has unlabelled images; give a labelled folder/manifest")
    return Int8Data(cal, str(calibration), evaluation, str(eval_data))


def load_and_merge(adapter_dir: str | Path, base: str | None = None,
                   dynamic_size: bool = False) -> tuple[Exportable, nn.Module, float]:
    """(the adapter's Exportable, its merged plain module, max |merged - adapted|), raising if they differ."""
    item = load_exportable(adapter_dir, base, dynamic_size)
    plain, difference = plain_merged(item)
    if difference > MERGE_ATOL:
        raise ExportError(f"the merged model differs from the adapted one by {difference:.3g} (> {MERGE_ATOL:g})")
    return item, plain, difference


def write_onnx_pair(item: Exportable, plain: nn.Module, fp32_path: Path, int8_path: Path | None,
                    data: Int8Data | None, latency_batch: int = 8, threads: int | None = None,
                    log: Log = logger.info, axes: SizeAxes | None = None, int8_target: str = "auto",
                    device: str = "cpu") -> tuple[OnnxCheck, QuantizeReport | None]:
    """Write the fp32 ONNX file (checked against PyTorch with onnxruntime on `device`; with dynamic height and width
    `axes`, at twice the size too) and, given `int8_path`, the INT8 file for the CPU `int8_target`
    (vislora.export.int8_target) and its report (measured on the CPU, whose kernels the INT8 model is made for)."""
    size = item.spec.size
    fp32_path.parent.mkdir(parents=True, exist_ok=True)
    log(f"exporting ONNX ({size} px, dynamic batch" + (", height and width) ..." if axes else ") ..."))
    export_onnx(plain, size, fp32_path, axes=axes)
    check = check_onnx(plain, fp32_path, size, sides=(2 * size,) if axes else (), device=device)
    log(str(check))
    if int8_path is None or data is None:
        return check, None
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    cpu = this_cpu()
    settings = int8_settings(int8_target, cpu)
    log(f"calibrating INT8 for target {settings.target} on {len(data.calibration)} images (this CPU: {cpu.model}, "
        f"{cpu.isa}; {settings.reason}) ...")
    quantize_int8(fp32_path, int8_path, CalibrationReader(data.calibration, item.spec), settings)
    sessions = {"fp32": session(fp32_path, threads), "int8": session(int8_path, threads)}
    log(f"scoring fp32 and INT8 on {len(data.evaluation)} held-out images ...")
    accuracy, agreement, n = compare_accuracy(sessions, data.evaluation, item.spec)
    log(f"timing batch 1 and {latency_batch} ...")
    latency = measure_latency(sessions, size, (1, latency_batch))
    report = QuantizeReport(
        fp32_accuracy=accuracy["fp32"], int8_accuracy=accuracy["int8"], agreement=agreement, eval_images=n,
        eval_data=data.evaluation_source, calibration_images=len(data.calibration),
        calibration_data=data.calibration_source, threads=threads,
        settings={**settings.to_dict(), "requested": int8_target}, cpu=cpu.to_dict(), latency=latency,
        sizes_mb={"fp32": fp32_path.stat().st_size / 1e6, "int8": int8_path.stat().st_size / 1e6})
    return check, report


def export_onnx_dir(adapter_dir: str | Path, out: str | Path, base: str | None = None, int8: bool = False,
                    calibration: str | Path | None = None, eval_data: str | Path | None = None,
                    calibration_limit: int | None = 128, eval_limit: int | None = None, latency_batch: int = 8,
                    threads: int | None = None, overwrite: bool = False, dynamic_size: bool = False,
                    log: Log = logger.info, int8_target: str = "auto", device: str = "cpu"
                    ) -> OnnxExport | DualOnnxExport:
    """Write OUT/model.onnx (+ model.int8.onnx, int8_report.json), labels.txt and export.json; for a contrastive or
    few-shot run, both towers (`vislora.export.dual.export_dual_onnx_dir`). `dynamic_size` exports dynamic height and
    width too (vislora.export.onnx.SizeAxes), where the backbone supports them. `int8_target` names the CPU the INT8
    model will run on (auto: this one; vislora.export.int8_target.TARGETS). `device` (auto | cpu | cuda | cuda:N)
    picks onnxruntime's provider for the check against PyTorch (vislora.export.runtime); the file is the same."""
    if is_dual(adapter_dir):
        if dynamic_size:
            raise ExportError(f"{adapter_dir} is a dual-encoder run: its towers are exported at the trained size; "
                              "drop --dynamic-size")
        return export_dual_onnx_dir(adapter_dir, out, base=base, int8=int8, overwrite=overwrite, log=log,
                                    device=device)
    if int8:
        int8_settings(int8_target)  # an unknown target fails before any work
    data = prepare_int8(adapter_dir, calibration, eval_data, calibration_limit, eval_limit) if int8 else None
    item, plain, difference = load_and_merge(adapter_dir, base, dynamic_size)
    axes = size_axes(_backbone(plain), item.spec.size) if dynamic_size else None
    out = Path(out)
    with staged_dir(out, overwrite) as tmp:
        check, report = write_onnx_pair(item, plain, tmp / "model.onnx", tmp / "model.int8.onnx" if int8 else None,
                                        data, latency_batch, threads, log, axes, int8_target, device)
        write_metadata(tmp, item, check, difference, report, axes)
    return OnnxExport(out, out / "model.onnx", out / "model.int8.onnx" if int8 else None, check, difference, report,
                      item.classes, item.spec.size, axes)


def _backbone(plain: nn.Module) -> nn.Module:
    """The backbone inside a merged plain module (vislora.export.common.TensorOutput around a classifier)."""
    model = getattr(plain, "model", plain)
    return getattr(model, "backbone", model)


def write_metadata(folder: Path, item: Exportable, check: OnnxCheck, merge_difference: float,
                   report: QuantizeReport | None, axes: SizeAxes | None = None) -> None:
    """export.json (inputs, outputs, preprocessing, measured differences), labels.txt, int8_report.json."""
    spec = item.spec
    side: list[Any] = ["height", "width"] if axes else [spec.size, spec.size]
    write_json(folder / "export.json", {
        "base": item.base, "adapter": str(item.adapter_dir.resolve()), "input": {
            "name": INPUT_NAME, "shape": ["batch", 3, *side], "dtype": "float32",
            **({"sides": axes.to_dict()} if axes else {}),
            "preprocessing": {"resize_shorter_side": spec.size, "center_crop": spec.size, **preprocessing(spec)}},
        "output": {"name": OUTPUT_NAME, "classes": item.classes}, "task": exported_task(item.task),
        "merge_max_abs_diff": merge_difference,
        "onnx_max_abs_diff": {str(k): v for k, v in check.max_abs_diff.items()},
        **({"onnx_max_abs_diff_by_side": {str(k): v for k, v in check.sides.items()}} if axes else {}),
        "onnx_tolerance": {"atol": ONNX_ATOL, "rtol": ONNX_RTOL}})
    if item.classes:
        (folder / "labels.txt").write_text("".join(f"{c}\n" for c in item.classes))
    if report is not None:
        write_json(folder / "int8_report.json", report.to_dict())
