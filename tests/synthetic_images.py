"""Small image datasets written to disk as real PNG/JPEG files, for data and trainer tests."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

COLORS = [(220, 40, 40), (40, 200, 60), (50, 60, 220)]


def class_image(label: int, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """A noisy image whose dominant colour is the class: learnable by a tiny ViT in a few steps."""
    noise = rng.random((size, size, 3)) * 90
    return Image.fromarray((noise + np.array(COLORS[label]) * 0.6).clip(0, 255).astype(np.uint8))


def image_folder(root: Path, per_class: int = 12, size: int = 32, seed: int = 0) -> Path:
    """root/class0..class2/*.png."""
    rng = np.random.default_rng(seed)
    for label in range(len(COLORS)):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            class_image(label, rng, size).save(folder / f"{i:03d}.png")
    return root


def corrupt_png(path: Path) -> Path:
    """A file named .png that is not a decodable image (a PNG header cut short)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    return path


def csv_manifest(root: Path, rows: list[dict], name: str = "train.csv") -> Path:
    """Write rows (dicts) as a CSV manifest in root; image paths relative to root."""
    path = root / name
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def tiny_train_config(out: Path, train: Path, val: Path | None = None, **sections) -> dict:
    """A TrainConfig mapping for a 2-block 32-px timm ViT; `sections` override whole keys per section."""
    config = {
        "model": {"spec": "timm:vit_tiny_patch16_224", "pretrained": False,
                  "kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}},
        "adapter": {"targets": ["q", "v"], "rank": 4, "alpha": 8},
        "data": {"train": str(train), "image_size": 32, **({"val": str(val)} if val else {})},
        "optim": {"batch_size": 4, "max_steps": 6, "warmup_steps": 1},
        "run": {"output_dir": str(out), "progress": False},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    return config



TAGS = ("red", "green", "blue", "yellow")
TAG_COLORS = {"red": (230, 30, 30), "green": (30, 210, 50), "blue": (40, 50, 230), "yellow": (230, 220, 30)}


def tag_image(tags: tuple[str, ...], rng: np.random.Generator, size: int = 32) -> Image.Image:
    """Gray noise with one quadrant (drawn at random) painted in the colour of each tag (TAGS): multi-label and
    learnable from pooled features in a few steps."""
    pixels = 100 + rng.random((size, size, 3)) * 40
    half = size // 2
    for tag, quadrant in zip(tags, rng.permutation(4), strict=False):
        row, col = divmod(int(quadrant), 2)
        pixels[row * half:(row + 1) * half, col * half:(col + 1) * half] = (
            np.array(TAG_COLORS[tag]) * 0.8 + rng.random((half, half, 3)) * 50)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def tag_manifest(root: Path, n: int = 24, seed: int = 0, name: str = "tags.csv",
                 rare: str | None = None, extra: dict | None = None) -> Path:
    """A CSV multi-label manifest of `n` tag images (1-3 tags each), labels joined by '|'. With `rare`, that tag
    is on 2 images only."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        pool = [t for t in TAGS if t != rare or i < 2]
        count = min(int(rng.integers(1, 4)), len(pool))
        tags = sorted(rng.choice(pool, size=count, replace=False).tolist(), key=TAGS.index)
        if rare is not None and i < 2 and rare not in tags:
            tags = [*tags[:2], rare]
        file = f"{name.split('.')[0]}_{i:03d}.png"
        tag_image(tuple(tags), rng).save(root / file)
        rows.append({"path": file, "label": "|".join(tags), **(extra or {})})
    return csv_manifest(root, rows, name=name)
