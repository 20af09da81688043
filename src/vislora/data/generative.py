"""Generative data (captioning and VQA): examples of (image, question, reference answers) read from four formats.

- COCO captions JSON `{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}`: one example per
  image holding all its captions (question None).
- LLaVA conversation JSON `[{"image", "conversations": [{"from": "human"|"gpt", "value"}, ...]}]`: one example per
  human/gpt pair, the `<image>` tag (and the newline beside it) stripped from the question. Entries without an image
  (text-only turns) are skipped.
- JSONL / CSV rows (or a JSON list of such rows): vqa = image, question, answer | answers; captioning = image,
  caption | captions. A list cell is a JSON list, or a string split on '|'.

Image paths are relative to `image_root` (default: the data file's folder). `GenerativeDataset` decodes images lazily
with `vislora.data.images.load_image` and gives `{"pixel_values", "question", "answer", "answers", "index"}`;
`collate_generative` stacks a batch.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from vislora.data.datasets import DECODE_ERRORS, read_rows, stack_images
from vislora.data.images import Window, check_window, load_image
from vislora.data.transforms import SampleTransform
from vislora.errors import DataError

logger = logging.getLogger(__name__)

Kind = Literal["captioning", "vqa"]
KINDS: tuple[str, ...] = ("captioning", "vqa")
IMAGE_TAG = "<image>"
HUMAN_ROLES = ("human", "user")
MODEL_ROLES = ("gpt", "assistant")
LIST_SEPARATOR = "|"
COLUMNS = {"vqa": "image, question and answer (or answers)", "captioning": "image and caption (or captions)"}


@dataclass(frozen=True)
class GenerativeExample:
    """One image with a question (None for a caption: the task's prompt asks for it) and its reference answers;
    `where` names the file and line or entry it came from, for messages."""

    image: Path
    question: str | None
    answers: tuple[str, ...]
    where: str


def read_generative(path: str | Path, kind: Kind, image_root: str | Path | None = None,
                    limit: int | None = None) -> list[GenerativeExample]:
    """The examples of a captioning or VQA file (COCO captions JSON, LLaVA conversation JSON, JSONL or CSV rows),
    the first `limit` of them when given.

    Raises DataError naming the file and line (or entry) and the fix: malformed JSON or rows, missing columns, a
    file of the other kind (its columns named, and the kind to use), an empty question in vqa data.
    """
    if limit is not None and limit < 0:
        raise DataError(f"limit {limit} is negative; give a number of examples (or None for all)")
    examples = scan_generative(path, kind, image_root)[:limit]
    empty = [e.where for e in examples if e.question is not None and not e.question]
    if empty:
        raise DataError(f"{empty[0]}: empty question ({len(empty)} in all"
                        f"{', also ' + ', '.join(empty[1:4]) if len(empty) > 1 else ''}); every vqa example needs a "
                        f"question: fill it in or remove the row (`vislora data check {path} --kind vqa` lists them)")
    return examples


def scan_generative(path: str | Path, kind: Kind, image_root: str | Path | None = None) -> list[GenerativeExample]:
    """Every example of the file as written, empty questions kept as "" and empty answers as () (for the audit,
    `vislora data check`); `read_generative` is the reader that refuses them."""
    if kind not in KINDS:
        raise DataError(f"unknown generative data kind {kind!r}; use one of {', '.join(KINDS)}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"generative data file {path} does not exist; give a COCO captions or LLaVA .json, "
                        "or a .jsonl/.csv of rows")
    root = Path(image_root) if image_root is not None else path.parent
    if not root.is_dir():
        raise DataError(f"image root {root} is not a folder; give the folder the image paths of {path} are "
                        "relative to")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".csv"):
        rows = [(f"line {number}", row) for number, row in read_rows(path)]
        return _from_rows(rows, path, kind, root)
    if suffix != ".json":
        raise DataError(f"{path} is not a .json, .jsonl or .csv file; generative data is COCO captions JSON, LLaVA "
                        "conversation JSON, or JSONL/CSV rows")
    data = _load_json(path)
    layout = json_layout(data)
    if layout == "coco":
        return _from_coco(data, path, kind, root)
    if layout == "llava":
        return _from_llava(data, path, kind, root)
    if layout == "rows":
        return _from_rows([(f"[{i}]", row) for i, row in enumerate(data)], path, kind, root)
    found = f"keys {', '.join(map(str, list(data)[:8]))}" if isinstance(data, dict) else type(data).__name__
    raise DataError(f"{path} is neither COCO captions JSON (keys images and annotations) nor LLaVA conversation JSON "
                    f"(a list of entries with image and conversations) nor a list of rows; found {found}")


def json_layout(data: Any) -> Literal["coco", "llava", "rows"] | None:
    """Which generative layout parsed JSON has: COCO captions, LLaVA conversations, a list of rows, or None."""
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return "coco"
    if isinstance(data, list) and data and all(isinstance(item, dict) for item in data):
        return "llava" if any("conversations" in item for item in data) else "rows"
    return None


def json_kind(path: str | Path) -> Kind | None:
    """The kind a .json file holds by its layout: captioning for COCO captions, vqa for LLaVA conversations, None
    for anything else (rows, or not a .json file), where the kind must be given."""
    path = Path(path)
    if path.suffix.lower() != ".json" or not path.is_file():
        return None
    return {"coco": "captioning", "llava": "vqa"}.get(json_layout(_load_json(path)) or "")


class GenerativeDataset(torch.utils.data.Dataset):
    """Generative examples decoded on access: `load_image` (RGB, 16-bit, DICOM with `window`), then `transform`
    (a `build_transform(spec, train)` transform, or a SampleTransform, called with the index for seeded
    augmentation). An example without answers gives answer "" (data for inference only)."""

    def __init__(self, examples: Sequence[GenerativeExample], transform: Callable, window: Window = "auto") -> None:
        self.examples = list(examples)
        self.transform = transform
        self.window = check_window(window)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        example = self.examples[i]
        audit = "run `vislora data check` on the data file to list every missing or unreadable image"
        try:
            image = load_image(example.image, window=self.window)
        except FileNotFoundError:
            raise DataError(f"{example.where}: image {example.image} does not exist; fix the path (relative to the "
                            f"image root, by default the data file's folder) or remove the example; {audit}") from None
        except DECODE_ERRORS as exc:
            raise DataError(f"{example.where}: image {example.image} cannot be decoded ({exc}); replace or remove "
                            f"it; {audit}") from None
        pixels = self.transform(image, i) if isinstance(self.transform, SampleTransform) else self.transform(image)
        return {"pixel_values": pixels, "question": example.question,
                "answer": example.answers[0] if example.answers else "", "answers": list(example.answers),
                "index": i}


def collate_generative(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch of GenerativeDataset items: pixel_values [N, C, H, W], lists of questions, answers and reference
    lists, index [N]."""
    if not items:
        raise DataError("collate_generative got an empty batch; the data loader should give at least one example")
    return {
        "pixel_values": stack_images([item["pixel_values"] for item in items]),  # [N, C, H, W]
        "question": [item["question"] for item in items],
        "answer": [item["answer"] for item in items],
        "answers": [item["answers"] for item in items],
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),  # [N]
    }


# ---------------------------------------------------------------------------------------------- formats
def _from_coco(data: dict, path: Path, kind: Kind, root: Path) -> list[GenerativeExample]:
    """One example per image of a COCO captions file, with all its captions in file order."""
    if kind != "captioning":
        raise DataError(f"{path} is COCO captions JSON (images and annotations with a caption): captioning data, not "
                        f"{kind}; read it with kind 'captioning' (vislora data check {path} --kind captioning)")
    images, annotations = data["images"], data["annotations"]
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise DataError(f"{path}: 'images' and 'annotations' must be lists (found {type(images).__name__} and "
                        f"{type(annotations).__name__}), as in COCO's captions_train2017.json")
    files: dict[Any, tuple[int, Any]] = {}
    for i, entry in enumerate(images):
        if not isinstance(entry, dict) or "id" not in entry or not entry.get("file_name"):
            raise DataError(f"{path} images[{i}] is {_short(entry)}; every image entry needs an 'id' and a "
                            'file_name, e.g. {"id": 1, "file_name": "000001.jpg"}')
        if entry["id"] in files:
            raise DataError(f"{path} images[{i}] repeats image id {entry['id']!r} of images[{files[entry['id']][0]}]; "
                            "give every image its own id")
        files[entry["id"]] = (i, entry["file_name"])
    captions: dict[Any, list[str]] = {image_id: [] for image_id in files}
    for j, note in enumerate(annotations):
        where = f"{path} annotations[{j}]"
        if not isinstance(note, dict) or "image_id" not in note or "caption" not in note:
            raise DataError(f"{where} is {_short(note)}; every annotation needs an 'image_id' and a 'caption', e.g. "
                            '{"image_id": 1, "caption": "a dog on a beach"}')
        if note["image_id"] not in captions:
            raise DataError(f"{where}: image_id {note['image_id']!r} is not the id of any entry in 'images'; add the "
                            "image or remove the annotation")
        captions[note["image_id"]].append(_text(note["caption"], where, "caption"))
    return [GenerativeExample(_image_path(root, file, f"{path} images[{i}]"), None,
                              tuple(c for c in captions[image_id] if c), f"{path.name} images[{i}] (id {image_id})")
            for image_id, (i, file) in files.items()]


def _from_llava(data: list, path: Path, kind: Kind, root: Path) -> list[GenerativeExample]:
    """One example per human/gpt pair of each conversation about an image."""
    if kind != "vqa":
        raise DataError(f"{path} is LLaVA conversation JSON (human questions, gpt answers): vqa data, not {kind}; "
                        f"read it with kind 'vqa' (vislora data check {path} --kind vqa)")
    examples: list[GenerativeExample] = []
    text_only = 0
    for i, entry in enumerate(data):
        where = f"{path} [{i}]"
        turns = entry.get("conversations")
        if not isinstance(turns, list):
            raise DataError(f"{where} has no 'conversations' list (keys: {', '.join(map(str, entry))}); every entry "
                            'is {"image": "x.jpg", "conversations": [{"from": "human", "value": "..."}, '
                            '{"from": "gpt", "value": "..."}]}')
        if not entry.get("image"):
            text_only += 1
            continue
        image = _image_path(root, entry["image"], where)
        examples += _pairs(turns, image, where, f"{path.name} [{i}]")
    if text_only:
        logger.info("%s: skipped %d text-only conversations (no image)", path, text_only)
    return examples


def _pairs(turns: list, image: Path, where: str, short: str) -> list[GenerativeExample]:
    """The (human question, gpt answer) pairs of one conversation, in order."""
    examples = []
    asked: tuple[int, str] | None = None
    for t, turn in enumerate(turns):
        role = turn.get("from") if isinstance(turn, dict) else None
        if role in HUMAN_ROLES:
            if asked is not None:
                raise DataError(f"{where} turn {t}: a second human turn before the gpt answer to turn {asked[0]}; "
                                "conversations alternate human, gpt, human, gpt")
            asked = (t, _strip_image_tag(_text(turn.get("value"), f"{where} turn {t}", "value")))
        elif role in MODEL_ROLES:
            if asked is None:
                raise DataError(f"{where} turn {t}: a gpt turn that answers no human turn; conversations start with "
                                "a human turn and alternate human, gpt")
            answer = _text(turn.get("value"), f"{where} turn {t}", "value")
            examples.append(GenerativeExample(image, asked[1], (answer,) if answer else (),
                                              f"{short} turn {asked[0]}"))
            asked = None
        else:
            raise DataError(f"{where} turn {t} is {_short(turn)}; each turn is {{\"from\": \"human\" or \"gpt\", "
                            "\"value\": text}} ('user'/'assistant' are accepted too)")
    if asked is not None:
        raise DataError(f"{where} turn {asked[0]}: a human turn with no gpt answer after it; add the answer or "
                        "remove the turn")
    return examples


def _from_rows(rows: list[tuple[str, dict]], path: Path, kind: Kind, root: Path) -> list[GenerativeExample]:
    """Rows of image, question, answer | answers (vqa) or image, caption | captions (captioning); each row comes
    with its place in the file ("line 12", or "[3]" in a JSON list)."""
    if not rows:
        raise DataError(f"{path} has no rows; give one row per example ({COLUMNS[kind]})")
    columns = list(dict.fromkeys(k for _, row in rows for k in row))
    _check_columns(columns, path, kind)
    single, plural = ("answer", "answers") if kind == "vqa" else ("caption", "captions")
    examples = []
    for place, row in rows:
        where = f"{path} {place}"
        if not row.get("image"):
            raise DataError(f"{where}: empty 'image'; every row needs an image path (relative to the image root)")
        question = None if kind == "captioning" else _text(row.get("question"), where, "question")
        answers = _answers(row.get(plural), where, plural)
        if row.get(single) not in (None, ""):
            first = _text(row[single], where, single)
            rest = list(answers)
            if first in rest:
                rest.remove(first)  # "answer" is the training target, "answers" the references (VQA v2 keeps both)
            answers = (first, *rest)
        examples.append(GenerativeExample(_image_path(root, row["image"], where), question,
                                          tuple(a for a in answers if a), f"{path.name} {place}"))
    return examples


def _check_columns(columns: list[str], path: Path, kind: Kind) -> None:
    """DataError naming the columns when a needed one is missing, and the kind to use when the file holds the
    other kind of data."""
    have = ", ".join(columns)
    if kind == "captioning" and "question" in columns:
        raise DataError(f"{path} has columns {have}: a question per row is vqa data, not captioning; read it with "
                        f"kind 'vqa' (vislora data check {path} --kind vqa)")
    if kind == "vqa" and "question" not in columns and {"caption", "captions"} & set(columns):
        raise DataError(f"{path} has columns {have}: a caption per image is captioning data, not vqa; read it with "
                        f"kind 'captioning' (vislora data check {path} --kind captioning)")
    answer = ("answer", "answers") if kind == "vqa" else ("caption", "captions")
    missing = [c for c in ("image", "question") if c not in columns and (c == "image" or kind == "vqa")]
    if not set(answer) & set(columns):
        missing.append(" or ".join(answer))
    if missing:
        raise DataError(f"{path} has no column {', '.join(missing)} (columns: {have}); {kind} rows need "
                        f"{COLUMNS[kind]}: rename the columns or add the missing one")


# ---------------------------------------------------------------------------------------------- cells
def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} line {exc.lineno} column {exc.colno} is not valid JSON ({exc.msg}); fix the file "
                        "(a .jsonl file holds one JSON object per line: name it .jsonl)") from None


def _text(value: Any, where: str, name: str) -> str:
    """A text cell, stripped; None is ""; numbers become text; anything else is a DataError."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: {name!r} is a {type(value).__name__} ({_short(value)}); give text")


def _answers(cell: Any, where: str, name: str) -> tuple[str, ...]:
    """The answers of a list cell: a JSON list (items text, or VQA v2 {"answer": ...} records), a JSON list written
    in a CSV cell, or text split on '|'."""
    if isinstance(cell, str) and cell.lstrip().startswith("["):
        try:
            cell = json.loads(cell)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: {name!r} starts like a JSON list but is not valid JSON ({exc.msg}); give a "
                            f"JSON list or answers separated by {LIST_SEPARATOR!r}") from None
    if isinstance(cell, str):
        return tuple(piece.strip() for piece in cell.split(LIST_SEPARATOR))
    if isinstance(cell, list):
        return tuple(_text(item.get("answer") if isinstance(item, dict) else item, where, name) for item in cell)
    return (_text(cell, where, name),)


def _strip_image_tag(question: str) -> str:
    """The question without LLaVA's `<image>` tag and the newline beside it."""
    return question.replace(f"{IMAGE_TAG}\n", "").replace(f"\n{IMAGE_TAG}", "").replace(IMAGE_TAG, "").strip()


def _image_path(root: Path, value: Any, where: str) -> Path:
    """The absolute path of an image named in the data (relative names are under `root`)."""
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: the image is {_short(value)}; give the image file's path as text (relative to the "
                        "image root)")
    return Path(os.path.abspath(root / value.strip()))


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
