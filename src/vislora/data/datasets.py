"""Datasets: image folder, CSV/JSONL manifest (with metadata columns), Fashion-MNIST, image-caption JSONL.

Every dataset is an `ImageDataset`: records of (image source, label or caption, metadata) decoded lazily.
A sample is a dict `{"image", "label", "index", "metadata"}` (plus `"caption"` for caption data); a file
that cannot be decoded gives a `{"index", "skipped": True}` marker (dropped and listed by `collate`) or,
in strict mode, a DataError.

Multi-label manifests (`multilabel=MultiLabelFormat(...)`) hold a list of labels per row: a CSV cell `a|b|c`
(separator configurable) or a JSON list in JSONL. Their records carry `labels` (a tuple), the dataset an
`AttributeSet` (vislora.data.attributes), and a sample's "label" is the multi-hot target [attributes].
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vislora.data.attributes import AttributeSet, natural_key
from vislora.data.images import LoadedImage, Window, image_header, load_image
from vislora.data.transforms import InputSpec, SampleTransform, build_transform
from vislora.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".dcm", ".dicom")
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Record:
    """One sample before decoding. `source` is a file path, or an index into in-memory arrays; `labels` holds the
    labels of a multi-label row (`label` is then None); `line` is the manifest line the row came from."""

    source: str | int
    label: str | None = None
    caption: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    labels: tuple[str, ...] | None = None
    line: int | None = None


@dataclass(frozen=True)
class MultiLabelFormat:
    """How a manifest's label column holds several labels: CSV cells split on `separator` (a JSONL cell may be a
    JSON list or a string split the same way); an empty list is an error unless `allow_empty`."""

    separator: str = "|"
    allow_empty: bool = False

    def __post_init__(self) -> None:
        if not self.separator:
            raise DataError("the multi-label separator is empty; use a character such as '|' or ';'")


class ImageDataset(torch.utils.data.Dataset):
    """Labelled (or captioned) images with metadata, decoded on access.

    `transform(image, index)` turns a loaded image (PIL, or a float tensor for 16-bit and DICOM files) into a
    tensor; see `vislora.data.transforms.SampleTransform`, which seeds augmentation per (seed, epoch, index) so
    results do not depend on worker count or resume. `window` is the DICOM window of `load_image` (set it to the
    run's `data.window` / InputSpec.window, as the trainer and evaluation do).
    """

    def __init__(self, records: Sequence[Record], classes: Sequence[str] | None = None, name: str = "",
                 strict: bool = False, transform: Callable[[LoadedImage, int], Any] | None = None,
                 attributes: AttributeSet | None = None) -> None:
        self.records = list(records)
        self.name = name
        self.strict = strict
        self.transform = transform
        self.window: Window = "auto"
        self.attributes: AttributeSet | None = None
        if attributes is not None or any(r.labels is not None for r in self.records):
            self._set_attributes(attributes or AttributeSet.from_labels(self.label_sets(), names=classes))
            return
        labels = {r.label for r in self.records if r.label is not None}
        self.classes: list[str] = list(classes) if classes is not None else sorted(labels, key=natural_key)
        unknown = labels - set(self.classes)
        if unknown:
            raise DataError(f"{name}: labels {sorted(unknown)[:5]} are not among the training classes "
                            f"{self.classes[:10]}; evaluate on data with the same label set")
        self.class_to_index = {c: i for i, c in enumerate(self.classes)}

    def _set_attributes(self, attributes: AttributeSet) -> None:
        for i, record in enumerate(self.records):
            if record.labels is None:
                raise DataError(f"{self.where(i)} has a single label where a list was expected; open multi-label "
                                "manifests with multilabel=MultiLabelFormat(...) (task.kind: multilabel)")
            attributes.check(record.labels, self.where(i))
        self.attributes = attributes
        self.classes = list(attributes.names)
        self.class_to_index = {c: i for i, c in enumerate(self.classes)}

    def read_as(self, spec: InputSpec, seed: int = 0) -> None:
        """Read samples as a trained model evaluates them: files decoded with `spec`'s DICOM window, then its
        evaluation transform (seeded per sample, see SampleTransform)."""
        self.transform = SampleTransform(build_transform(spec, train=False), seed)
        self.window = spec.window

    @property
    def multilabel(self) -> bool:
        """True when each record holds a list of labels (an AttributeSet gives their order)."""
        return self.attributes is not None

    def with_attributes(self, attributes: AttributeSet) -> ImageDataset:
        """A copy of this multi-label dataset under another vocabulary (e.g. with groups), every row checked
        against it: DataError naming the manifest line of an unknown label or a broken single-choice group."""
        if not self.multilabel:
            raise DataError(f"{self.name} holds one label per image; attributes apply to multi-label manifests "
                            "(a list of labels per row)")
        clone = self._select(list(range(len(self))))
        clone._set_attributes(attributes)
        return clone

    def label_sets(self) -> list[tuple[str, ...]]:
        """The labels of each record (a one-label tuple for single-label data, () for unlabelled)."""
        return [r.labels if r.labels is not None else ((r.label,) if r.label is not None else ())
                for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def metadata_columns(self) -> list[str]:
        return sorted({k for r in self.records for k in r.metadata})

    def describe(self, index: int) -> str:
        """Where sample `index` comes from, for messages."""
        return str(self.records[index].source)

    def where(self, index: int) -> str:
        """The manifest line of sample `index` ('train.csv line 7') when known, else `describe(index)`."""
        line = self.records[index].line
        return f"{self.name} line {line}" if line is not None else self.describe(index)

    def open_image(self, index: int) -> LoadedImage:
        """The decoded image of sample `index` through `load_image` with this dataset's DICOM `window`: a PIL RGB
        image for 8-bit files, a float tensor [3, H, W] for 16-bit and DICOM files (raises on a corrupt file)."""
        return load_image(self.records[index].source, window=self.window)

    def image_size(self, index: int) -> tuple[int, int]:
        """(width, height) read from the file header only."""
        return image_header(self.records[index].source).size

    def resolutions(self) -> Counter:
        """How many images have each (width, height); unreadable headers count under None."""
        counts: Counter = Counter()
        for i in range(len(self)):
            try:
                counts[self.image_size(i)] += 1
            except DECODE_ERRORS:
                counts[None] += 1
        return counts

    def labels(self) -> list[int]:
        """Class index per record (-1 when unlabelled or multi-label; see `label_sets`)."""
        return [self.class_to_index[r.label] if r.label is not None else -1 for r in self.records]

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        try:
            image = self.open_image(index)
        except DECODE_ERRORS as exc:
            if self.strict:
                raise DataError(f"{self.describe(index)} cannot be decoded ({exc}); fix or remove the file, or set "
                                "data.strict: false to skip corrupt images and count them") from None
            logger.warning("skipping %s: cannot be decoded (%s)", self.describe(index), exc)
            return {"index": index, "skipped": True}
        sample: dict[str, Any] = {
            "image": self.transform(image, index) if self.transform else image,
            "label": self._target(record),
            "index": index,
            "metadata": dict(record.metadata),
        }
        if record.caption is not None:
            sample["caption"] = record.caption
        return sample

    def _target(self, record: Record) -> int | torch.Tensor:
        if self.attributes is not None:
            return self.attributes.encode(record.labels or ())  # multi-hot [attributes]
        return self.class_to_index[record.label] if record.label is not None else -1

    def subset(self, n: int, seed: int = 0, stratified: bool = True) -> ImageDataset:
        """A random `n`-sample subset (the same for the same seed); stratified by label when labelled (by the
        first label of each multi-label row)."""
        if n >= len(self):
            return self
        rng = random.Random(seed)
        if stratified and any(r.label is not None or r.labels for r in self.records):
            by_class: dict[Any, list[int]] = {}
            for i, labels in enumerate(self.label_sets()):
                by_class.setdefault(labels[0] if labels else None, []).append(i)
            picked = []
            for members in by_class.values():
                picked += rng.sample(members, round(n * len(members) / len(self)))
            chosen = sorted(picked)[:n]
        else:
            chosen = sorted(rng.sample(range(len(self)), n))
        return self._select(chosen)

    def _select(self, indices: list[int]) -> ImageDataset:
        clone = ImageDataset.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.records = [self.records[i] for i in indices]
        return clone


class ArrayDataset(ImageDataset):
    """Images held in memory as a uint8 array [N, H, W] or [N, H, W, 3] (Fashion-MNIST)."""

    def __init__(self, images: np.ndarray, records: Sequence[Record], **kwargs: Any) -> None:
        super().__init__(records, **kwargs)
        self.images = images

    def describe(self, index: int) -> str:
        return f"{self.name}[{self.records[index].source}]"

    def open_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[self.records[index].source]).convert("RGB")

    def image_size(self, index: int) -> tuple[int, int]:
        height, width = self.images.shape[1:3]
        return width, height

    def resolutions(self) -> Counter:
        return Counter({self.image_size(0): len(self)}) if len(self) else Counter()


# ---------------------------------------------------------------------------------------------- readers
def image_folder(root: str | Path, strict: bool = False, classes: Sequence[str] | None = None) -> ImageDataset:
    """A folder with one subfolder per class (`root/cat/x.jpg`)."""
    root = Path(root)
    folders = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: natural_key(p.name))
    records = [Record(str(file), label=folder.name) for folder in folders
               for file in sorted(folder.rglob("*")) if file.suffix.lower() in IMAGE_SUFFIXES]
    if not records:
        raise DataError(f"{root} holds no images in class subfolders (looked for {', '.join(IMAGE_SUFFIXES)} "
                        "under root/<class>/); point data.train at such a folder or at a CSV/JSONL manifest")
    return ImageDataset(records, classes=classes, name=str(root), strict=strict)


def manifest(path: str | Path, label_column: str | None = "label", path_column: str = "path",
             caption_column: str = "caption", strict: bool = False,
             classes: Sequence[str] | None = None, multilabel: MultiLabelFormat | None = None,
             attributes: AttributeSet | None = None) -> ImageDataset:
    """A CSV or JSONL manifest: one row per image, paths relative to the manifest's folder.

    Columns other than path/label/caption travel with each sample as metadata (e.g. license,
    capture_date, location, group). With `label_column=None` the rows need a caption column instead.
    With `multilabel`, the label column holds a list of labels per row, checked against `attributes` (default: every
    label seen, naturally sorted); errors name the manifest line.
    """
    path = Path(path)
    numbered = read_rows(path)
    if not numbered:
        raise DataError(f"manifest {path} has no rows")
    rows = [row for _, row in numbered]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    wanted = [path_column] + ([label_column] if label_column else [caption_column])
    for column in wanted:
        if column not in columns:
            hint = "data.label_column" if column == label_column else "data.path_column"
            raise DataError(f"manifest {path} has no column {column!r} (columns: {', '.join(columns)}); add it, "
                            f"or name the right column with {hint}")
    records = []
    for number, row in numbered:
        file = str(row.get(path_column) or "")
        label = row.get(label_column) if label_column else None
        if not file:
            raise DataError(f"{path} line {number}: empty {path_column!r}; every row needs an image path")
        labels = None
        if multilabel is not None and label_column:
            labels, label = _label_list(label, multilabel, f"{path} line {number}"), None
        elif label_column and label in (None, ""):
            raise DataError(f"{path} line {number}: empty {label_column!r}; every row needs a path and a label")
        elif isinstance(label, list):
            raise DataError(f"{path} line {number}: {label_column!r} holds a list {label}; a list of labels per "
                            "image is multi-label data: set task.kind: multilabel (vislora data check --multilabel)")
        full = Path(file) if Path(file).is_absolute() else path.parent / file
        metadata = {k: "" if v is None else str(v) for k, v in row.items()
                    if k not in (path_column, label_column, caption_column)}
        records.append(Record(str(full), label=None if label is None else str(label),
                              caption=None if row.get(caption_column) is None else str(row[caption_column]),
                              metadata=metadata, labels=labels, line=number))
    return ImageDataset(records, classes=classes, name=str(path), strict=strict, attributes=attributes)


def _label_list(cell: Any, spec: MultiLabelFormat, where: str) -> tuple[str, ...]:
    """The labels of one multi-label cell: a JSON list, or a string split on the separator (duplicates dropped)."""
    if cell is None:
        items: list[Any] = []
    elif isinstance(cell, list):
        items = cell
    elif isinstance(cell, str):
        items = [piece.strip() for piece in cell.split(spec.separator)] if cell.strip() else []
        if "" in items:
            raise DataError(f"{where}: label list {cell!r} has an empty entry between separators "
                            f"({spec.separator!r}); remove the stray separator")
    else:
        raise DataError(f"{where}: the label cell is a {type(cell).__name__} ({cell!r}); give a JSON list of "
                        f"labels or a string of labels separated by {spec.separator!r}")
    bad = [item for item in items if not isinstance(item, str | int) or isinstance(item, bool)]
    if bad:
        raise DataError(f"{where}: labels must be strings, found {bad[:3]}")
    labels = tuple(dict.fromkeys(str(item).strip() for item in items))
    if not labels and not spec.allow_empty:
        raise DataError(f"{where}: empty label list; every image needs at least one label, or set "
                        "task.multilabel.allow_empty: true (data check: --allow-empty) for images with none")
    return labels


def fashion_mnist(split: str = "train", strict: bool = False, download: bool = False) -> ArrayDataset:
    """Fashion-MNIST (60k train / 10k test, 28x28 gray, 10 classes); see `vislora.assets.fashion_mnist_dir`."""
    from vislora.assets import FASHION_MNIST_CLASSES, fashion_mnist_dir, read_fashion_mnist

    images, labels = read_fashion_mnist(split, fashion_mnist_dir(download=download))
    records = [Record(i, label=FASHION_MNIST_CLASSES[y]) for i, y in enumerate(labels.tolist())]
    return ArrayDataset(images, records, classes=list(FASHION_MNIST_CLASSES), name=f"fashion-mnist:{split}",
                        strict=strict)


def open_dataset(source: str | Path, *, label_column: str | None = "label", path_column: str = "path",
                 caption_column: str = "caption", strict: bool = False,
                 classes: Sequence[str] | None = None, multilabel: MultiLabelFormat | None = None,
                 attributes: AttributeSet | None = None) -> ImageDataset:
    """Open `fashion-mnist[:train|test]`, an image folder, or a .csv/.jsonl manifest (the only multi-label source:
    `multilabel`, `attributes` as in `manifest`)."""
    text = str(source)
    path = Path(text)
    if multilabel is not None:
        if path.suffix.lower() in (".csv", ".jsonl") and path.is_file():
            return manifest(path, label_column, path_column, caption_column, strict=strict, classes=classes,
                            multilabel=multilabel, attributes=attributes)
        raise DataError(f"multi-label data must be a .csv/.jsonl manifest with a list of labels per row; "
                        f"{text!r} is not one (an image folder or fashion-mnist holds one label per image)")
    if text.startswith("fashion-mnist"):
        split = text.partition(":")[2] or "train"
        return fashion_mnist(split, strict=strict)
    if path.is_dir():
        return image_folder(path, strict=strict, classes=classes)
    if path.suffix.lower() in (".csv", ".jsonl") and path.is_file():
        return manifest(path, label_column, path_column, caption_column, strict=strict, classes=classes)
    if not path.exists():
        raise DataError(f"data source {text!r} does not exist; give an image folder, a .csv/.jsonl manifest, "
                        "or fashion-mnist:train / fashion-mnist:test")
    raise DataError(f"data source {text!r} is neither a folder nor a .csv/.jsonl manifest")


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack decoded samples; corrupt ones are dropped and their indices listed under `skipped`."""
    good = [s for s in samples if not s.get("skipped")]
    batch: dict[str, Any] = {"skipped": [s["index"] for s in samples if s.get("skipped")]}
    if not good:
        return batch
    batch["image"] = stack_images([s["image"] for s in good])
    labels = [s["label"] for s in good]
    batch["label"] = torch.stack(labels) if torch.is_tensor(labels[0]) else torch.tensor(labels, dtype=torch.long)
    batch["index"] = torch.tensor([s["index"] for s in good], dtype=torch.long)
    batch["metadata"] = [s["metadata"] for s in good]
    if "caption" in good[0]:
        batch["caption"] = [s["caption"] for s in good]
    return batch


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """The images [C, H, W] of one batch stacked [N, C, H, W]; DataError when their shapes differ."""
    shapes = sorted({tuple(image.shape) for image in images})
    if len(shapes) > 1:
        raise DataError(f"one batch holds images of {len(shapes)} shapes ({', '.join(map(str, shapes[:3]))}), which "
                        "cannot be stacked: resize them to one size (a tiled run: data.tiling.image_size) or take "
                        "one image per batch")
    return torch.stack(images)  # [N, C, H, W]


def read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of each manifest row; a CSV row whose field count differs from the header's is a
    DataError naming its line."""
    if path.suffix.lower() == ".csv":
        return _read_csv(path)
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {number} is not valid JSON ({exc}); each line must be one object") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number} is a {type(row).__name__}, not a JSON object")
        rows.append((number, row))
    return rows


def _read_csv(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if header is None:
                return []
            start = reader.line_num + 1
            for fields in reader:
                line, start = start, reader.line_num + 1  # first line of the row (a quoted cell may span lines)
                if not fields:
                    continue
                if len(fields) != len(header):
                    raise DataError(f"{path} line {line} has {len(fields)} fields but the header has {len(header)} "
                                    f"({', '.join(header)}); quote cells that contain commas, or fix the row")
                rows.append((line, dict(zip(header, fields, strict=True))))
        except csv.Error as exc:
            raise DataError(f"{path} line {reader.line_num} is not valid CSV ({exc}); fix the quoting") from None
    return rows
