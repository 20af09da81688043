"""Calibration images for static INT8: opened, checked and preprocessed exactly as in training evaluation.

A calibration set that is empty, unreadable, or of another resolution than the training images is an
error before anything is quantized. The training images' resolutions come from the run's config.yaml
(the folder above the adapter), the way the trainer itself reads its data.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from vislora.data.datasets import IMAGE_SUFFIXES, ImageDataset, Record, collate, open_dataset
from vislora.data.transforms import InputSpec
from vislora.errors import ExportError, VisloraError
from vislora.export.common import INPUT_NAME
from vislora.runs import run_config

logger = logging.getLogger(__name__)

Resolution = tuple[int, int]
REFERENCE_SAMPLE = 256  # training images whose headers are read to learn the training resolutions


def open_images(source: str | Path, limit: int | None = None, seed: int = 0, what: str = "calibration",
                classes: list[str] | None = None) -> ImageDataset:
    """A flat folder of images, a class-subfolder folder, a .csv/.jsonl manifest, or fashion-mnist:<split>."""
    path = Path(str(source))
    flat = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else []
    if flat:
        dataset = ImageDataset([Record(str(p)) for p in flat], name=str(path))
    else:
        try:
            dataset = open_dataset(source, classes=classes)
        except (VisloraError, OSError) as exc:  # DataError, or a missing Fashion-MNIST
            raise ExportError(f"{what} data {str(source)!r} cannot be opened: {exc}") from None
    if len(dataset) == 0:
        raise ExportError(f"{what} data {str(source)!r} holds no images; give a folder of images, a manifest, or "
                          "fashion-mnist:train")
    return dataset.subset(limit, seed=seed) if limit else dataset


def training_resolutions(adapter_dir: Path) -> Counter | None:
    """Resolutions of (a sample of) the images the adapter was trained on, or None when the run is unknown."""
    config = run_config(adapter_dir)
    if config is None:
        return None
    data = config.data
    try:
        train = open_dataset(data.train, label_column=data.label_column, path_column=data.path_column)
    except (VisloraError, OSError) as exc:  # moved or deleted training data: the check cannot be made, say so
        logger.warning("cannot open the training data %s (%s): calibration resolutions are not checked",
                       data.train, exc)
        return None
    counts = train.subset(REFERENCE_SAMPLE).resolutions()
    counts.pop(None, None)
    return counts


def check_resolutions(dataset: ImageDataset, expected: Counter | None) -> Counter:
    """Raise unless every calibration image has a training resolution (within the training range if mixed)."""
    seen = dataset.resolutions()
    unreadable = seen.pop(None, 0)
    if not seen:
        raise ExportError(f"calibration data {dataset.name!r}: none of its {unreadable} images can be read")
    if not expected:
        return seen
    if len(expected) == 1:
        wrong = {size: n for size, n in seen.items() if size not in expected}
        wanted = "x".join(map(str, next(iter(expected))))
    else:
        (w0, w1), (h0, h1) = ((min(s[i] for s in expected), max(s[i] for s in expected)) for i in (0, 1))
        wrong = {s: n for s, n in seen.items() if not (w0 <= s[0] <= w1 and h0 <= s[1] <= h1)}
        wanted = f"{w0}-{w1} x {h0}-{h1}"
    if wrong:
        top = ", ".join(f"{w}x{h}: {n}" for (w, h), n in Counter(wrong).most_common(4))
        raise ExportError(f"calibration data {dataset.name!r} has images at other resolutions than the training "
                          f"images ({wanted}): {top}. INT8 ranges calibrated on other images misquantize the real "
                          "ones; calibrate on images like the training data (e.g. a part of its training split)")
    return seen


class CalibrationReader:
    """onnxruntime `CalibrationDataReader`: batches of preprocessed images fed as {"input": array}.

    `len()` counts batches and `set_range` selects some, which lets quantize_static collect ranges one stride
    of batches at a time (`CalibStridedMinMax`), so memory stays bounded however many images calibrate.
    """

    def __init__(self, dataset: ImageDataset, spec: InputSpec, batch_size: int = 16) -> None:
        self.dataset = dataset
        self.spec = spec
        self.batch_size = batch_size
        self.batches_read = 0
        self._range = (0, len(self))
        self._batches: Iterator[np.ndarray] | None = None

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    @property
    def images(self) -> int:
        return len(self.dataset)

    def batches(self) -> Iterator[np.ndarray]:
        """Each batch [batch, 3, size, size] float32 of the selected range, transformed like evaluation images."""
        start, end = (i * self.batch_size for i in self._range)
        subset = torch.utils.data.Subset(self.dataset, range(start, min(end, len(self.dataset))))
        for batch in preprocessed(subset, self.spec, self.batch_size):
            yield batch["image"].numpy()

    def set_range(self, start_index: int, end_index: int) -> None:
        self._range = (start_index, end_index)
        self._batches = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._batches is None:
            self._batches = self.batches()
        array = next(self._batches, None)
        if array is None:
            return None
        self.batches_read += 1
        return {INPUT_NAME: array}

    def rewind(self) -> None:
        self.set_range(0, len(self))


def preprocessed(dataset: ImageDataset | torch.utils.data.Subset, spec: InputSpec, batch_size: int) -> Iterator[dict]:
    """Batches of `dataset` through the evaluation transform of training (`build_transform(spec, train=False)`)."""
    images = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    images.read_as(spec)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate,
                                         generator=torch.Generator())
    for batch in loader:
        if "image" in batch:
            yield batch
