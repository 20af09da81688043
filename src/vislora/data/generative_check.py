"""`vislora data check FILE --kind captioning|vqa`: audit captioning / VQA data before training.

Reads the file as `scan_generative` does (empty questions and answers kept, so they are counted, not raised) and
reports: examples and distinct images; missing and unreadable images (decoded with `check.scan_images`, never
raising); image resolutions; examples with no answer and vqa examples with an empty question (each listed with
where it is); the length of every reference answer in words (min / median / p95 / max / mean and a histogram);
duplicate examples (the same image and question, case and spacing ignored; for captioning, the same image in several
rows, whose captions belong in one row); byte-identical image files; questions per image; and answers per question.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vislora.data.check import scan_images
from vislora.data.datasets import ImageDataset, Record
from vislora.data.generative import GenerativeExample, Kind, scan_generative
from vislora.io import atomic_write_text

WORD_BUCKETS = (1, 2, 3, 5, 10, 20, 50, 100)  # upper ends of the answer-length histogram's bins, in words
LISTED = 10  # items of each problem list printed (all are in report.json)
BAR = 30


@dataclass
class GenerativeDataReport:
    """What `check_generative` found; every list of problems names the file and line (or entry) of each."""

    source: str
    kind: str
    n_examples: int
    n_images: int
    missing: list[tuple[str, str]] = field(default_factory=list)  # (image, where it is first used)
    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (image, reason)
    resolutions: dict[str, int] = field(default_factory=dict)  # "WxH" -> images
    empty_answers: list[str] = field(default_factory=list)  # where
    empty_questions: list[str] = field(default_factory=list)  # where (vqa)
    answer_words: dict[str, float] = field(default_factory=dict)  # min, median, p95, max, mean over all answers
    answer_histogram: dict[str, int] = field(default_factory=dict)  # "4-5" words -> answers
    duplicate_examples: list[list[str]] = field(default_factory=list)  # wheres of the same image and question
    duplicate_images: list[list[str]] = field(default_factory=list)  # byte-identical image files
    questions_per_image: dict[str, float] = field(default_factory=dict)  # examples per image: min, median, ...
    answers_per_question: dict[str, float] = field(default_factory=dict)  # answers per example: min, median, ...
    report_json: str | None = None

    @property
    def problems(self) -> int:
        """Missing and unreadable images, empty answers and questions, duplicate examples."""
        return (len(self.missing) + len(self.corrupt) + len(self.empty_answers) + len(self.empty_questions)
                + len(self.duplicate_examples))

    def to_dict(self) -> dict:
        return {**asdict(self), "problems": self.problems}

    def __str__(self) -> str:
        question, answer = ("question", "answer") if self.kind == "vqa" else ("caption request", "caption")
        lines = [f"{self.source} ({self.kind}): {self.n_examples} examples, {self.n_images} images, "
                 f"{self.problems} problems"]
        lines += _listed("missing images", [f"{image} ({where})" for image, where in self.missing])
        lines += _listed("corrupt/unreadable images", [f"{image}: {reason}" for image, reason in self.corrupt])
        lines.append("resolutions: " + (", ".join(f"{k} x{v}" for k, v in self.resolutions.items()) or "none read"))
        lines += _listed(f"examples with no {answer}", self.empty_answers)
        if self.kind == "vqa":
            lines += _listed("empty questions", self.empty_questions)
        lines.append(f"{answer} length in words: {_stats(self.answer_words)}")
        top = max(self.answer_histogram.values(), default=0)
        lines += [f"  {bucket:>7} words {'#' * round(BAR * count / top) if top else '':<{BAR}} {count}"
                  for bucket, count in self.answer_histogram.items()]
        lines += _listed(f"duplicate examples (same image and {question})", _joined(self.duplicate_examples))
        if self.kind == "captioning" and self.duplicate_examples:
            lines.append("  rows of one image: put its captions in one row (captions) so scoring sees every reference")
        lines += _listed("byte-identical images", _joined(self.duplicate_images))
        lines.append(f"{'questions' if self.kind == 'vqa' else 'examples'} per image: "
                     f"{_stats(self.questions_per_image)}")
        lines.append(f"{answer}s per {'question' if self.kind == 'vqa' else 'image'}: "
                     f"{_stats(self.answers_per_question)}")
        if self.report_json:
            lines.append(f"report: {self.report_json}")
        return "\n".join(lines)


def check_generative(path: str | Path, kind: Kind, out_dir: str | Path | None = None,
                     image_root: str | Path | None = None,
                     track: Callable[[Iterable, int], Iterable] | None = None) -> GenerativeDataReport:
    """Audit a captioning or VQA file (any format `read_generative` reads) and its images; with `out_dir`, write
    the report as report.json there (atomically). Malformed files raise DataError as `read_generative` does."""
    path = Path(path)
    examples = scan_generative(path, kind, image_root)
    first_use: dict[Path, str] = {}
    for example in examples:
        first_use.setdefault(example.image, example.where)
    present = [image for image in first_use if image.is_file()]
    scan = scan_images(ImageDataset([Record(str(image)) for image in present], name=str(path)), track)
    words = [len(answer.split()) for example in examples for answer in example.answers]
    report = GenerativeDataReport(
        source=str(path), kind=kind, n_examples=len(examples), n_images=len(first_use),
        missing=[(str(image), where) for image, where in first_use.items() if not image.is_file()],
        corrupt=scan.corrupt,
        resolutions=dict(Counter(f"{h.width}x{h.height}" for h in scan.headers).most_common()),
        empty_answers=[e.where for e in examples if not e.answers],
        empty_questions=[e.where for e in examples if e.question is not None and not e.question],
        answer_words=_summary(words),
        answer_histogram=word_histogram(words),
        duplicate_examples=duplicate_examples(examples),
        duplicate_images=scan.duplicates,
        questions_per_image=_summary(list(Counter(e.image for e in examples).values())),
        answers_per_question=_summary([len(e.answers) for e in examples]),
    )
    if out_dir is not None:
        report.report_json = str(Path(out_dir) / "report.json")
        atomic_write_text(report.report_json, json.dumps(report.to_dict(), indent=2))
    return report


def duplicate_examples(examples: list[GenerativeExample]) -> list[list[str]]:
    """Groups (by where) of examples with the same image and question, case and spacing ignored."""
    groups: dict[tuple[Path, str | None], list[str]] = {}
    for example in examples:
        question = " ".join(example.question.lower().split()) if example.question is not None else None
        groups.setdefault((example.image, question), []).append(example.where)
    return [group for group in groups.values() if len(group) > 1]


def word_histogram(words: list[int]) -> dict[str, int]:
    """How many answers have each length in words, in bins ending at WORD_BUCKETS ("1", "4-5", ">100")."""
    labels, low = [], 1
    for high in WORD_BUCKETS:
        labels.append(str(high) if high == low else f"{low}-{high}")
        low = high + 1
    labels.append(f">{WORD_BUCKETS[-1]}")
    counts = Counter(int(np.searchsorted(WORD_BUCKETS, n)) for n in words)  # bin i: WORD_BUCKETS[i-1] < n <= [i]
    return {label: counts.get(i, 0) for i, label in enumerate(labels)}


def _summary(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    array = np.asarray(values, dtype=float)
    return {"min": float(array.min()), "median": float(np.median(array)), "p95": float(np.percentile(array, 95)),
            "max": float(array.max()), "mean": round(float(array.mean()), 3)}


def _stats(summary: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in summary.items()) or "none"


def _listed(title: str, items: list[str]) -> list[str]:
    lines = [f"{title}: {len(items)}"] + [f"  {item}" for item in items[:LISTED]]
    if len(items) > LISTED:
        lines.append(f"  ... and {len(items) - LISTED} more (see report.json)")
    return lines


def _joined(groups: list[list[str]]) -> list[str]:
    return [" = ".join(group[:4]) + (" ..." if len(group) > 4 else "") for group in groups]
