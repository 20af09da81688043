"""Build an index from a folder or manifest of images, query it with texts or images, and measure recall@K."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vislora.data.datasets import ImageDataset, MultiLabelFormat, collate, open_dataset
from vislora.errors import ConfigError, SearchError, StaleIndex
from vislora.search.embed import AdapterIdentity, Embedder, no_text_reason
from vislora.search.index import MODALITIES, Hit, Index, IndexWriter, load_index
from vislora.version import __version__

Progress = Callable[[Iterable[Any], int], Iterable[Any]]


@dataclass(frozen=True)
class BuildReport:
    """What `build_index` wrote: the folder, rows indexed, unreadable images skipped, embedding seconds."""

    path: Path
    count: int
    dim: int
    embedding: str
    skipped: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else float("inf")


def build_index(data: str | Path | ImageDataset, adapter: str | Path | Embedder, out: str | Path, *,
                registry: str | Path | None = None, base: bool = False, batch_size: int = 64, workers: int = 0,
                device: torch.device | str = "cpu", label_column: str | None = "label", path_column: str = "path",
                limit: int | None = None, seed: int = 0, progress: Progress | None = None) -> BuildReport:
    """Embed every image of `data` (an image folder, a .csv/.jsonl manifest, fashion-mnist:test, or an ImageDataset)
    with the run at `adapter` (a folder, registry:NAME@VERSION with `registry`, or an open Embedder) and save the
    index at `out` atomically. `base` embeds with the adapters off. Unreadable images are skipped and counted.
    `progress(batches, total)` wraps the embedding loop (a progress bar)."""
    embedder = adapter if isinstance(adapter, Embedder) else Embedder.open(adapter, registry, base=base, device=device)
    if isinstance(data, ImageDataset):
        dataset, source = data, data.name
    else:
        fmt = embedder.task.get("format")  # a multi-label run: its manifests list the labels of each image
        multilabel = MultiLabelFormat(fmt.get("separator", "|"), allow_empty=True) if fmt else None
        dataset = open_dataset(data, label_column=label_column or None, path_column=path_column, multilabel=multilabel)
        source = str(data)
    if limit:
        dataset = dataset.subset(limit, seed=seed)
    dataset.read_as(embedder.input_spec, seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=workers,
                                         generator=torch.Generator())
    batches: Iterable[dict[str, Any]] = progress(loader, len(loader)) if progress else loader
    skipped = 0
    with IndexWriter(out) as writer:
        started = time.perf_counter()
        for batch in batches:
            skipped += len(batch["skipped"])
            if "image" not in batch:
                continue
            rows = [_row(dataset, i) for i in batch["index"].tolist()]
            writer.add(embedder.images(batch["image"]), rows)
        seconds = time.perf_counter() - started
        header = {"embedding": embedder.kind, "modalities": list(embedder.modalities), "metric": "cosine",
                  "base": embedder.base_model_section, "input": embedder.task["input"],
                  "task": embedder.task.get("task", "classification"),
                  "adapter": embedder.identity.to_dict() if embedder.identity else None,
                  "built_from": embedder.reference, "registry": str(Path(registry).resolve()) if registry else None,
                  "data": _source_text(source), "skipped": skipped, "built_at": datetime.now(timezone.utc).isoformat(),
                  "seconds": seconds, "vislora": __version__}
        path = writer.commit(header)
        return BuildReport(path, writer.count, writer.dim or 0, embedder.kind, skipped, seconds)


def _row(dataset: ImageDataset, index: int) -> dict[str, Any]:
    record = dataset.records[index]
    metadata = dict(record.metadata)
    if record.caption is not None:
        metadata.setdefault("caption", record.caption)
    path = str(Path(record.source).absolute()) if isinstance(record.source, str) else dataset.describe(index)
    row = {"path": path, "label": record.label, "metadata": metadata}
    if record.labels is not None:  # multi-label data: every label of the image
        row["labels"] = list(record.labels)
    return row


def _source_text(source: str) -> str:
    path = Path(source)
    return str(path.resolve()) if path.exists() else source


# -------------------------------------------------------------------------------------------------- checks
def check_identity(index: Index, identity: AdapterIdentity | None, base_spec: str | None = None,
                   using: str = "") -> None:
    """StaleIndex unless queries embedded by the adapter `identity` (None: the base model, whose spec is `base_spec`)
    are comparable with `index`: the same adapter version it was built with, or both the same base model."""
    built = index.adapter
    rebuild = (f"rebuild the index with the adapter in use: vislora index build {index.header.get('data', 'DATA')} "
               f"--adapter {identity.label if identity else 'ADAPTER --base'} --out {index.path or 'INDEX'}")
    where = f"the index {index.path}" if index.path else "the index"
    if built is None and identity is not None:
        raise StaleIndex(f"{where} was built with the base model (no adapter) of {index.header['base']['spec']}, but "
                         f"the query is embedded with adapter {identity.short()}{using}; query without an adapter, "
                         f"or {rebuild}")
    if built is not None and identity is None:
        raise StaleIndex(f"{where} was built with adapter {built['label']} (sha256 {built['sha256'][:12]}), but the "
                         f"query is embedded by the base model without an adapter{using}; query with that adapter, or "
                         f"{rebuild}")
    if built is not None and identity is not None and built["sha256"] != identity.sha256:
        changed = sorted(n for n in {*built.get("files", {}), *identity.files}
                         if built.get("files", {}).get(n) != identity.files.get(n))
        raise StaleIndex(f"{where} was built with adapter {built['label']} (sha256 {built['sha256'][:12]}), but the "
                         f"query is embedded with adapter {identity.short()}{using}, another version (files that "
                         f"differ: {', '.join(changed) or 'none listed'}); its vectors are not comparable: {rebuild}")
    if base_spec is not None and base_spec != index.header["base"]["spec"]:
        raise StaleIndex(f"{where} holds embeddings of {index.header['base']['spec']}, but the query is embedded by "
                         f"{base_spec}{using}; {rebuild}")


def check_embedder(index: Index, embedder: Embedder) -> None:
    """StaleIndex unless `embedder` embeds as the index's images were embedded (same adapter version, or the same
    base model with the adapters off), SearchError if its embedding kind differs."""
    same = embedder.identity is not None and embedder.identity.label == embedder.reference
    check_identity(index, embedder.identity, using="" if same else f" ({embedder.reference})")
    if embedder.identity is None and embedder.base_model_section != index.header["base"]:
        raise StaleIndex(f"the index {index.path} holds base-model embeddings of {index.header['base']} but "
                         f"{embedder.reference} builds {embedder.base_model_section}; give an adapter trained on the "
                         "index's base model")
    if embedder.kind != index.embedding:
        raise SearchError(f"the index holds {index.embedding} embeddings but {embedder.reference} makes "
                          f"{embedder.kind} embeddings; query with the run the index was built with")


def check_modality(index: Index, modality: str) -> None:
    """SearchError, saying why, when `index` cannot answer a `modality` ("image" or "text") query."""
    if modality not in MODALITIES[index.embedding]:
        raise SearchError(no_text_reason(index.header.get("task", "classification"),
                                         f"the adapter this index was built with ({index.header.get('built_from')})"))


# -------------------------------------------------------------------------------------------------- queries
def open_query(index: Index | str | Path, adapter: str | Path | None = None, registry: str | Path | None = None,
               device: torch.device | str = "cpu") -> tuple[Index, Embedder]:
    """(index, embedder for its queries): the adapter in use is `adapter`, by default the one the index was built
    with (its folder or registry reference as recorded), hashed now and checked against the index (StaleIndex)."""
    index = index if isinstance(index, Index) else load_index(index)
    reference = adapter or index.header.get("built_from")
    if not reference:
        raise ConfigError("the index records no adapter folder to embed queries with; give --adapter")
    registry = registry or index.header.get("registry")
    embedder = Embedder.open(reference, registry, base=index.adapter is None, device=device)
    check_embedder(index, embedder)
    return index, embedder


def embed_query(embedder: Embedder, text: str | None = None, image: str | Path | Image.Image | None = None
                ) -> torch.Tensor:
    """The [1, dim] embedding of one text or one image."""
    if (text is None) == (image is None):
        raise SearchError("give exactly one of a text and an image to search with")
    return embedder.texts([text]) if text is not None else embedder.image_files([image])


def query(index: Index | str | Path, *, text: str | None = None, image: str | Path | Image.Image | None = None,
          k: int = 10, adapter: str | Path | None = None, registry: str | Path | None = None,
          embedder: Embedder | None = None) -> list[Hit]:
    """The top-k rows of `index` for one text or image, best first. The query is embedded with `embedder`, or with
    `adapter` (default: the adapter the index was built with), checked against the index first."""
    if embedder is None:
        index, embedder = open_query(index, adapter, registry)
    else:
        index = index if isinstance(index, Index) else load_index(index)
        check_embedder(index, embedder)
    check_modality(index, "text" if text is not None else "image")
    return index.hits(embed_query(embedder, text, image), k)[0]


# -------------------------------------------------------------------------------------------------- recall
def recall_at_k(index: Index, queries: torch.Tensor | np.ndarray, relevant: Sequence[int | Iterable[int]],
                ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """{K: share of queries with a relevant row among their top K}: queries [n, dim] (already embedded), and for each
    the row (or rows) of the index it should find."""
    sets = [{item} if isinstance(item, int | np.integer) else set(item) for item in relevant]
    if len(sets) != len(queries):
        raise ConfigError(f"{len(queries)} queries but {len(sets)} relevant-row entries; give one per query")
    if not ks or min(ks) < 1:
        raise ConfigError(f"ks must be positive ranks, got {list(ks)}")
    _, ids = index.search(queries, max(ks))
    first = [next((rank for rank, row in enumerate(found) if int(row) in wanted), len(found))
             for found, wanted in zip(ids, sets, strict=True)]
    return {k: float(np.mean([rank < k for rank in first])) if first else float("nan") for k in ks}


def text_recall(index: Index | str | Path, texts: Sequence[str], relevant: Sequence[int | Iterable[int]],
                ks: Sequence[int] = (1, 5, 10), *, adapter: str | Path | None = None,
                registry: str | Path | None = None, embedder: Embedder | None = None,
                batch_size: int = 256) -> dict[int, float]:
    """Text->image recall@K of `index`: each text embedded (by `embedder`, or the index's adapter, checked as in
    `query`) and counted found at K when one of its relevant rows is among its top K."""
    if embedder is None:
        index, embedder = open_query(index, adapter, registry)
    else:
        index = index if isinstance(index, Index) else load_index(index)
        check_embedder(index, embedder)
    check_modality(index, "text")
    if not texts:
        raise ConfigError("no query texts given")
    vectors = torch.cat([embedder.texts(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)])
    return recall_at_k(index, vectors, relevant, ks)


def rows_with(index: Index, label: str | None = None, **metadata: str) -> list[int]:
    """Rows whose label is `label` (or, for multi-label data, whose labels include it; when given) and whose metadata
    has every `key=value` given: relevant rows for `text_recall` (e.g. every image of one product)."""
    return [i for i, row in enumerate(index.rows)
            if (label is None or row.get("label") == label or label in row.get("labels", ()))
            and all((row.get("metadata") or {}).get(key) == value for key, value in metadata.items())]

