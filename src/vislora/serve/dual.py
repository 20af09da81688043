"""DualEngine: serves a dual encoder (CLIP, SigLIP, open_clip, or an image backbone paired with a text encoder).

Images and texts are embedded into one space, each sample routed to its own adapter; a batch holds one modality.
Predictions use a prompt classifier per adapter, built once when the adapter loads: its class names filled into
its templates (from the task.json `vislora train` wrote), embedded through the adapter's own text tower and
averaged per class, scaled by the adapter's logit scale, as `vislora clip eval` scores it. A prompted_multilabel
adapter's prompts are its attributes and its logits get its learned bias (vislora.tasks.prompted); it answers, as
a multilabel classifier does, with every attribute whose score reaches its saved threshold. A run trained over
frozen adapters (task.json `frozen`) is served as their exact sum, one adapter to route.

    with build_engine(ServeConfig.parse({"adapters": {"pets": "runs/pets-clip/adapter"}})) as engine:
        engine.embed_text("a photo of a cat", adapter="pets").vector   # (dim,), L2-normalised
        engine.predict("cat.png", adapter="pets").labels[0]
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vislora.adapters.saved import ModulesToSave
from vislora.arithmetic import combine
from vislora.data.transforms import InputSpec
from vislora.dual_encoder import LogitScale
from vislora.errors import AdapterError, AdapterFileError, ServeError
from vislora.formats import check_adapter
from vislora.model import AdaptedModel, AdapterWeights
from vislora.serve.config import BaseSection
from vislora.serve.engine import Engine
from vislora.serve.sources import AdapterSource, frozen_folders
from vislora.tasks.clip import DEFAULT_TEMPLATES, text_classifier
from vislora.tasks.prompted import PROMPTED_TASK, add_logit_bias


@dataclass(frozen=True)
class PromptClassifier:
    """One adapter's zero-/few-shot head: logits = scale * image_embedding @ weights.T + bias."""

    weights: torch.Tensor  # (classes, dim), rows L2-normalised
    scale: float
    bias: float = 0.0  # prompted attributes: the adapter's logit bias


class DualEngine(Engine):
    """An `Engine` over a dual encoder: image and text embeddings, and prompt-classifier predictions."""

    modalities = ("image", "text")

    def __init__(self, model: AdaptedModel, head_path: str | None, input_spec: InputSpec, base: BaseSection,
                 **options: Any) -> None:
        self._heads: dict[str | None, PromptClassifier] = {}  # adapter (None: the base) -> its prompt classifier
        self.tokenizer = model.base_model.tokenizer
        super().__init__(model, head_path, input_spec, base, **options)

    def _prepare(self) -> None:
        with self._model_lock:  # the base, and adapters that were on the model already, predict base.classes
            for name in (None, *self.model.adapters):
                self._heads.update(self._prompt_head(name, self.base.classes, self.base.templates))

    # ------------------------------------------------------------ requests
    def preprocess_text(self, text: str) -> torch.Tensor:
        """Token ids and attention mask (2, tokens) of one text, truncated to the text tower's limit."""
        if not isinstance(text, str):
            raise ServeError(f"expected a text string, got {type(text).__name__}")
        if not text.strip():
            raise ServeError("the text is empty; send the words to embed")
        limit = self.limits.max_text_chars
        if len(text) > limit:
            raise ServeError(f"the text has {len(text):,} characters, above the server's limit of {limit:,} "
                             "(limits.max_text_chars); the text tower reads at most "
                             f"{self.tokenizer.max_length} tokens anyway")
        tokens = self.tokenizer([text])
        return torch.stack([tokens["input_ids"][0], tokens["attention_mask"][0]])  # (2, tokens)

    def check_predicts(self, adapter: str | None) -> None:
        """Refuse predict for an adapter (or each adapter of a rollout) that has no classes to predict."""
        rollouts = self.traffic.rollouts
        names = sorted(rollouts[adapter].weights) if adapter in rollouts else [adapter]
        for name in names:
            if name in self._heads:
                continue
            if name is None:
                raise ServeError(f"name an adapter (loaded: {self._loaded_names()}): this dual encoder predicts "
                                 "without one only when base.classes names its zero-shot classes")
            if name in self._adapters:
                raise ServeError(f"adapter {name!r} was trained without class labels (captions only), so it has no "
                                 "classes to predict; use /v1/embed (image or text embeddings) with it")

    # ------------------------------------------------------------ internals
    def _forward(self, modality: str, inputs: list[torch.Tensor], names: list[str | None]
                 ) -> tuple[Sequence[torch.Tensor | None], torch.Tensor]:
        """(logits of each sample (None for texts and adapters without classes), embeddings (N, dim))."""
        with torch.inference_mode():
            if modality == "text":
                ids, mask = (self.placement.inputs(t) for t in self._pad(inputs))
                texts = self.model(input_ids=ids, attention_mask=mask, adapters=names)[1]  # (N, dim)
                return [None] * len(inputs), texts.float().cpu()
            embeddings = self.model(images=self.placement.batch(inputs), adapters=names)[0].float().cpu()  # (N, dim)
        heads = [self._heads.get(name) for name in names]
        logits = [head.scale * embedding @ head.weights.T + head.bias if head else None
                  for embedding, head in zip(embeddings, heads, strict=True)]
        return logits, embeddings

    def _pad(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention masks (N, longest) of (2, tokens) rows, right-padded as the tokenizer pads."""
        longest = max(t.shape[1] for t in inputs)
        ids = torch.full((len(inputs), longest), self.tokenizer.pad_id, dtype=inputs[0].dtype)
        mask = torch.zeros((len(inputs), longest), dtype=inputs[0].dtype)
        for row, tokens in enumerate(inputs):
            ids[row, :tokens.shape[1]], mask[row, :tokens.shape[1]] = tokens[0], tokens[1]
        return ids, mask

    def _read(self, source: AdapterSource) -> list[AdapterWeights]:
        """The adapter's files, and those of the frozen adapters it was trained over (task.json `frozen`). A
        prompted adapter saved the logit bias it learned: the base gets one (0.0, which no other head reads)."""
        if (source.task or {}).get("task") == PROMPTED_TASK:
            with self._model_lock:
                add_logit_bias(self.model.base_model)
        return [check_adapter(self.model, folder) for folder in (*frozen_folders(source), source.path)]

    def _install(self, name: str, checked: list[AdapterWeights]) -> None:
        """One adapter as it is; a run trained over frozen adapters as their exact sum (ranks concatenated,
        `vislora.combine`), since a sample is routed to one adapter."""
        if len(checked) == 1:
            super()._install(name, checked[0])
            return
        parts = [f"x{uuid.uuid4().hex[:16]}" for _ in checked]  # not a name a request can use
        try:
            for part, files in zip(parts, checked, strict=True):
                self.model.install(part, files, activate=False)
            combine(self.model, dict.fromkeys(parts, 1.0), name, how="exact")
        except AdapterError as exc:
            if name in self.model.configs:
                self.model.delete_adapter(name)
            raise AdapterFileError(f"adapter {name!r} was trained over frozen adapters that cannot be summed into "
                                   f"one adapter to route ({exc})") from None
        finally:
            for part in parts:
                if part in self.model.configs:
                    self.model.delete_adapter(part)

    def _installed(self, name: str, source: AdapterSource) -> None:
        task = source.task or {}
        names = task.get("class_names") or (None if source.task else self.base.classes)
        self._heads.update(self._prompt_head(name, names, task.get("templates") or self.base.templates,
                                             biased=task.get("task") == PROMPTED_TASK))

    def _removed(self, name: str) -> None:
        self._heads.pop(name, None)

    def _prompt_head(self, name: str | None, classes: Sequence[str] | None, templates: Sequence[str],
                     biased: bool = False) -> dict[str | None, PromptClassifier]:
        """{name: its prompt classifier} over `classes` (none without classes), with the adapter's logit bias when
        `biased`; the model lock is held."""
        if not classes:
            return {}

        def embed(texts: list[str]) -> torch.Tensor:
            tokens = {key: self.placement.inputs(value) for key, value in self.tokenizer(texts).items()}
            return self.model(**tokens, adapters=[name] * len(texts))[1].float().cpu()  # (texts, dim)

        with torch.inference_mode():
            weights = text_classifier(self.model.base_model, classes, templates or DEFAULT_TEMPLATES, embed=embed)
        scale = self._logit_scale(name)
        bias = float(scale.bias) if biased and scale.bias is not None else 0.0
        return {name: PromptClassifier(F.normalize(weights, dim=-1), float(scale()), bias)}

    def _logit_scale(self, name: str | None) -> LogitScale:
        """The adapter's own trained logit scale (and bias) if it carries one, else the base's."""
        module = self.model.base_model.logit_scale
        if isinstance(module, ModulesToSave):
            module = module.copies[name] if name is not None and name in module.copies else module.original_module
        return module

    def _classes(self, source: AdapterSource | None) -> tuple[str, ...]:
        """A dual-encoder adapter's class labels (task.json), else the base's zero-shot classes, else none."""
        if source is not None and source.task is not None:
            return tuple(source.task.get("classes") or ())
        return tuple(self.base.classes or ())
