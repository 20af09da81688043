"""Caption tokenizers for dual encoders: pad to the batch, truncate to the text tower's limit, count truncations.

Both kinds return `{"input_ids": [batch, tokens], "attention_mask": [batch, tokens]}` and keep `truncated`, the
number of captions cut so far; the first cut is logged with the caption, later ones are counted (the trainer
reports the total).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)


class CaptionTokenizer:
    """Base: subclasses implement `_encode(texts) -> (batch dict, token counts before truncation)`."""

    max_length: int
    pad_id: int = 0  # the token id that pads a batch (attention mask 0)

    def __init__(self) -> None:
        self.truncated = 0
        self.seen = 0

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        texts = list(texts)
        batch, lengths = self._encode(texts)
        cut = [t for t, n in zip(texts, lengths, strict=True) if n > self.max_length]
        if cut and not self.truncated:
            logger.warning("caption longer than the text encoder's %d tokens (%d tokens) was truncated: %.80r; "
                           "further truncations are counted (see truncated_captions in metrics.jsonl)",
                           self.max_length, max(lengths), cut[0])
        self.truncated += len(cut)
        self.seen += len(texts)
        return batch

    def _encode(self, texts: list[str]) -> tuple[dict[str, torch.Tensor], list[int]]:
        raise NotImplementedError

    def token_count(self, text: str) -> int:
        """Tokens of `text` with special tokens, before truncation."""
        return self._encode([text])[1][0]


class HFCaptionTokenizer(CaptionTokenizer):
    """A Hugging Face tokenizer (BERT word pieces, CLIP BPE, SigLIP sentencepiece)."""

    def __init__(self, tokenizer: Any, max_length: int | None = None, pad_to_max: bool = False) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        limit = getattr(tokenizer, "model_max_length", None)
        self.max_length = int(max_length or (limit if limit and limit < 100_000 else 512))
        self.pad_to_max = pad_to_max  # SigLIP was trained on max-length padding
        self.pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0

    def _encode(self, texts: list[str]) -> tuple[dict[str, torch.Tensor], list[int]]:
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"]]
        out = self.tokenizer(texts, padding="max_length" if self.pad_to_max else True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        mask = out.get("attention_mask")
        ids = out["input_ids"]  # [batch, tokens]
        return {"input_ids": ids, "attention_mask": mask if mask is not None else torch.ones_like(ids)}, lengths


class OpenClipCaptionTokenizer(CaptionTokenizer):
    """open_clip's tokenizer (fixed context length, zero padding)."""

    def __init__(self, tokenizer: Any, context_length: int) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.max_length = context_length

    def _encode(self, texts: list[str]) -> tuple[dict[str, torch.Tensor], list[int]]:
        ids = self.tokenizer(texts, context_length=self.max_length)  # [batch, context]
        encoder = getattr(self.tokenizer, "encode", None)
        lengths = [len(encoder(t)) + 2 if encoder else int((row != 0).sum()) for t, row in zip(texts, ids,
                                                                                               strict=True)]
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}, lengths
