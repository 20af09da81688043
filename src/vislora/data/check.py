"""`vislora data check`: audit a dataset before training, never crash on a bad file.

Reports unreadable files, the resolution histogram, bit depths, modalities (a DICOM file's Modality tag, else
'photo'), DICOM windowing coverage (how many grayscale DICOM files carry their own WindowCenter/WindowWidth, and how
many fall back to min/max under window "auto"), class balance, exact duplicates, metadata coverage, and writes a
stratified audit sample (CSV + contact-sheet PNG) for manual label review. For multi-label data the balance is the
number of images holding each attribute, with the rare ones (fewer than `rare_below`) listed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from vislora.data.attributes import rare_attributes
from vislora.data.datasets import DECODE_ERRORS, ArrayDataset, ImageDataset, Record
from vislora.data.images import ImageHeader, image_header, preview
from vislora.io import atomic_write, atomic_write_text

RARE_BELOW = 10  # an attribute with fewer positive images than this is rare (multi-label data)
# Metadata a dataset should carry for every image; "licence" is accepted for "license".
COVERAGE_FIELDS = {"license": ("license", "licence"), "capture_date": ("capture_date",), "location": ("location",)}
THUMB = 96


@dataclass
class DataReport:
    """What `check_dataset` found; `audit_csv`/`contact_sheet` are the files written for label review."""

    source: str
    n_images: int
    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    resolutions: dict[str, int] = field(default_factory=dict)  # "WxH" -> count
    bit_depths: dict[str, int] = field(default_factory=dict)  # bits per sample ("8", "16") -> count
    modalities: dict[str, int] = field(default_factory=dict)  # "photo", or a DICOM Modality ("CT", "MR") -> count
    dicom_windows: dict[str, int] = field(default_factory=dict)  # grayscale DICOM: "file" window / "fallback" min/max
    class_counts: dict[str, int] = field(default_factory=dict)  # multi-label: images holding each attribute
    multilabel: bool = False
    rare_below: int = RARE_BELOW
    rare: list[str] = field(default_factory=list)  # multi-label: attributes with fewer than rare_below images
    labels_per_image: float | None = None  # multi-label: mean number of labels per image
    empty_label_rows: int = 0  # multi-label: images with no label (allowed by allow_empty)
    duplicates: list[list[str]] = field(default_factory=list)  # groups of byte-identical images
    metadata_coverage: dict[str, float] = field(default_factory=dict)  # column -> % of rows filled
    audit_csv: str | None = None
    contact_sheet: str | None = None

    @property
    def imbalance(self) -> float:
        """Largest class count / smallest (1.0 = balanced)."""
        counts = [c for c in self.class_counts.values() if c]
        return max(counts) / min(counts) if counts else 1.0

    def to_dict(self) -> dict:
        return {**asdict(self), "imbalance": self.imbalance}

    def __str__(self) -> str:
        kind = "attributes" if self.multilabel else "classes"
        lines = [f"{self.source}: {self.n_images} images, {len(self.class_counts)} {kind}"]
        lines.append(f"corrupt/unreadable: {len(self.corrupt)}")
        lines += [f"  {file}: {reason}" for file, reason in self.corrupt[:20]]
        if len(self.corrupt) > 20:
            lines.append(f"  ... and {len(self.corrupt) - 20} more (see report.json)")
        lines.append("resolutions: " + ", ".join(f"{k} x{v}" for k, v in self.resolutions.items()))
        if len(self.resolutions) > 1:
            lines.append("  mixed resolutions: training refuses them unless data.allow_mixed_resolution is true")
        lines.append("bit depth: " + ", ".join(f"{k}-bit x{v}" for k, v in self.bit_depths.items()))
        lines.append("modality: " + ", ".join(f"{k} x{v}" for k, v in self.modalities.items()))
        if self.dicom_windows:
            own, fallback = self.dicom_windows.get("file", 0), self.dicom_windows.get("fallback", 0)
            lines.append(f"DICOM windowing: {own} of {own + fallback} grayscale files carry WindowCenter/WindowWidth, "
                         f"{fallback} fall back to their min/max under data.window: auto")
        if self.multilabel:
            lines.append(f"labels per image: {self.labels_per_image:.2f} on average, {self.empty_label_rows} images "
                         "with none")
            lines.append(f"images per attribute (largest/smallest = {self.imbalance:.2f}):")
            lines += [f"  {name:<24} {count:>8}{'  rare' if name in self.rare else ''}"
                      for name, count in self.class_counts.items()]
            lines.append(f"rare attributes (fewer than {self.rare_below} images): "
                         + (", ".join(self.rare) if self.rare else "none"))
        else:
            lines.append(f"class balance (largest/smallest = {self.imbalance:.2f}):")
            lines += [f"  {name:<24} {count:>8}" for name, count in self.class_counts.items()]
        lines.append(f"exact duplicates: {len(self.duplicates)} groups")
        lines += [f"  {' = '.join(group[:4])}{' ...' if len(group) > 4 else ''}" for group in self.duplicates[:10]]
        lines.append("metadata coverage: " + ", ".join(f"{k} {v:.1f}%" for k, v in self.metadata_coverage.items()))
        if self.audit_csv:
            lines.append(f"audit sample: {self.audit_csv} and {self.contact_sheet}")
        return "\n".join(lines)


def check_dataset(dataset: ImageDataset, out_dir: str | Path | None = None, fraction: float = 0.05,
                  seed: int = 0, track: Callable[[Iterable, int], Iterable] | None = None,
                  rare_below: int = RARE_BELOW) -> DataReport:
    """Audit every image of `dataset`; with `out_dir`, write report.json, audit.csv and contact_sheet.png there.
    Multi-label attributes held by fewer than `rare_below` images are listed as rare."""
    report = DataReport(source=dataset.name, n_images=len(dataset))
    scan = scan_images(dataset, track)
    report.corrupt, readable = scan.corrupt, scan.readable
    _summarize_headers(report, scan.headers)
    if dataset.attributes is not None:
        sets = dataset.label_sets()
        report.multilabel, report.rare_below = True, rare_below
        report.class_counts = dataset.attributes.counts(sets)
        report.rare = rare_attributes(report.class_counts, rare_below)
        report.labels_per_image = sum(map(len, sets)) / max(1, len(sets))
        report.empty_label_rows = sum(not labels for labels in sets)
    else:
        labels = Counter(r.label for r in dataset.records if r.label is not None)
        report.class_counts = {c: labels.get(c, 0) for c in dataset.classes}
    report.duplicates = scan.duplicates
    report.metadata_coverage = metadata_coverage_of(dataset)
    if out_dir is not None:
        out = Path(out_dir)
        sample = audit_sample(dataset, readable, fraction, seed)
        report.audit_csv = str(out / "audit.csv")
        report.contact_sheet = str(out / "contact_sheet.png")
        _write_audit_csv(dataset, sample, Path(report.audit_csv))
        _write_contact_sheet(dataset, sample, Path(report.contact_sheet))
        atomic_write_text(out / "report.json", json.dumps(report.to_dict(), indent=2))
    return report


@dataclass
class ImageScan:
    """Every image of a dataset decoded once: the readable ones (indices and headers), the unreadable ones
    (file, reason), and groups of byte-identical files."""

    readable: list[int] = field(default_factory=list)
    headers: list[ImageHeader] = field(default_factory=list)
    corrupt: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[list[str]] = field(default_factory=list)


def scan_images(dataset: ImageDataset, track: Callable[[Iterable, int], Iterable] | None = None) -> ImageScan:
    """Decode every image of `dataset` (never raising on a bad file), read its header and hash its bytes."""
    track = track or (lambda items, total: items)
    scan = ImageScan()
    by_hash: dict[str, list[str]] = {}
    for i in track(range(len(dataset)), len(dataset)):
        try:
            dataset.open_image(i)
            header = _header(dataset, i)
        except DECODE_ERRORS as exc:
            scan.corrupt.append((dataset.describe(i), f"{type(exc).__name__}: {exc}"))
            continue
        scan.readable.append(i)
        scan.headers.append(header)
        by_hash.setdefault(_digest(dataset, i), []).append(dataset.describe(i))
    scan.duplicates = [group for group in by_hash.values() if len(group) > 1]
    return scan


def audit_sample(dataset: ImageDataset, candidates: list[int], fraction: float, seed: int) -> list[int]:
    """`fraction` of each class (at least one image per class; multi-label: by first label), drawn with `seed`."""
    rng = random.Random(seed)
    by_class: dict[str | None, list[int]] = {}
    sets = dataset.label_sets()
    for i in candidates:
        by_class.setdefault(sets[i][0] if sets[i] else None, []).append(i)
    picked: list[int] = []
    for members in by_class.values():
        picked += rng.sample(members, max(1, math.ceil(fraction * len(members))))
    return sorted(picked)


def _header(dataset: ImageDataset, index: int) -> ImageHeader:
    if isinstance(dataset, ArrayDataset):
        return ImageHeader(*dataset.image_size(index), bits=8)
    return image_header(dataset.records[index].source)


def _summarize_headers(report: DataReport, headers: list[ImageHeader]) -> None:
    """Resolutions, bit depths, modalities and DICOM window coverage of the readable images."""
    report.resolutions = dict(Counter(f"{h.width}x{h.height}" for h in headers).most_common())
    report.bit_depths = {str(bits): n for bits, n in sorted(Counter(h.bits for h in headers).items())}
    report.modalities = dict(Counter(h.modality for h in headers).most_common())
    gray = [h for h in headers if h.dicom and str(h.photometric).startswith("MONOCHROME")]
    if gray:
        own = sum(h.window is not None for h in gray)
        report.dicom_windows = {"file": own, "fallback": len(gray) - own}


def _digest(dataset: ImageDataset, index: int) -> str:
    if isinstance(dataset, ArrayDataset):
        data = dataset.images[dataset.records[index].source].tobytes()
    else:
        data = Path(dataset.records[index].source).read_bytes()
    return hashlib.sha256(data).hexdigest()


def metadata_coverage_of(dataset: ImageDataset) -> dict[str, float]:
    """Percent of rows with a non-empty value, for licence/capture date/location and every metadata column."""
    n = len(dataset) or 1
    coverage = {}
    for name, aliases in COVERAGE_FIELDS.items():
        filled = sum(any(r.metadata.get(a, "").strip() for a in aliases) for r in dataset.records)
        coverage[name] = 100.0 * filled / n
    for column in dataset.metadata_columns:
        if not any(column in aliases for aliases in COVERAGE_FIELDS.values()):
            coverage[column] = 100.0 * sum(bool(r.metadata.get(column, "").strip()) for r in dataset.records) / n
    return coverage


def _write_audit_csv(dataset: ImageDataset, sample: list[int], path: Path) -> None:
    columns = ["sheet_number", "index", "image", "label", *dataset.metadata_columns, "reviewed_label", "note"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for number, i in enumerate(sample, start=1):
        record = dataset.records[i]
        writer.writerow({"sheet_number": number, "index": i, "image": dataset.describe(i), "label": _label_text(record),
                         **record.metadata, "reviewed_label": "", "note": ""})
    atomic_write_text(path, buffer.getvalue())


def _write_contact_sheet(dataset: ImageDataset, sample: list[int], path: Path) -> None:
    """Thumbnails in a grid, each captioned with its audit.csv number and label."""
    columns = max(1, min(10, len(sample)))
    rows = max(1, math.ceil(len(sample) / columns))
    cell_w, cell_h = THUMB + 8, THUMB + 22
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for number, i in enumerate(sample):
        x, y = (number % columns) * cell_w + 4, (number // columns) * cell_h + 4
        thumb = preview(dataset.open_image(i))
        thumb.thumbnail((THUMB, THUMB))
        if thumb.width < THUMB and thumb.height < THUMB:  # tiny images (28 px) are enlarged to be seen
            factor = THUMB / max(thumb.size)
            thumb = thumb.resize((round(thumb.width * factor), round(thumb.height * factor)), Image.NEAREST)
        sheet.paste(thumb, (x, y))
        draw.text((x, y + THUMB + 2), f"{number + 1}: {_label_text(dataset.records[i])}"[:18], fill="black")
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))


def _label_text(record: Record) -> str | None:
    """The label, or a multi-label row's labels joined by '|'."""
    return "|".join(record.labels) if record.labels is not None else record.label
