"""Blocking calls for batch jobs in Python (no HTTP): predict and embed many inputs, each with its own adapter.

They submit through the engine's futures API (`submit`, `submit_text`), so calls from several threads share
micro-batches with each other and with HTTP requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from vislora.errors import ServeError
from vislora.serve.records import Embedding, Output, Prediction, labels_of

if TYPE_CHECKING:
    from vislora.serve.config import BatchingSection

ImageInput = Image.Image | torch.Tensor | bytes | str | Path  # a tensor: [3, H, W] from vislora.data.load_image


class BlockingCalls:
    """predict / embed / embed_text and their *_many forms over an engine's submit and preprocess methods."""

    batching: BatchingSection

    # ---- what they are built on: Engine implements these
    def preprocess(self, image: ImageInput) -> torch.Tensor:
        raise NotImplementedError

    def submit(self, pixels: torch.Tensor, adapter: str | None = None) -> Future[Output]:
        raise NotImplementedError

    def preprocess_text(self, text: str) -> torch.Tensor:
        raise NotImplementedError

    def submit_text(self, tokens: torch.Tensor, adapter: str | None = None) -> Future[Output]:
        raise NotImplementedError

    def check_predicts(self, adapter: str | None) -> None:
        raise NotImplementedError

    # ---- the calls
    def predict(self, image: ImageInput, adapter: str | None = None, k: int = 5) -> Prediction:
        """Top-k labels of one image; several calls from several threads share batches."""
        return self.predict_many([image], [adapter], k)[0]

    def predict_many(self, images: Sequence[ImageInput], adapters: Sequence[str | None], k: int = 5
                     ) -> list[Prediction]:
        """Top-k labels of many images, each with its own adapter (a batch inference job, no HTTP)."""
        outputs = self._compute(images, adapters, need_classes=True)
        return [Prediction(o.adapter, o.digest, o.rollout, labels_of(o, k), o.tagger is not None, o.request_id)
                for o in outputs]

    def embed(self, image: ImageInput, adapter: str | None = None) -> Embedding:
        return self.embed_many([image], [adapter])[0]

    def embed_many(self, images: Sequence[ImageInput], adapters: Sequence[str | None]) -> list[Embedding]:
        """Embeddings of many images, each with its own adapter: a classifier's pooled backbone features (the
        head's input); a dual encoder's L2-normalised image embeddings (comparable with its text embeddings)."""
        outputs = self._compute(images, adapters)
        return [Embedding(o.adapter, o.digest, o.rollout, o.features, o.request_id) for o in outputs]

    def embed_text(self, text: str, adapter: str | None = None) -> Embedding:
        return self.embed_texts([text], [adapter])[0]

    def embed_texts(self, texts: Sequence[str], adapters: Sequence[str | None]) -> list[Embedding]:
        """L2-normalised text embeddings of many texts, each with its own adapter (dual-encoder bases only)."""
        outputs = self._compute(texts, adapters, modality="text")
        return [Embedding(o.adapter, o.digest, o.rollout, o.features, o.request_id) for o in outputs]

    def _compute(self, items: Sequence[ImageInput] | Sequence[str], adapters: Sequence[str | None],
                 need_classes: bool = False, modality: str = "image") -> list[Output]:
        if len(items) != len(adapters):
            raise ServeError(f"{len(items)} {modality}s but {len(adapters)} adapter names; give one name (or None) "
                             "each")
        if need_classes:
            for adapter in set(adapters):
                self.check_predicts(adapter)
        if modality == "text":
            prepare, submit = self.preprocess_text, self.submit_text
        else:
            prepare, submit = self.preprocess, self.submit
        outputs: list[Output] = []
        window = max(1, self.batching.max_queue // 2)  # never more in the queue than it holds
        for start in range(0, len(items), window):
            chunk = zip(items[start:start + window], adapters[start:start + window], strict=True)
            futures = [submit(prepare(item), adapter) for item, adapter in chunk]
            outputs.extend(f.result() for f in futures)
        return outputs
