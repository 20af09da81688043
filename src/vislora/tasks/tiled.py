"""Tiled classification of large images: a classifier's features computed on tiles, pooled per image, then its head.

    logits(image) = head(pool(features(t_1), ..., features(t_n)))    t_k: the tiles of the image (vislora.data.tiling)

`pool` is the mean, the element-wise max, or gated attention-MIL (Ilse et al. 2018): for tile features h_k,

    a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k))),    pooled = sum_k a_k h_k

whose V, U and w (module `tile_attention`) are trained with the adapter and saved with it beside the head
(modules_to_save). Features are computed `tiles_per_step` tiles per backbone call; while gradients are recorded each
call runs under activation checkpointing, so only the images and the per-tile features stay in memory and the peak
follows tiles_per_step, not the image size. A routed call (`AdaptedModel(images, adapters=[...])`) gives every tile
its image's adapter, then routes the pooling and the head per image.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.checkpoint import checkpoint

from vislora.data.tiling import TilingConfig, crop_tiles, pad_to, tile_grid
from vislora.data.transforms import model_input_spec
from vislora.errors import AdapterError, ConfigError, DataError
from vislora.tasks.classification import Head, Pooling, build_classifier

HEAD = "classifier.head"  # where a TiledClassifier's head lives
ATTENTION = "tile_attention"  # where its attention pooling lives (aggregate: attention)
ATTENTION_DIM = 128  # hidden width L of V and U

Images = torch.Tensor | Sequence[torch.Tensor]  # [B, C, H, W], or B images [C, H_i, W_i] of their own sizes
Entry = tuple[int, int, int]  # (image index in the batch, top, left) of one tile
Routing = Callable[[Sequence[str | None], Sequence[Any]], AbstractContextManager[None]]


class GatedAttention(nn.Module):
    """Gated attention scores of tiles: s_k = w^T (tanh(V h_k) * sigmoid(U h_k)) for each tile feature h_k."""

    def __init__(self, width: int, hidden: int = ATTENTION_DIM) -> None:
        super().__init__()
        self.V = nn.Linear(width, hidden, bias=False)
        self.U = nn.Linear(width, hidden, bias=False)
        self.w = nn.Linear(hidden, 1, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Scores [..., N] of tile features h [..., N, width] (softmax over N gives the attention weights)."""
        gated = torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))  # (..., N, L)
        return self.w(gated).squeeze(-1)  # (..., N, L) @ (L, 1) -> (..., N)


def mean_pool(embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of each image's tile features: embeddings [B, N, D] (padded), mask [B, N] True on real tiles -> [B, D]."""
    weights = mask.to(embeddings.dtype)
    return (embeddings * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)


def max_pool(embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Element-wise max of each image's tile features -> [B, D]."""
    return embeddings.masked_fill(~mask[..., None], float("-inf")).amax(1)


def attention_pool(scores: torch.Tensor, embeddings: torch.Tensor, mask: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_k a_k h_k [B, D], weights a [B, N]) with a = softmax of the scores [B, N] over each image's real tiles."""
    weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=1)  # padded tiles weigh 0
    return (weights[..., None] * embeddings).sum(1), weights


class TiledClassifier(nn.Module):
    """A classifier with `features(images)` and a linear `head` (vislora.tasks.classification), run on tiles of
    images of any size; tiles are cut `tiling.size` pixels wide and resized to the model's `input_size`."""

    def __init__(self, classifier: nn.Module, input_size: int, tiling: TilingConfig) -> None:
        super().__init__()
        head = getattr(classifier, "head", None)
        if not hasattr(classifier, "features") or not isinstance(head, nn.Linear):
            raise ConfigError(f"a tiled model pools tile features before a linear head, but a "
                              f"{type(classifier).__name__} has no `features` method with a linear `head`; build it "
                              "with vislora.tasks.classification.build_classifier(..., head='linear')")
        self.classifier = classifier
        self.input_size = input_size
        self.tiling = tiling.resolved(input_size)
        if self.tiling.aggregate == "attention":
            self.tile_attention = GatedAttention(head.in_features)

    @property
    def head(self) -> nn.Module:
        return self.classifier.head

    @property
    def backbone(self) -> nn.Module:
        return self.classifier.backbone

    @property
    def head_path(self) -> str:
        return HEAD

    def trained_modules(self) -> list[str]:
        """Paths of the modules trained in full and saved with an adapter: the head, and the attention pooling."""
        return [HEAD, *([ATTENTION] if self.tiling.aggregate == "attention" else [])]

    def forward(self, images: Images) -> torch.Tensor:
        return self.head(self.features(images))

    def features(self, images: Images) -> torch.Tensor:
        """Pooled tile features [batch, width] of each image: what the head reads."""
        return self.pool(*self.embeddings(images))

    def embeddings(self, images: Images) -> tuple[torch.Tensor, torch.Tensor]:
        """Every tile's features by image, [B, N, D] zero-padded to the most tiles of an image, and the mask [B, N]
        of the real tiles (row by row in each image)."""
        images = self.prepare(images)
        entries = self.entries(images)
        parts = [self._chunk_features(images, chunk) for chunk in self.chunks(entries)]
        return self.by_image(torch.cat(parts), entries, len(images))

    def forward_routed(self, routing: Routing, adapters: Sequence[str | None], images: Images) -> torch.Tensor:
        """Logits of each image with its own adapter (AdaptedModel.forward calls this with its `routing`): every tile
        with its image's adapter, then pooling and head per image. No checkpointing: a recomputation in the backward
        pass would run outside the route."""
        images = self.prepare(images)
        if isinstance(adapters, str) or len(adapters) != len(images):
            raise AdapterError(f"adapters= takes one adapter name (or None) per image: got {adapters!r} for "
                               f"{len(images)} images")
        entries = self.entries(images)
        parts = []
        for chunk in self.chunks(entries):
            tiles = self.tiles(images, chunk)
            with routing([adapters[k] for k, _, _ in chunk], (tiles,)):
                parts.append(self.classifier.features(tiles))
        embeddings, mask = self.by_image(torch.cat(parts), entries, len(images))
        with routing(adapters, (embeddings,)):
            return self.head(self.pool(embeddings, mask))

    def tile_weights(self, images: Images) -> list[torch.Tensor]:
        """Each image's attention weights over its tiles [n_i], row by row (aggregate: attention only)."""
        if self.tiling.aggregate != "attention":
            raise ConfigError(f"tile weights come from attention pooling; this model pools by "
                              f"{self.tiling.aggregate!r} (data.tiling.aggregate: attention)")
        embeddings, mask = self.embeddings(images)
        _, weights = attention_pool(self.tile_attention(embeddings), embeddings, mask)
        return [w[m] for w, m in zip(weights, mask, strict=True)]

    # ------------------------------------------------------------ parts
    def prepare(self, images: Images) -> list[torch.Tensor]:
        """The batch as a list of images [C, H, W], each zero-padded to at least one tile."""
        if torch.is_tensor(images) and images.dim() == 4:
            images = images.unbind(0)
        shapes = [tuple(images.shape)] if torch.is_tensor(images) else [tuple(image.shape) for image in images]
        if not shapes or any(len(shape) != 3 for shape in shapes):
            raise DataError(f"a tiled classifier takes images [B, C, H, W] or a list of images [C, H, W]; got "
                            f"{'shapes ' + str(shapes[:3]) if shapes else 'no image'}")
        return [pad_to(image, self.tiling.size) for image in images]

    def entries(self, images: Sequence[torch.Tensor]) -> list[Entry]:
        """(image, top, left) of every tile of the batch, image by image, row by row."""
        size, overlap = self.tiling.size, self.tiling.overlap
        return [(k, top, left) for k, image in enumerate(images)
                for top, left in tile_grid(image.shape[-2], image.shape[-1], size, overlap)]

    def chunks(self, entries: list[Entry]) -> list[list[Entry]]:
        """`entries` in runs of tiles_per_step: the tiles of one backbone call."""
        step = self.tiling.tiles_per_step
        return [entries[i:i + step] for i in range(0, len(entries), step)]

    def tiles(self, images: Sequence[torch.Tensor], chunk: Sequence[Entry]) -> torch.Tensor:
        """The tiles of `chunk` cut from the (padded) `images`: [n, C, input_size, input_size]."""
        return torch.cat([crop_tiles(images[k], [(top, left) for _, top, left in group], self.tiling.size,
                                     self.input_size)
                          for k, group in itertools.groupby(chunk, key=lambda entry: entry[0])])

    def by_image(self, features: torch.Tensor, entries: Sequence[Entry], n_images: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tile features [T, D] (in `entries` order) as [B, N, D], zero-padded to the most tiles of an image, and the
        mask [B, N] of the real tiles."""
        counts = [0] * n_images
        for k, _, _ in entries:
            counts[k] += 1
        embeddings = pad_sequence(list(features.split(counts)), batch_first=True)  # (B, N, D)
        mask = torch.arange(embeddings.shape[1], device=features.device)[None, :] < torch.tensor(
            counts, device=features.device)[:, None]  # (B, N)
        return embeddings, mask

    def pool(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One feature vector [B, D] per image from its tiles' [B, N, D] (mask [B, N]), as tiling.aggregate says."""
        if self.tiling.aggregate == "mean":
            return mean_pool(embeddings, mask)
        if self.tiling.aggregate == "max":
            return max_pool(embeddings, mask)
        return attention_pool(self.tile_attention(embeddings), embeddings, mask)[0]

    def _chunk_features(self, images: list[torch.Tensor], chunk: list[Entry]) -> torch.Tensor:
        """Features [n, D] of one chunk's tiles; recomputed in the backward pass while gradients are recorded, so the
        backbone's activations of only one chunk are alive at a time."""
        if torch.is_grad_enabled():
            return checkpoint(self._tile_features, images, chunk, use_reentrant=False)
        return self._tile_features(images, chunk)

    def _tile_features(self, images: list[torch.Tensor], chunk: list[Entry]) -> torch.Tensor:
        return self.classifier.features(self.tiles(images, chunk))


def build_tiled_classifier(spec: str, num_classes: int, tiling: TilingConfig, pretrained: bool = True,
                           head: Head = "auto", pooling: Pooling = "cls", image_size: int | None = None,
                           **kwargs: Any) -> TiledClassifier:
    """build_classifier's model with a linear head on pooled features ('auto' means that for timm models too) in a
    TiledClassifier whose tiles are resized to `image_size` (default: the model's native input side)."""
    if head == "own":
        raise ConfigError("model.head: own keeps a timm model's classifier, which reads the tokens of one image; a "
                          "tiled model pools tile features before a linear head: set model.head: linear (or auto)")
    classifier, _ = build_classifier(spec, num_classes, pretrained, "linear", pooling, image_size, **kwargs)
    input_size = image_size or model_input_spec(classifier.backbone).size
    return TiledClassifier(classifier, input_size, tiling)
