"""Dual encoders (CLIP-style): an image tower and a text tower that embed into one space.

Every model here has the same surface, so contrastive training, zero-shot classifiers, few-shot recipes and
tower-aware adapters work on any of them:

    encode_image(images)                  -> [batch, dim], L2-normalised
    encode_text(input_ids, attention_mask) -> [batch, dim], L2-normalised
    tokenize(texts)                        -> {"input_ids", "attention_mask"} (truncated to the tower's limit)
    logit_scale()                          -> exp(learned log scale), capped at 100 as in CLIP
    towers / heads                         -> module-path prefixes of each tower and its projection

`DualEncoder` pairs any image backbone with any text encoder through learned projections (the offline pair is
DINOv2-S + all-MiniLM-L6-v2); `HFDualEncoder` wraps Hugging Face `CLIPModel` / `SiglipModel`; `OpenClipDualEncoder`
wraps open_clip models.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vislora.errors import ConfigError
from vislora.input_size import hf_image_kwargs
from vislora.tokenize import CaptionTokenizer, HFCaptionTokenizer, OpenClipCaptionTokenizer

ImagePooling = Literal["cls", "mean", "cls_mean"]
TextPooling = Literal["mean", "cls"]


class LogitScale(nn.Module):
    """The learned temperature: exp(log_scale), capped at 100; SigLIP also learns a bias. A module, so
    `modules_to_save` trains and saves it with the adapter."""

    def __init__(self, scale: float = 1 / 0.07, bias: float | None = None) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self.bias = nn.Parameter(torch.tensor(float(bias))) if bias is not None else None

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=100.0)


class DualTowerModel(nn.Module):
    """Shared surface of the dual encoders; subclasses implement `image_features` and `text_features`."""

    towers: dict[str, str]  # tower name -> module path prefix of its encoder ("vision", "text")
    heads: dict[str, str]  # tower name -> module path of its projection (trained in full), if it has one
    tokenizer: CaptionTokenizer
    logit_scale: LogitScale

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [batch, dim] of images [batch, 3, H, W]."""
        return F.normalize(self.image_features(images).float(), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings [batch, dim] of token ids [batch, tokens]."""
        return F.normalize(self.text_features(input_ids, attention_mask).float(), dim=-1)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(texts)

    def embed_texts(self, texts: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
        """Tokenize and encode captions: [len(texts), dim]."""
        tokens = self.tokenize(texts)
        return self.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))

    def forward(self, images: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(image embeddings or None, text embeddings or None). Text-only calls route per sample:
        `adapted(input_ids=ids, attention_mask=mask, adapters=["english", "spanish", ...])`."""
        image = self.encode_image(images) if images is not None else None
        if input_ids is not None and attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text = self.encode_text(input_ids, attention_mask) if input_ids is not None else None
        return image, text

    @property
    def vision_tower(self) -> nn.Module:
        """The image encoder module (what transforms are sized from)."""
        return self.get_submodule(self.towers["vision"])


class DualEncoder(DualTowerModel):
    """Any image backbone + any text encoder, joined by learned linear projections into `embed_dim`.

    image: pool(vision(x)) @ W_v -> [batch, embed_dim];  text: pool(text(ids)) @ W_t -> [batch, embed_dim].
    """

    def __init__(self, vision: nn.Module, text: nn.Module, tokenizer: CaptionTokenizer, embed_dim: int = 256,
                 vision_pooling: ImagePooling = "cls", text_pooling: TextPooling = "mean",
                 logit_scale: float = 1 / 0.07) -> None:
        super().__init__()
        self.towers = {"vision": "vision", "text": "text"}
        self.heads = {"vision": "vision_proj", "text": "text_proj"}
        self.vision, self.text, self.tokenizer = vision, text, tokenizer
        self.vision_pooling, self.text_pooling = vision_pooling, text_pooling
        vision_width = _width(vision) * (2 if vision_pooling == "cls_mean" else 1)
        self.vision_proj = _seeded_linear(vision_width, embed_dim, seed=0)
        self.text_proj = _seeded_linear(_width(text), embed_dim, seed=1)
        self.logit_scale = LogitScale(logit_scale)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.vision_proj(pool_image(self.vision, images, self.vision_pooling))

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, width]
        if self.text_pooling == "cls":
            return self.text_proj(tokens[:, 0])
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)  # [B, T, 1]
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # sentence-transformers' mean pooling
        return self.text_proj(pooled)


class HFDualEncoder(DualTowerModel):
    """Hugging Face `CLIPModel` or `SiglipModel` with the shared surface; its own logit scale (and bias) become a
    trainable `LogitScale`."""

    def __init__(self, model: nn.Module, tokenizer: CaptionTokenizer) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.towers = {"vision": "model.vision_model", "text": "model.text_model"}
        self.heads = {name: f"model.{attr}" for name, attr in (("vision", "visual_projection"),
                                                               ("text", "text_projection"))
                      if isinstance(getattr(model, attr, None), nn.Module)}
        bias = getattr(model, "logit_bias", None)
        self.logit_scale = LogitScale(float(model.logit_scale.detach().exp()),
                                      float(bias.detach().reshape(())) if bias is not None else None)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        get_features = self.model.get_image_features
        return _pooled(get_features(pixel_values=images, **hf_image_kwargs(get_features)))  # any side

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if type(self.model).__name__.startswith("Siglip"):  # trained without an attention mask
            return _pooled(self.model.get_text_features(input_ids=input_ids))
        return _pooled(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class OpenClipDualEncoder(DualTowerModel):
    """An open_clip model (`open_clip.create_model(...)`) with the shared surface."""

    def __init__(self, model: nn.Module, tokenizer: CaptionTokenizer) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        text_prefix = "model.transformer" if hasattr(model, "transformer") else "model.text"
        self.towers = {"vision": "model.visual", "text": text_prefix}
        self.heads = {}  # open_clip keeps its projections as raw parameters of the towers
        bias = getattr(model, "logit_bias", None)
        self.logit_scale = LogitScale(float(model.logit_scale.detach().exp()),
                                      float(bias.detach().reshape(())) if bias is not None else None)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids)


def _seeded_linear(n_in: int, n_out: int, seed: int) -> nn.Linear:
    """A bias-free projection initialised as nn.Linear does, from a fixed seed: building the same DualEncoder twice
    gives the same projections, so an adapter that leaves them frozen still loads onto a fresh build."""
    layer = nn.Linear(n_in, n_out, bias=False)
    bound = 1 / math.sqrt(n_in)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=torch.Generator().manual_seed(seed))
    return layer


def pool_image(backbone: nn.Module, images: torch.Tensor, pooling: ImagePooling = "cls") -> torch.Tensor:
    """Pooled features [batch, width] of an HF vision model, a timm model, or any module returning a tensor."""
    if hasattr(backbone, "forward_head"):  # timm
        return backbone.forward_head(backbone.forward_features(images), pre_logits=True)
    if getattr(backbone, "config", None) is None:
        return backbone(images)
    out = backbone(pixel_values=images, **hf_image_kwargs(backbone))  # any side (vislora.input_size)
    tokens = out.last_hidden_state  # [batch, tokens, width]; token 0 is CLS
    cls = out.pooler_output if getattr(out, "pooler_output", None) is not None else tokens[:, 0]
    if pooling == "cls":
        return cls
    mean = tokens[:, 1:].mean(dim=1)
    return mean if pooling == "mean" else torch.cat([cls, mean], dim=-1)


def _pooled(out: Any) -> torch.Tensor:
    return out if torch.is_tensor(out) else out.pooler_output


def _width(module: nn.Module) -> int:
    config = getattr(module, "config", None)
    if config is not None and getattr(config, "hidden_size", None):
        return config.hidden_size
    for attribute in ("num_features", "output_dim", "embed_dim"):
        if isinstance(getattr(module, attribute, None), int):
            return getattr(module, attribute)
    raise ConfigError(f"cannot tell the feature width of a {type(module).__name__}; use a timm or Hugging Face "
                      "model as a tower")


# ---------------------------------------------------------------------------------------------- building
def hf_tokenizer(path: str, max_length: int | None = None, pad_to_max: bool = False) -> HFCaptionTokenizer:
    """A caption tokenizer from a hub id or directory; the limit is the sentence-transformers one when given."""
    from transformers import AutoTokenizer

    st_config = Path(path) / "sentence_bert_config.json"
    if max_length is None and st_config.is_file():
        import json

        max_length = json.loads(st_config.read_text()).get("max_seq_length")
    return HFCaptionTokenizer(AutoTokenizer.from_pretrained(path), max_length, pad_to_max)


def build_dual_encoder(spec: str, text: str | None = None, *, pretrained: bool = True, embed_dim: int = 256,
                       vision_pooling: ImagePooling = "cls", text_pooling: TextPooling = "mean",
                       max_length: int | None = None, **kwargs: Any) -> DualTowerModel:
    """A dual encoder from model specs.

    With `text` unset, `spec` names a model that has both towers: `hf:<CLIP or SigLIP id/dir>` or
    `open_clip:<name>`. With `text` set, `spec` is the image backbone (timm:/hf:/asset:dinov2-small) and `text`
    the text encoder (hf:<id/dir> or asset:all-minilm-l6-v2), joined by new projections of width `embed_dim`.
    """
    from vislora.assets import MODELS, resolve_model_spec
    from vislora.backbones import load_base_model

    if text is None:
        return _whole_model(spec, pretrained, max_length, **kwargs)
    vision = load_base_model(resolve_model_spec(spec), pretrained=pretrained, **kwargs)
    text_spec = resolve_model_spec(text, "text")
    if not text_spec.startswith("hf:"):
        raise ConfigError(f"text encoder spec {text!r} is not understood; use hf:<id or dir> or "
                          f"asset:{next(iter(MODELS['text']))}")
    path = text_spec.partition(":")[2]
    text_model = load_base_model(text_spec, config=_without_dropout(path))
    if getattr(text_model, "pooler", None) is not None:  # unused (mean or token-0 pooling); a checkpoint without it
        text_model.pooler = None                         # would get a random one each load, and a new fingerprint
    return DualEncoder(vision, text_model, hf_tokenizer(path, max_length), embed_dim, vision_pooling, text_pooling)


def _without_dropout(path: str) -> Any:
    """The text tower's config with its own dropout off: the tower is frozen and the adapters carry their own
    dropout, so in training it computes what it computes in evaluation (BERT-style encoders ship with 0.1)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    for name, value in vars(config).items():
        if name.endswith(("dropout", "dropout_prob")) and isinstance(value, float):
            setattr(config, name, 0.0)
    return config


def _whole_model(spec: str, pretrained: bool, max_length: int | None, **kwargs: Any) -> DualTowerModel:
    family, _, name = spec.partition(":")
    if family == "open_clip":
        import open_clip

        model = open_clip.create_model(name, pretrained="openai" if pretrained else None, **kwargs).eval()
        context = getattr(model, "context_length", 77)
        return OpenClipDualEncoder(model, OpenClipCaptionTokenizer(open_clip.get_tokenizer(name), context))
    if family == "hf":
        from vislora.backbones import load_base_model

        model = load_base_model(spec, **kwargs)
        if type(model).__name__ not in ("CLIPModel", "SiglipModel", "Siglip2Model"):
            raise ConfigError(f"{spec} is a {type(model).__name__}, not a CLIP/SigLIP model with both towers; "
                              "give the text encoder too (model.text: asset:all-minilm-l6-v2) to pair it as a "
                              "DualEncoder")
        siglip = type(model).__name__.startswith("Siglip")
        return HFDualEncoder(model, hf_tokenizer(name, max_length, pad_to_max=siglip))
    raise ConfigError(f"model spec {spec!r} has no text tower; use hf:<CLIP/SigLIP>, open_clip:<name>, or set "
                      "model.text to pair an image backbone with a text encoder")
