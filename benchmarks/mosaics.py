"""Fashion-MNIST mosaics: real offline multi-label data for the retail benchmarks.

Each image is a `grid` x `grid` mosaic of 28 px cells holding 1 to grid² Fashion-MNIST items (the other cells
black, as the items' own background). Training mosaics draw their items from Fashion-MNIST's training split,
validation and test mosaics from its test split (validation and test use disjoint halves of it), so no item is
seen twice across splits. Labels are the item classes present plus coarse attributes derived from them:

- footwear: a sandal, sneaker or ankle boot is present;
- upper body: a t-shirt/top, pullover, coat or shirt is present;
- full outfit: footwear plus a dress, or footwear plus an upper-body item plus a trouser.

The `rare` classes are kept to at most `rare_share` of the training mosaics (2% by default), as rare
attributes are in a real catalogue; validation and test mosaics draw every class alike, so the rare ones can be
scored. `write_split` saves the mosaics as PNG files with a JSONL manifest (`{"path", "label": [...]}`), the
format `task.kind: multilabel` reads; with `scale` each mosaic is enlarged (bicubic) to `scale` times its side, as
high-resolution pictures of the same items (4x4 mosaics at scale 4: 448 px canvases of 112 px cells).

    python benchmarks/mosaics.py OUT --train 2000 --val 500 --test 1000   # writes OUT/{train,val,test}.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from vislora.assets import FASHION_MNIST_CLASSES, fashion_mnist_dir, read_fashion_mnist

FOOTWEAR = ("sandal", "sneaker", "ankle boot")
UPPER_BODY = ("t-shirt/top", "pullover", "coat", "shirt")
COARSE = ("footwear", "upper body", "full outfit")
ATTRIBUTES = (*FASHION_MNIST_CLASSES, *COARSE)
RARE = ("shirt", "sandal", "bag")
CELL = 28


def coarse_labels(classes: set[str]) -> list[str]:
    """The coarse attributes that a set of item classes implies."""
    footwear = bool(classes & set(FOOTWEAR))
    upper = bool(classes & set(UPPER_BODY))
    outfit = footwear and ("dress" in classes or (upper and "trouser" in classes))
    return [name for name, present in zip(COARSE, (footwear, upper, outfit), strict=True) if present]


def mosaics(images: np.ndarray, labels: np.ndarray, count: int, *, grid: int = 2, rare: tuple[str, ...] = (),
            rare_share: float = 0.02, max_items: int | None = None, coarse: bool = True, seed: int = 0
            ) -> tuple[np.ndarray, list[list[str]]]:
    """`count` mosaics [count, grid*28, grid*28] (uint8) from the items (`images` [N, 28, 28], `labels` [N]), and
    each mosaic's labels (classes present, then, with `coarse`, the coarse attributes). Each holds 1 to `max_items`
    (default grid²) items, each item used at most once. Each `rare` class appears in exactly
    floor(rare_share * count) mosaics, one item each; the other items never are rare."""
    rng = np.random.default_rng(seed)
    names = np.array(FASHION_MNIST_CLASSES)[labels]
    common_pool = list(rng.permutation(np.flatnonzero(~np.isin(names, rare))))
    rare_pools = {name: list(rng.permutation(np.flatnonzero(names == name))) for name in rare}
    sizes = rng.integers(1, (max_items or grid * grid) + 1, size=count)
    if sum(sizes) > len(labels):
        raise ValueError(f"{count} mosaics need up to {sum(sizes)} items but the split has {len(labels)}")
    rare_slots = {name: set(rng.choice(count, size=int(rare_share * count), replace=False).tolist())
                  for name in rare}
    out = np.zeros((count, grid * CELL, grid * CELL), dtype=np.uint8)
    all_labels = []
    for i, size in enumerate(sizes):
        items = [rare_pools[name].pop() for name in rare if i in rare_slots[name]][:size]
        items += [common_pool.pop() for _ in range(size - len(items))]
        cells = rng.choice(grid * grid, size=len(items), replace=False)
        for item, cell in zip(items, cells, strict=True):
            row, col = divmod(int(cell), grid)
            out[i, row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL] = images[item]
        present = {str(names[item]) for item in items}
        all_labels.append([c for c in FASHION_MNIST_CLASSES if c in present]
                          + (coarse_labels(present) if coarse else []))
    return out, all_labels


def write_split(folder: Path, split: str, pictures: np.ndarray, labels: list[list[str]], scale: int = 1) -> Path:
    """PNG files under folder/split/ (each side times `scale`, bicubic) and the manifest folder/split.jsonl; returns
    the manifest's path."""
    (folder / split).mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (picture, names) in enumerate(zip(pictures, labels, strict=True)):
        relative = f"{split}/{i:05d}.png"
        image = Image.fromarray(picture)
        if scale != 1:
            image = image.resize((image.width * scale, image.height * scale), Image.Resampling.BICUBIC)
        image.save(folder / relative)
        lines.append(json.dumps({"path": relative, "label": names}))
    manifest = folder / f"{split}.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def make_mosaics(folder: str | Path, train: int = 2000, val: int = 500, test: int = 1000, grid: int = 2,
                 rare: tuple[str, ...] = RARE, rare_share: float = 0.02, seed: int = 0, coarse: bool = True,
                 scale: int = 1) -> dict[str, Path]:
    """Write the three splits (see the module text; `coarse` and `scale` as in `mosaics` and `write_split`) and
    return their manifests by split name."""
    folder = Path(folder)
    train_x, train_y = read_fashion_mnist("train", fashion_mnist_dir())
    test_x, test_y = read_fashion_mnist("test", fashion_mnist_dir())
    half = len(test_y) // 2
    splits = {
        "train": mosaics(train_x, train_y, train, grid=grid, rare=rare, rare_share=rare_share, coarse=coarse,
                         seed=seed),
        "val": mosaics(test_x[:half], test_y[:half], val, grid=grid, coarse=coarse, seed=seed + 1),
        "test": mosaics(test_x[half:], test_y[half:], test, grid=grid, coarse=coarse, seed=seed + 2),
    }
    return {name: write_split(folder, name, *split, scale=scale) for name, split in splits.items()}


def positives(labels: list[list[str]]) -> Counter:
    """How many mosaics carry each attribute."""
    return Counter(name for names in labels for name in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=500)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--grid", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    manifests = make_mosaics(args.out, args.train, args.val, args.test, args.grid, seed=args.seed)
    for split, manifest in manifests.items():
        rows = [json.loads(line)["label"] for line in manifest.read_text().splitlines()]
        counts = positives(rows)
        shares = ", ".join(f"{name} {counts[name] / len(rows):.1%}" for name in ATTRIBUTES)
        print(f"{split}: {len(rows)} mosaics -> {manifest}\n  positives: {shares}")


if __name__ == "__main__":
    main()
