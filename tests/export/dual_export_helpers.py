"""Tiny trained dual-encoder runs for the export and report tests, built once per session from the VLM tests'
factories (tests/vlm/dual_fixtures.py): the offline pair's real architectures (HF DINOv2 + BERT) at width 32, a timm
image tower, and a tiny Hugging Face CLIP, trained a few steps on synthetic colour images with captions."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vlm"))

from dual_fixtures import caption_manifest, dual_train_config, save_towers, word_tokenizer
from export_helpers import session_root

from conftest import tiny_hf_clip
from vislora.run_config import TrainConfig
from vislora.train.trainer import Trainer

TIMM_TOWER = {"spec": "timm:vit_tiny_patch16_224", "pretrained": False,
              "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}}


@functools.cache
def towers() -> tuple[Path, Path]:
    return save_towers(session_root() / "towers")


@functools.cache
def captions() -> dict[str, Path]:
    """Caption manifests (labelled too): train 6 per class, val 4 per class (other images)."""
    root = session_root() / "captions"
    return {"train": caption_manifest(root / "train", per_class=6), "val": caption_manifest(root / "val", per_class=4)}


@functools.cache
def clip_dir() -> Path:
    """A tiny random Hugging Face CLIPModel with a word-level tokenizer, as a hf:<dir> folder."""
    folder = session_root() / "tiny-clip"
    tiny_hf_clip().save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def train_dual(name: str, **sections: dict) -> Path:
    """Train a tiny contrastive run (overridden by `sections`) on the caption manifests; its adapter folder."""
    data = captions()
    config = dual_train_config(session_root() / "dual-runs" / name, towers(), data["train"], data["val"],
                               **{"optim": {"batch_size": 6, "max_steps": 4}, **sections})
    torch.manual_seed(0)
    return Trainer(TrainConfig.parse(config)).fit().adapter_dir


@functools.cache
def pair_run() -> Path:
    """Contrastive: HF DINOv2-style image tower + BERT text tower + trained projections and logit scale."""
    return train_dual("pair")


@functools.cache
def timm_few_shot_run() -> Path:
    """Few-shot (CLIP-LoRA style, projections frozen) over a random timm image tower + BERT."""
    return train_dual("timm-few-shot", model=TIMM_TOWER, task={"kind": "few_shot", "shots": 2},
                      adapter={"vision_targets": ["qkv"], "text_targets": ["query", "value"], "train_heads": False})


@functools.cache
def clip_run() -> Path:
    """Contrastive on a Hugging Face CLIPModel (both towers and the logit scale from the model)."""
    return train_dual("clip", model={"spec": f"hf:{clip_dir()}", "text": None})
