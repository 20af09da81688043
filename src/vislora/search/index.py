"""A search index on disk and in memory: L2-normalised vectors, one row (image path, label, metadata) per vector,
and a JSON header saying what embedded them.

Layout of an index folder::

    index.json    the header: format, count, dim, embedding kind, the base model and the adapter (its files' sha256,
                  hashed as the registry hashes them) that embedded the images, and the sha256 of the two files below
    vectors.f32   count x dim float32, row-major, L2-normalised
    rows.jsonl    one JSON object per row: {"path", "label", "metadata"}

`IndexWriter` builds the folder under a hidden staging name beside the target and renames it into place only once
every file is written and fsynced, so an interrupted build leaves no half index: the target is either the previous
index or the new one (a build killed between the two renames of a replacement leaves the previous index under a
hidden `.NAME.*.old` name; its path is printed by `load_index`).

`Index.search` is exact cosine search: FAISS `IndexFlatIP` when faiss is importable (`pip install 'vislora[search]'`),
else the same dot products in torch, chunked over the rows so memory stays bounded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from vislora.errors import ConfigError, IndexFileError, SearchError
from vislora.io import fsync
from vislora.registry import sha256_file

logger = logging.getLogger(__name__)

FORMAT = 1
HEADER, VECTORS, ROWS = "index.json", "vectors.f32", "rows.jsonl"
# embedding kind -> the query modalities it answers
MODALITIES: dict[str, tuple[str, ...]] = {"joint": ("image", "text"), "features": ("image",)}
CHUNK_ROWS = 65_536  # rows handed to FAISS, or scored in torch, at a time
Backend = Literal["auto", "faiss", "torch"]


def import_faiss() -> ModuleType | None:
    """The faiss module, or None when it is not installed (exact search then runs in torch)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


@dataclass(frozen=True)
class Hit:
    """One search result: its rank (1 = best), row number in the index, cosine score, image path and metadata."""

    rank: int
    row: int
    score: float
    path: str
    label: str | None
    metadata: dict[str, Any]
    labels: list[str] | None = None  # multi-label data: every label of the image

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "row": self.row, "score": self.score, "path": self.path, "label": self.label,
                "labels": self.labels, "metadata": self.metadata}

    def describe_labels(self) -> str:
        """The label, or the labels joined by '|', for display."""
        return self.label if self.labels is None else "|".join(self.labels)


class Index:
    """Vectors [count, dim] (L2-normalised, float32), their rows and the header; `search` finds the nearest rows.

    backend: "faiss", "torch", or "auto" (faiss when importable, else torch). Both are exact and agree.
    """

    def __init__(self, vectors: np.ndarray, rows: Sequence[dict[str, Any]], header: dict[str, Any],
                 path: Path | None = None, backend: Backend = "auto") -> None:
        if vectors.ndim != 2 or vectors.shape[0] != len(rows):
            raise IndexFileError(f"an index needs one row per vector; got vectors {vectors.shape} and {len(rows)} rows")
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.rows = list(rows)
        self.header = header
        self.path = path
        self.backend = _pick_backend(backend)
        self._faiss: Any = None
        if self.backend == "faiss":
            self._faiss = _faiss_index(self.vectors)

    # ---------------------------------------------------------------- what it holds
    @property
    def count(self) -> int:
        return self.vectors.shape[0]

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @property
    def embedding(self) -> str:
        """"joint" (a dual encoder's image-text space) or "features" (a classifier's pooled features)."""
        return self.header["embedding"]

    @property
    def modalities(self) -> tuple[str, ...]:
        return MODALITIES[self.embedding]

    @property
    def adapter(self) -> dict[str, Any] | None:
        """The adapter the images were embedded with ({"sha256", "label", "files"}), None for the base model."""
        return self.header.get("adapter")

    def describe(self) -> str:
        adapter = self.adapter
        by = (f"adapter {adapter['label']} (sha256 {adapter['sha256'][:12]})" if adapter else
              "the base model (no adapter)")
        return (f"{self.count:,} images x {self.dim} ({self.embedding} embeddings of {self.header['base']['spec']}, "
                f"{by})")

    # ---------------------------------------------------------------- search
    def search(self, queries: torch.Tensor | np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(scores [queries, k'], rows [queries, k']) of the k nearest rows of each query by cosine similarity, best
        first; k' = min(k, count). Queries [queries, dim] or [dim] are L2-normalised here."""
        if k < 1:
            raise SearchError(f"k must be at least 1, got {k}")
        q = torch.as_tensor(np.asarray(queries, dtype=np.float32) if isinstance(queries, np.ndarray) else
                            queries.detach().float().cpu())
        q = q[None] if q.dim() == 1 else q
        if q.dim() != 2 or q.shape[1] != self.dim:
            raise SearchError(f"queries have shape {tuple(q.shape)} but the index holds {self.dim}-wide vectors "
                              f"({self.embedding} embeddings of {self.header['base']['spec']}); embed the queries with "
                              "the model the index was built with")
        q = F.normalize(q, dim=-1).contiguous()
        k = min(k, self.count)
        if k == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if self.backend == "faiss":
            scores, ids = self._faiss.search(q.numpy(), k)
            return scores, ids.astype(np.int64)
        return _torch_search(self.vectors, q, k)

    def hits(self, queries: torch.Tensor | np.ndarray, k: int = 10) -> list[list[Hit]]:
        """`search` as Hit lists, one per query."""
        scores, ids = self.search(queries, k)
        return [[self.hit(rank, int(row), float(score)) for rank, (score, row) in enumerate(zip(s, r, strict=True),
                                                                                            start=1)]
                for s, r in zip(scores, ids, strict=True)]

    def hit(self, rank: int, row: int, score: float) -> Hit:
        data = self.rows[row]
        return Hit(rank, row, score, data["path"], data.get("label"), data.get("metadata") or {}, data.get("labels"))


def _pick_backend(backend: str) -> str:
    if backend not in ("auto", "faiss", "torch"):
        raise ConfigError(f"search backend must be auto, faiss or torch, got {backend!r}")
    if backend == "torch":
        return "torch"
    if import_faiss() is None:
        if backend == "faiss":
            raise ConfigError("faiss is not installed: pip install 'vislora[search]' (or use backend='torch', the "
                              "same exact search in torch)")
        return "torch"
    return "faiss"


def _faiss_index(vectors: np.ndarray) -> Any:
    faiss = import_faiss()
    index = faiss.IndexFlatIP(vectors.shape[1])
    for start in range(0, len(vectors), CHUNK_ROWS):  # no second full copy of the vectors at once
        index.add(np.ascontiguousarray(vectors[start:start + CHUNK_ROWS]))
    return index


def _torch_search(vectors: np.ndarray, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product, the rows scored CHUNK_ROWS at a time (memory: queries x (chunk + k))."""
    best_scores = torch.full((len(queries), 0), -torch.inf)
    best_ids = torch.zeros((len(queries), 0), dtype=torch.long)
    for start in range(0, len(vectors), CHUNK_ROWS):
        chunk = torch.from_numpy(vectors[start:start + CHUNK_ROWS])
        scores = torch.cat([best_scores, queries @ chunk.T], dim=1)
        ids = torch.cat([best_ids, torch.arange(start, start + len(chunk)).expand(len(queries), -1)], dim=1)
        best_scores, order = scores.topk(min(k, scores.shape[1]), dim=1)  # sorted, best first
        best_ids = ids.gather(1, order)
    return best_scores.numpy(), best_ids.numpy()


# -------------------------------------------------------------------------------------------------- on disk
class IndexWriter:
    """Writes an index folder in batches (bounded memory) under a staging name; `commit` moves it into place.

        with IndexWriter(out) as writer:
            writer.add(vectors, rows)   # as many times as there are batches
            writer.commit(header)       # nothing at `out` changes before this
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.staging = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.partial")
        self.count = 0
        self.dim: int | None = None
        self._digests = {VECTORS: hashlib.sha256(), ROWS: hashlib.sha256()}
        self._files: dict[str, Any] = {}

    def __enter__(self) -> IndexWriter:
        if self.path.exists() and not (self.path / HEADER).is_file():
            raise IndexFileError(f"{self.path} exists and is not a search index (no {HEADER}); give a new folder, "
                                 "or an index folder to replace")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir()
        self._files = {name: open(self.staging / name, "wb") for name in (VECTORS, ROWS)}  # noqa: SIM115 (closed by commit/__exit__)
        return self

    def add(self, vectors: torch.Tensor, rows: Sequence[dict[str, Any]]) -> None:
        """Append vectors [n, dim] (normalised here) and their n rows {"path", "label", "metadata"}."""
        if len(vectors) != len(rows):
            raise SearchError(f"{len(vectors)} vectors for {len(rows)} rows")
        if not len(rows):
            return
        data = F.normalize(vectors.detach().float().cpu(), dim=-1).numpy().astype("<f4", copy=False)
        if self.dim is None:
            self.dim = data.shape[1]
        elif data.shape[1] != self.dim:
            raise SearchError(f"vectors of width {data.shape[1]} added to an index of width {self.dim}")
        self._write(VECTORS, np.ascontiguousarray(data).tobytes())
        self._write(ROWS, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode())
        self.count += len(rows)

    def _write(self, name: str, data: bytes) -> None:
        self._files[name].write(data)
        self._digests[name].update(data)

    def commit(self, header: dict[str, Any]) -> Path:
        """Write the header, fsync everything and move the folder onto `path` (replacing an index there)."""
        if self.dim is None:
            raise SearchError("no image was embedded: nothing to index (every image was skipped as unreadable?)")
        for handle in self._files.values():
            handle.close()
        header = {**header, "format": FORMAT, "count": self.count, "dim": self.dim, "dtype": "float32",
                  "files": {name: digest.hexdigest() for name, digest in self._digests.items()}}
        (self.staging / HEADER).write_text(json.dumps(header, indent=2, sort_keys=True) + "\n")
        for name in (VECTORS, ROWS, HEADER):
            fsync(self.staging / name)
        fsync(self.staging)
        old = None
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.old")
            os.rename(self.path, old)
        os.rename(self.staging, self.path)
        fsync(self.path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.path

    def __exit__(self, *exc: object) -> None:
        for handle in self._files.values():
            handle.close()
        shutil.rmtree(self.staging, ignore_errors=True)


def read_header(path: str | Path) -> dict[str, Any]:
    """The header (index.json) of the index folder at `path`; IndexFileError if it is not a readable index."""
    path = Path(path)
    header_file = path / HEADER
    if not header_file.is_file():
        left = sorted(p.name for p in path.parent.glob(f".{path.name}.*.old")) if path.parent.is_dir() else []
        hint = (f"; an interrupted rebuild left the previous index at {path.parent / left[-1]}" if left else
                "; build one with `vislora index build DATA --adapter RUN/adapter --out " + str(path) + "`")
        what = "is not a search index (no index.json)" if path.is_dir() else "does not exist"
        raise IndexFileError(f"{path} {what}{hint}")
    try:
        header = json.loads(header_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexFileError(f"{header_file} is not valid JSON ({exc}): the index is corrupt; rebuild it with "
                             "`vislora index build`") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise IndexFileError(f"{header_file} has format {found!r}; this vislora reads index format {FORMAT}: rebuild "
                             "the index with `vislora index build`")
    missing = [k for k in ("count", "dim", "embedding", "base", "files") if k not in header]
    if missing or header["embedding"] not in MODALITIES:
        raise IndexFileError(f"{header_file} lacks {missing or 'a known embedding kind'}: the index is corrupt; "
                             "rebuild it with `vislora index build`")
    return header


def load_index(path: str | Path, backend: Backend = "auto", verify: bool = True) -> Index:
    """The index folder at `path` (written by `build_index` / `vislora index build`), its files' sizes checked,
    and with `verify` their sha256 against the header."""
    path = Path(path)
    header = read_header(path)
    count, dim = int(header["count"]), int(header["dim"])
    files = {name: path / name for name in (VECTORS, ROWS)}
    for name, file in files.items():
        if not file.is_file():
            raise IndexFileError(f"{file} is missing: the index is incomplete; rebuild it with `vislora index build`")
        if verify and sha256_file(file) != header["files"].get(name):
            raise IndexFileError(f"{file} does not match the sha256 its index.json records: the index is corrupt "
                                 "or was modified; rebuild it with `vislora index build`")
    size = files[VECTORS].stat().st_size
    if size != count * dim * 4:
        raise IndexFileError(f"{files[VECTORS]} holds {size:,} bytes, expected {count:,} x {dim} float32 = "
                             f"{count * dim * 4:,}: the index is corrupt or truncated; rebuild it")
    vectors = np.fromfile(files[VECTORS], dtype="<f4").reshape(count, dim)
    rows = list(_read_rows(files[ROWS]))
    if len(rows) != count:
        raise IndexFileError(f"{files[ROWS]} has {len(rows)} rows but index.json says {count}: the index is corrupt; "
                             "rebuild it")
    return Index(vectors, rows, header, path, backend)


def _read_rows(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise IndexFileError(f"{path} line {number} is not valid JSON ({exc}): the index is corrupt; "
                                     "rebuild it") from None
