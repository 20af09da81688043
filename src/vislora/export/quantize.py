"""Static INT8 quantization with onnxruntime over real calibration images, and its accuracy/latency report.

Settings (measured on the demo's DINOv2-S + LoRA adapter; the table is in docs/export.md): QDQ format (the
one onnxruntime's CPU kernels are optimised for), per-channel symmetric INT8 weights, UINT8 activations
(onnxruntime's advice for x86), MinMax ranges merged batch by batch, MatMul nodes only: the linear layers and
attention products hold ~3/4 of the time, while LayerNorm, Softmax, GELU, the patch Conv and the position
resize stay fp32 and keep the accuracy (quantizing every op type cost 1.3 more points for no gain).
On x86 without VNNI the weights keep 7 bits (`reduce_range`) so the AVX2 kernels do not saturate; which
target gets what is `vislora.export.int8_target`."""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vislora.data.datasets import ImageDataset
from vislora.data.transforms import InputSpec
from vislora.export.calibration import CalibrationReader, preprocessed
from vislora.export.common import INPUT_NAME, OUTPUT_NAME
from vislora.export.int8_target import TARGET_OF_ISA, Int8Settings, int8_settings

logger = logging.getLogger(__name__)


def quantize_int8(fp32_path: str | Path, int8_path: str | Path, reader: CalibrationReader,
                  settings: Int8Settings | None = None) -> Path:
    """Write the static INT8 (QDQ, per-channel) version of `fp32_path`, calibrated on `reader`'s images, with
    `settings` for the CPU it will run on (default: this machine's, `int8_settings("auto")`)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    settings = settings or int8_settings()
    reader.rewind()
    advice = _DropAdvice()
    logging.getLogger().addFilter(advice)  # quantize_static advises quant_pre_process on the root logger
    try:
        quantize_static(str(fp32_path), str(int8_path), reader, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(settings.op_types), per_channel=settings.per_channel,
                        reduce_range=settings.reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"CalibStridedMinMax": 1})  # ranges merged batch by batch: bounded memory
    finally:
        logging.getLogger().removeFilter(advice)
    logger.info("INT8 for target %s (reduce_range %s) calibrated on %d images (%d batches)", settings.target,
                settings.reduce_range, reader.images, reader.batches_read)
    return Path(int8_path)


class _DropAdvice(logging.Filter):
    """Drop onnxruntime's advice to run quant_pre_process: measured, it changed nothing here (docs/export.md)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


def session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session; `threads` caps intra-op threads (None: onnxruntime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class Latency:
    """Milliseconds per call at one batch size."""

    batch: int
    p50_ms: float
    p95_ms: float
    calls: int


@dataclass
class QuantizeReport:
    """fp32 vs INT8 on the same held-out images and the same inputs, measured in one run."""

    fp32_accuracy: float
    int8_accuracy: float
    agreement: float
    eval_images: int
    eval_data: str
    calibration_images: int
    calibration_data: str
    threads: int | None
    settings: dict[str, Any]  # Int8Settings.to_dict() plus "requested": the target asked for (e.g. auto)
    cpu: dict[str, Any]  # CpuInfo.to_dict() of the machine that quantized and measured
    latency: dict[str, list[Latency]] = field(default_factory=dict)
    sizes_mb: dict[str, float] = field(default_factory=dict)

    @property
    def accuracy_drop_points(self) -> float:
        return 100 * (self.fp32_accuracy - self.int8_accuracy)

    def speedup(self, batch: int) -> float:
        """fp32 p50 / INT8 p50 at `batch`."""
        p50 = {name: next(x.p50_ms for x in rows if x.batch == batch) for name, rows in self.latency.items()}
        return p50["fp32"] / p50["int8"]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy_drop_points": self.accuracy_drop_points,
                "speedup_p50": {str(x.batch): self.speedup(x.batch) for x in self.latency["fp32"]}}

    def lines(self) -> list[str]:
        """The report as text lines (what the CLI prints)."""
        change = 100 * (self.int8_accuracy - self.fp32_accuracy)
        out = [f"accuracy on {self.eval_images} held-out images ({self.eval_data}): fp32 {self.fp32_accuracy:.4f}, "
               f"INT8 {self.int8_accuracy:.4f} ({change:+.2f} points; predictions agree: {100 * self.agreement:.1f}%)",
               f"calibrated on {self.calibration_images} images ({self.calibration_data}); onnxruntime CPU, "
               f"{self.threads or 'default'} threads",
               self.target_line()]
        for fp32, int8 in zip(self.latency["fp32"], self.latency["int8"], strict=True):
            out.append(f"batch {fp32.batch:>3}: fp32 p50 {fp32.p50_ms:.2f} ms p95 {fp32.p95_ms:.2f} ms | INT8 p50 "
                       f"{int8.p50_ms:.2f} ms p95 {int8.p95_ms:.2f} ms | x{self.speedup(fp32.batch):.2f}")
        return out

    def target_line(self) -> str:
        """Which CPU the INT8 file was made for and which one measured it."""
        settings, cpu = self.settings, self.cpu
        low, high = settings["weight_range"]
        line = (f"INT8 target {settings['target']} (asked: {settings['requested']}): weights in [{low}, {high}]"
                f"{' (reduce_range)' if settings['reduce_range'] else ''}; measured on {cpu['model']} "
                f"({cpu['arch']}, {cpu['isa']})")
        if settings["target"] not in (TARGET_OF_ISA[cpu["isa"]], "portable"):
            line += "; not the target CPU: its accuracy and speed may differ"
        return line


def compare_accuracy(sessions: dict[str, Any], dataset: ImageDataset, spec: InputSpec,
                     batch_size: int = 32) -> tuple[dict[str, float], float, int]:
    """({name: accuracy}, share of images where all sessions predict the same class, images scored)."""
    correct = dict.fromkeys(sessions, 0)
    agree = total = 0
    for batch in preprocessed(dataset, spec, batch_size):
        x, labels = batch["image"].numpy(), batch["label"].numpy()
        predictions = {name: s.run([OUTPUT_NAME], {INPUT_NAME: x})[0].argmax(-1) for name, s in sessions.items()}
        for name, predicted in predictions.items():
            correct[name] += int((predicted == labels).sum())
        stacked = np.stack(list(predictions.values()))
        agree += int((stacked == stacked[0]).all(axis=0).sum())
        total += len(labels)
    return {name: n / total for name, n in correct.items()}, agree / total, total


def measure_latency(sessions: dict[str, Any], image_size: int, batches: tuple[int, ...], calls: int = 30,
                    warmup: int = 3, seed: int = 0) -> dict[str, list[Latency]]:
    """p50/p95 wall-clock ms per call of each session at each batch size; sessions interleaved call by call."""
    rng = np.random.default_rng(seed)
    result: dict[str, list[Latency]] = {name: [] for name in sessions}
    names = list(sessions)
    for batch in batches:
        x = rng.standard_normal((batch, 3, image_size, image_size)).astype(np.float32)
        samples: dict[str, list[float]] = {name: [] for name in names}
        for i in range(warmup + calls):
            for name in names[i % len(names):] + names[: i % len(names)]:
                start = time.perf_counter()
                sessions[name].run([OUTPUT_NAME], {INPUT_NAME: x})
                if i >= warmup:
                    samples[name].append((time.perf_counter() - start) * 1e3)
        for name, values in samples.items():
            result[name].append(Latency(batch, statistics.median(values), _percentile(values, 95), len(values)))
    return result


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))
