"""What embeds images (and texts) for an index, and which adapter it is.

`Embedder.open(adapter)` opens a trained run as evaluation does: a dual-encoder run (task.kind contrastive or
few_shot, `load_trained_dual`) embeds images and texts into its joint space; a classifier run (`load_trained`)
embeds images with the pooled features its head reads (`classifier_parts`), as the server's /v1/embed does. With
`base=True` the adapters are switched off: the base model's embeddings, to compare base and adapted search.

An adapter is identified by the sha256 of its files, hashed as the registry hashes them (`registry.file_hashes`:
every file of the folder but hidden ones); a registry reference (registry:NAME@VERSION) uses the hashes the registry
recorded when the version was added (and checked when it is resolved).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from vislora.data.images import load_image
from vislora.data.transforms import InputSpec, build_transform
from vislora.errors import ConfigError, SearchError
from vislora.evaluate.collect import classifier_parts
from vislora.model import AdaptedModel
from vislora.registry import Registry, file_hashes
from vislora.runs import DUAL_TASKS, input_spec, load_trained, load_trained_dual, read_task

REGISTRY = "registry:"


@dataclass(frozen=True)
class AdapterIdentity:
    """An adapter version: sha256 over its files' hashes, a label for messages (registry:NAME@VERSION or the
    folder) and the per-file sha256 it was computed from."""

    sha256: str
    label: str
    files: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of_files(cls, files: Mapping[str, str], label: str) -> AdapterIdentity:
        """The identity of an adapter whose files have the sha256 `files` ({relative path: sha256})."""
        if not files:
            raise ConfigError(f"{label} holds no files to identify the adapter by")
        digest = hashlib.sha256("".join(f"{name}\t{files[name]}\n" for name in sorted(files)).encode()).hexdigest()
        return cls(digest, label, dict(sorted(files.items())))

    @classmethod
    def of_folder(cls, folder: str | Path, label: str | None = None) -> AdapterIdentity:
        """The identity of the adapter folder on disk, its files hashed now (`registry.file_hashes`)."""
        folder = Path(folder)
        return cls.of_files(file_hashes(folder), label or str(folder.resolve()))

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "label": self.label, "files": self.files}

    def short(self) -> str:
        return f"{self.label} (sha256 {self.sha256[:12]})"


def resolve_adapter(reference: str | Path, registry: str | Path | None = None) -> tuple[Path, AdapterIdentity]:
    """(folder, identity) of an adapter directory, or of `registry:NAME[@VERSION]` (VERSION a number, "latest" or
    "promoted", the default) in the registry at `registry`, whose recorded hashes are checked and used."""
    text = str(reference)
    if not text.startswith(REGISTRY):
        folder = Path(reference).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"adapter folder {folder} does not exist; give a run's adapter/ or best/ folder, or "
                              "registry:NAME@VERSION with --registry")
        return folder, AdapterIdentity.of_folder(folder)
    if registry is None:
        raise ConfigError(f"{text!r} names a registry adapter, but no registry is given (--registry ROOT)")
    name, _, version = text.removeprefix(REGISTRY).partition("@")
    store = Registry(registry)
    record = store.get(name, version or "promoted")
    folder = store.resolve(name, record.version)
    return folder, AdapterIdentity.of_files(record.files, f"{REGISTRY}{name}@{record.version}")


class Embedder:
    """A trained run's model (adapters on, or off with `base`), embedding images and, for dual encoders, texts."""

    def __init__(self, model: AdaptedModel, task: dict[str, Any], reference: str,
                 identity: AdapterIdentity | None, device: torch.device | str = "cpu") -> None:
        self.model = model.eval().to(device)
        self.task = task
        self.reference = reference  # as given: a folder, or registry:NAME@VERSION
        self.identity = identity  # None: the base model (adapters off)
        self.device = torch.device(device)
        self.kind = "joint" if task.get("task") in DUAL_TASKS else "features"
        self.input_spec: InputSpec = input_spec(task)
        self.transform = build_transform(self.input_spec, train=False)

    @classmethod
    def open(cls, adapter: str | Path, registry: str | Path | None = None, *, base: bool = False,
             device: torch.device | str = "cpu") -> Embedder:
        """The embedder of a run's adapter folder (or registry:NAME@VERSION); `base` switches its adapters off."""
        folder, identity = resolve_adapter(adapter, registry)
        task = read_task(folder)
        if task.get("task", "classification") in DUAL_TASKS:
            model, task = load_trained_dual(folder)
        else:
            model, task = load_trained(folder)
        reference = str(adapter) if str(adapter).startswith(REGISTRY) else str(folder.resolve())
        return cls(model, task, reference, None if base else identity, device)

    @property
    def modalities(self) -> tuple[str, ...]:
        return ("image", "text") if self.kind == "joint" else ("image",)

    @property
    def base_model_section(self) -> dict[str, Any]:
        """The base model the embeddings come from (the task.json `model` section)."""
        return dict(self.task["model"])

    def describe(self) -> str:
        by = f"adapter {self.identity.short()}" if self.identity else f"the base model of {self.reference}"
        return f"{self.task['model']['spec']} with {by}"

    @contextlib.contextmanager
    def _scope(self) -> Iterator[None]:
        with torch.inference_mode(), self.model.disabled() if self.identity is None else contextlib.nullcontext():
            yield

    def images(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings [batch, dim] (float32, CPU) of preprocessed images [batch, 3, size, size]."""
        pixels = pixels.to(self.device)
        with self._scope():
            if self.kind == "joint":
                out = self.model(images=pixels)[0]
            else:
                out = classifier_parts(self.model.base_model)[0](pixels)
        return F.normalize(out.float(), dim=-1).cpu()

    def image_files(self, images: Sequence[str | Path | Image.Image]) -> torch.Tensor:
        """`images` for files (read by load_image with the run's DICOM window) or PIL images, with the run's
        evaluation transform."""
        pixels = []
        for image in images:
            if isinstance(image, Image.Image):
                image = image.convert("RGB")
            else:
                image = load_image(image, window=self.input_spec.window)
            pixels.append(self.transform(image))
        return self.images(torch.stack(pixels))

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings [len(texts), dim] in the joint space (dual-encoder runs only)."""
        if self.kind != "joint":
            raise SearchError(no_text_reason(self.task.get("task", "classification"), self.reference))
        with self._scope():
            out = self.model.base_model.embed_texts(list(texts), self.device)
        return F.normalize(out.float(), dim=-1).cpu()


def no_text_reason(task: str, who: str) -> str:
    """Why a text query is refused on classifier embeddings."""
    return (f"text queries need a dual encoder's joint image-text space, but {who} is a {task!r} run: its index "
            "holds the image features its classifier head reads, which no text maps into; query with an image, or "
            "build the index from a dual-encoder run (task.kind contrastive or few_shot)")
