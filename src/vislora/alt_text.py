"""Alt text for image files: one caption per image from a captioning (or VQA) adapter, written to a JSONL file that
a rerun resumes.

It lives above `vislora.runs` (it opens a trained VLM with `load_trained_vlm`) and is its own module rather than part
of `vislora.evaluate`: evaluation scores a model against references, while alt text applies one to files and keeps
no score. `vislora caption` is a thin shell over `caption_adapter`.

Each row of the output file is one image:

    {"image": "photos/a.jpg", "alt": "a black shoe", "adapter": "runs/cap/best", "prompt": "...", "tokens": 4}
    {"image": "photos/b.jpg", "error": "photos/b.jpg is not an image ...", "adapter": ..., "prompt": ...}

Crash safety: a row counts only when its line ends in a newline. A batch's rows are appended in one write and
fsynced, so a crash (even SIGKILL) mid-write can leave at most one torn line at the end of the file; the next run cuts
it off before appending. Every row before it is whole, so the file is never partial JSONL once reopened.

Resume: images with an `alt` row are skipped. Error rows are retried (a file restored or repaired gets its caption):
the next run drops them from the file with an atomic rewrite before it starts, so no image ever has two rows.
A file written with another adapter or prompt is refused rather than mixed, and so is a second run writing the
same file at the same time (an exclusive lock on `.NAME.lock` beside it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vislora.data.datasets import IMAGE_SUFFIXES
from vislora.data.images import load_image
from vislora.data.transforms import build_transform
from vislora.devices import resolve_device
from vislora.errors import DataError, VisloraError
from vislora.io import atomic_write_text
from vislora.runs import GENERATIVE_TASKS, load_trained_vlm, read_task
from vislora.vlm import Vlm

logger = logging.getLogger(__name__)

LIST_SUFFIXES = (".txt", ".lst", ".list")
DEFAULT_PROMPT = "Describe the image briefly."
Progress = Callable[[int, int], None]  # (images done, images in all), after each batch


@dataclass
class CaptionSummary:
    """What a captioning call did: images found, captioned now, skipped (captioned before), failed now."""

    out: Path
    total: int
    captioned: int
    skipped: int
    errors: int

    def __str__(self) -> str:
        return (f"{self.captioned} images captioned, {self.skipped} already in {self.out}, {self.errors} could not "
                f"be read ({self.total} in all)")


def find_images(sources: Iterable[str | Path]) -> list[Path]:
    """The image files of `sources`, in order, each once: a file is an image (any suffix: DICOM may have none),
    except a .txt/.lst/.list file, which lists paths one a line (relative ones from the list's folder; blank lines
    and # comments skipped); a folder gives its images (IMAGE_SUFFIXES) recursively, sorted."""
    found: dict[Path, None] = {}
    for source in map(Path, sources):
        if source.is_dir():
            found.update(dict.fromkeys(p for p in sorted(source.rglob("*"))
                                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif source.suffix.lower() in LIST_SUFFIXES and source.is_file():
            lines = (line.strip() for line in source.read_text().splitlines())
            found.update(dict.fromkeys(source.parent / line for line in lines if line and not line.startswith("#")))
        elif source.exists():
            found[source] = None
        else:
            raise DataError(f"{source} does not exist; give image files, folders of images, or a .txt file listing "
                            "image paths")
    if not found:
        raise DataError(f"no images found in {', '.join(map(str, sources))} (looked for {', '.join(IMAGE_SUFFIXES)} "
                        "in folders, recursively); give image files, folders or a .txt list of paths")
    return list(found)


class AltFile:
    """The JSONL output: rows read back (a torn last line cut off, error rows dropped for retry) and batches
    appended with one write + fsync each (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.done: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            self._recover()

    @classmethod
    @contextlib.contextmanager
    def locked(cls, path: str | Path) -> Iterator[AltFile]:
        """The file opened for its one writer: an exclusive lock on `.NAME.lock` beside it (left there, empty) is
        held while the block runs; DataError at once if another process holds it (two runs would caption the same
        images twice)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = path.with_name(f".{path.name}.lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DataError(f"another vislora caption is writing {path} (it holds {lock}); wait for it to finish, "
                                "or write to another --out") from None
            yield cls(path)
        finally:
            os.close(fd)  # releases the lock

    def check(self, adapter: str | None, prompt: str) -> None:
        """DataError if earlier rows were written with another adapter or prompt."""
        for row in self.done.values():
            if (row.get("adapter"), row.get("prompt")) != (adapter, prompt):
                raise DataError(f"{self.path} holds captions of adapter {row.get('adapter')!r} with prompt "
                                f"{row.get('prompt')!r}, not adapter {adapter!r} with prompt {prompt!r}; write to "
                                "another --out, or delete the file to start over")

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        """Add `rows` at the end of the file: one write, then fsync (a crash leaves at most a torn last line)."""
        data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        self.done.update((row["image"], row) for row in rows if "alt" in row)

    def _recover(self) -> None:
        data = self.path.read_bytes()
        whole = data[:data.rfind(b"\n") + 1]  # a line without its newline is a torn write
        rows = []
        for number, line in enumerate(whole.decode("utf-8", errors="replace").splitlines(), 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or "image" not in row:
                raise DataError(f"line {number} of {self.path} is not a caption row ({line[:80]!r}); this file was "
                                "not written by vislora caption, or was edited: fix that line or use another --out")
            rows.append(row)
        kept = [row for row in rows if "alt" in row]
        if len(whole) < len(data):
            logger.warning("%s ended in a torn line (%d bytes, an interrupted write); it was cut off", self.path,
                           len(data) - len(whole))
        if len(kept) < len(rows) or len(whole) < len(data):
            atomic_write_text(self.path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept))
        self.done = {row["image"]: row for row in kept}


def caption_images(model: nn.Module, vlm: Vlm, images: Iterable[str | Path], out: str | Path, *,
                   adapter: str | None = None, prompt: str | None = None, batch_size: int = 8,
                   max_new_tokens: int = 30, num_beams: int = 1, progress: Progress | None = None) -> CaptionSummary:
    """Caption every image of `images` (files, folders, .txt lists: `find_images`) with `model` (the VLM with its
    adapter active) and append a row per image to `out`, skipping images captioned there before (module docstring).
    `adapter` names the adapter in the rows; `prompt` is the instruction (default DEFAULT_PROMPT); `progress` is
    called with (images done, images in all) before the first batch and after each."""
    if batch_size < 1 or max_new_tokens < 1 or num_beams < 1:
        raise DataError(f"batch_size, max_new_tokens and num_beams must be at least 1, got {batch_size}, "
                        f"{max_new_tokens} and {num_beams}")
    paths = find_images(images)
    captioner = Captioner(model, vlm, prompt or DEFAULT_PROMPT, adapter,
                          {"max_new_tokens": max_new_tokens, "num_beams": num_beams})
    with AltFile.locked(out) as alt:
        alt.check(adapter, captioner.prompt)
        todo = [path for path in paths if str(path) not in alt.done]
        summary = CaptionSummary(alt.path, len(paths), 0, len(paths) - len(todo), 0)
        if progress is not None:
            progress(summary.skipped, summary.total)
        for start in range(0, len(todo), batch_size):
            rows = captioner.rows(todo[start:start + batch_size])
            alt.append(rows)
            summary.errors += sum("error" in row for row in rows)
            summary.captioned += sum("alt" in row for row in rows)
            if progress is not None:
                progress(summary.skipped + summary.errors + summary.captioned, summary.total)
    return summary


def caption_adapter(adapter_dir: str | Path, images: Iterable[str | Path], out: str | Path, *,
                    prompt: str | None = None, device: str = "auto", **options: Any) -> CaptionSummary:
    """`caption_images` with the VLM of a captioning or VQA run's adapter folder (rebuilt from its task.json) on
    `device` (vislora.devices: auto, cpu, cuda, cuda:N, mps); the prompt defaults to the one the run trained with
    (task.json `prompt`). Other `options` go to `caption_images`."""

    task = read_task(adapter_dir)
    if task.get("task") not in GENERATIVE_TASKS:
        raise DataError(f"{adapter_dir} is a {task.get('task', 'classification')!r} adapter; alt text needs a "
                        f"generative one ({' or '.join(GENERATIVE_TASKS)} run). Classify images with `vislora eval`")
    prompt = prompt or task.get("prompt")
    if not prompt:
        raise DataError(f"{adapter_dir} is a {task['task']} adapter with no trained prompt in task.json; give the "
                        "question to ask of each image (--prompt 'Describe the image briefly.')")
    place = resolve_device(device)
    paths = find_images(images)  # no images: refused before the model is loaded
    model, vlm, _ = load_trained_vlm(adapter_dir)
    model.to(place)
    return caption_images(model, vlm, paths, out, adapter=str(adapter_dir), prompt=prompt, **options)


@dataclass
class Captioner:
    """What every batch shares: the model with its VLM, the prompt, the adapter name written in the rows, and
    `generate`'s search arguments (greedy unless num_beams > 1)."""

    model: nn.Module
    vlm: Vlm
    prompt: str
    adapter: str | None
    search: dict[str, Any]

    def __post_init__(self) -> None:
        self.transform = build_transform(self.vlm.image_spec, train=False)

    def rows(self, paths: Sequence[Path]) -> list[dict[str, Any]]:
        """One row per path, in order: its caption, or the error that kept the image from being read."""
        rows: list[dict[str, Any]] = [{"image": str(path)} for path in paths]
        pixels, read = [], []
        for i, path in enumerate(paths):
            try:
                pixels.append(self.transform(load_image(path, window=self.vlm.image_spec.window)))  # [3, S, S]
                read.append(i)
            except (VisloraError, OSError, ValueError) as exc:
                rows[i]["error"] = str(exc) or type(exc).__name__
                logger.warning("cannot read %s: %s", path, exc)
        if read:
            for i, (caption, tokens) in zip(read, self.generate(torch.stack(pixels)), strict=True):
                rows[i].update(alt=caption, tokens=tokens)
        for row in rows:
            row.update(adapter=self.adapter, prompt=self.prompt)
        return rows

    def generate(self, pixels: torch.Tensor) -> list[tuple[str, int]]:
        """(caption, tokens generated) of each image of `pixels` [N, 3, S, S]."""
        processor = self.vlm.processor
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in processor.prompt_batch([self.prompt] * len(pixels)).items()}
        with torch.inference_mode():
            ids = self.model.generate(**batch, pixel_values=pixels.to(device), do_sample=False,
                                      **processor.generation_kwargs(), **self.search)
        width = batch["input_ids"].shape[1]
        counts = [_count(row, processor.eos_token_id, processor.pad_token_id) for row in ids[:, width:].tolist()]
        return list(zip(processor.decode(ids, width), counts, strict=True))


def _count(generated: list[int], eos: int, pad: int) -> int:
    """Tokens generated before the end token (or the padding of a sequence that ended early)."""
    for n, token in enumerate(generated):
        if token in (eos, pad):
            return n
    return len(generated)
