"""Tiny dual encoders for the VLM tests: the real architectures of the offline pair (HF DINOv2 + BERT), random init,
and a word-level tokenizer built in memory, so nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing

from synthetic_images import class_image
from vislora.dual_encoder import DualEncoder
from vislora.tokenize import HFCaptionTokenizer

WORDS = ("a", "photo", "of", "the", "picture", "red", "green", "blue", "una", "foto", "de", "rojo", "verde", "azul",
         "long", "caption", "that", "goes", "on", "and", ".", "class0", "class1", "class2")
COLOR_NAMES = {"class0": "red", "class1": "green", "class2": "blue"}


def word_tokenizer(max_length: int = 16) -> transformers.PreTrainedTokenizerFast:
    """A word-level BERT-style tokenizer ([CLS] words [SEP]) over WORDS."""
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                cls_token="[CLS]", sep_token="[SEP]", model_max_length=max_length)


def tiny_dinov2() -> transformers.Dinov2Model:
    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                       image_size=32, patch_size=8)
    return transformers.Dinov2Model(config).eval()


def tiny_bert(vocab_size: int) -> transformers.BertModel:
    torch.manual_seed(1)
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def tiny_dual(max_length: int = 16, embed_dim: int = 16) -> DualEncoder:
    """DINOv2-style image tower + BERT text tower (2 blocks each, width 32), projections to `embed_dim`."""
    tokenizer = word_tokenizer(max_length)
    model = DualEncoder(tiny_dinov2(), tiny_bert(len(tokenizer)), HFCaptionTokenizer(tokenizer), embed_dim)
    torch.manual_seed(2)
    for proj in (model.vision_proj, model.text_proj):
        torch.nn.init.normal_(proj.weight, std=0.2)
    return model.eval()


def caption_manifest(root: Path, per_class: int = 6, missing: int = 0, long_captions: int = 0) -> Path:
    """captions.jsonl + PNGs: '<colour> ...' captions; `missing` rows point at files that do not exist."""
    import numpy as np

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, colour in enumerate(COLOR_NAMES.values()):
        for i in range(per_class):
            name = f"{colour}-{i}.png"
            class_image(label, rng).save(root / name)
            rows.append({"path": name, "caption": f"a photo of a {colour} picture", "label": f"class{label}"})
    for i in range(long_captions):
        rows[i]["caption"] = "a long caption that goes on " + "and on " * 12 + rows[i]["caption"]
    rows += [{"path": f"gone-{i}.png", "caption": "a photo of a red picture", "label": "class0"}
             for i in range(missing)]
    path = root / "captions.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def save_towers(root: Path, max_length: int = 16) -> tuple[Path, Path]:
    """The tiny towers as Hugging Face directories (hf:<dir> specs): vision/ and text/ with its tokenizer."""
    tokenizer = word_tokenizer(max_length)
    tiny_dinov2().save_pretrained(root / "vision")
    tiny_bert(len(tokenizer)).save_pretrained(root / "text")
    tokenizer.save_pretrained(root / "text")
    return root / "vision", root / "text"


def dual_train_config(out: Path, towers: tuple[Path, Path], train: Path, val: Path | None = None,
                      **sections: dict) -> dict:
    """A contrastive TrainConfig mapping for the tiny towers on synthetic colour images; `sections` override keys."""
    config = {
        "model": {"spec": f"hf:{towers[0]}", "text": f"hf:{towers[1]}", "embed_dim": 16},
        "task": {"kind": "contrastive", "class_names": COLOR_NAMES, "templates": ["a photo of a {}", "a {} picture"]},
        "adapter": {"vision_targets": ["q", "v"], "text_targets": ["q", "v"], "rank": 2, "alpha": 4},
        "data": {"train": str(train), "image_size": 32, **({"val": str(val)} if val else {})},
        "optim": {"batch_size": 6, "max_steps": 6, "lr_adapter": 1e-2, "lr_head": 1e-2},
        "run": {"output_dir": str(out), "progress": False},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    return config
