"""Few-shot Fashion-MNIST with the offline dual encoder: zero-shot vs linear probe vs CLIP-LoRA on both towers.

The dual encoder is DINOv2 ViT-S/14 (image) + all-MiniLM-L6-v2 (text), joined by 256-d projections. They are
pre-aligned first (towers frozen, projections + temperature fitted with InfoNCE on a pool of Fashion-MNIST
training images with prompt captions; the pool is disjoint from every support set and from the test images).
Then, for each shot count K and seed, on the same K-shot support set and the same test images:

- zero-shot: the pre-aligned model's prompt classifier (templates ensembled), no support images;
- linear probe: multinomial logistic regression (L-BFGS, L2) on frozen DINOv2 features of the support set;
- LoRA: CLIP-LoRA's recipe through `vislora train`'s Trainer (task few_shot): q, k, v in both towers, r=2,
  alpha=1, alpha/sqrt(r), dropout 0.25, AdamW, cosine, text classifier from the prompts (ensembled), batch
  min(32, 10K), iterations = --iterations-per-shot x K (CLIP-LoRA: 500 x K, far too slow on a CPU).

    python benchmarks/bench_fewshot.py                      # 1/4/16 shots x 3 seeds (~15 min on 2 cores)
    python benchmarks/bench_fewshot.py --smoke              # 1/4 shots, 1 seed, small sets (~2 min)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vislora.data import fashion_mnist
from vislora.data.transforms import build_transform, model_input_spec
from vislora.dual_encoder import build_dual_encoder
from vislora.run_config import TrainConfig
from vislora.tasks.clip import sample_shots, text_classifier
from vislora.tasks.prealign import image_features, prealign_projections
from vislora.train.trainer import Trainer

TEMPLATES = ["a photo of a {}.", "a black and white photo of a {}.", "a low resolution photo of a {}.",
             "a photo of the {}, a type of clothing."]
NAMES = {"t-shirt/top": "t-shirt", "ankle boot": "ankle boot", "bag": "handbag"}
PROBE_L2 = 3e-3


def subset(dataset, indices):
    part = copy.copy(dataset)
    part.records = [dataset.records[i] for i in indices]
    return part


def pixels(dataset, transform) -> torch.Tensor:
    return torch.stack([transform(dataset.open_image(i)) for i in range(len(dataset))])  # [n, 3, H, W]


def linear_probe(train_x, train_y, test_x, test_y, classes: int) -> float:
    """Accuracy of an L2-regularised multinomial logistic regression fitted with L-BFGS on features."""
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6) if len(train_x) > 1 else torch.ones(train_x.shape[1])
    x, t = (train_x - mean) / std, (test_x - mean) / std
    weight = torch.zeros(classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, train_y) + PROBE_L2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return ((t @ weight.T + bias).argmax(1) == test_y).float().mean().item()


def lora_config(out: Path, shots: int, seed: int, args: argparse.Namespace) -> TrainConfig:
    return TrainConfig.parse({
        "model": {"spec": "asset:dinov2-small", "text": "asset:all-minilm-l6-v2", "embed_dim": 256},
        "task": {"kind": "few_shot", "shots": shots, "templates": TEMPLATES, "class_names": NAMES},
        "adapter": {"targets": ["q", "k", "v"], "rank": 2, "alpha": 1, "use_rslora": True, "dropout": 0.25,
                    "train_heads": False},
        "data": {"train": "fashion-mnist:train", "image_size": args.image_size},
        "optim": {"batch_size": min(32, 10 * shots), "max_steps": args.iterations_per_shot * shots,
                  "lr_adapter": args.lr, "weight_decay": 0.01},
        "run": {"output_dir": str(out), "seed": seed, "progress": False},
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations-per-shot", type=int, default=25)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--pool", type=int, default=1000, help="pre-alignment images (disjoint from support/test)")
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--smoke", action="store_true", help="1/4 shots, seed 0, 300 pool / 300 test images")
    args = parser.parse_args()
    if args.smoke:
        args.shots, args.seeds, args.pool, args.test_images = [1, 4], [0], 300, 300
    torch.set_num_threads(2)
    start = time.perf_counter()
    base = build_dual_encoder("asset:dinov2-small", "asset:all-minilm-l6-v2", embed_dim=256).eval()
    transform = build_transform(model_input_spec(base.vision, args.image_size), train=False)
    train, test = fashion_mnist("train"), fashion_mnist("test").subset(args.test_images, seed=0)
    pool_part = train.subset(args.pool, seed=1234)
    pool_set = {r.source for r in pool_part.records}
    shot_pool = subset(train, [i for i, r in enumerate(train.records) if r.source not in pool_set])
    names = [NAMES.get(c, c) for c in train.classes]
    result = prealign_projections(base, pixels(pool_part, transform), pool_part.labels(), names, TEMPLATES)
    test_x, test_y = image_features(base, pixels(test, transform)), torch.tensor(test.labels())
    with torch.no_grad():
        classifier = text_classifier(base, names, TEMPLATES)
        zero_shot = ((F.normalize(base.vision_proj(test_x), dim=-1) @ classifier.T).argmax(1) == test_y)
    zero_shot = zero_shot.float().mean().item()
    print(f"setup {time.perf_counter() - start:.0f} s: pre-alignment on {args.pool} images (InfoNCE "
          f"{result.first_loss:.3f} -> {result.last_loss:.3f}), {len(test)} test images at {args.image_size} px, "
          f"zero-shot accuracy {zero_shot:.4f}", flush=True)
    rows = {}
    for shots in args.shots:
        for seed in args.seeds:
            support = subset(shot_pool, sample_shots(shot_pool.labels(), shots, seed))
            tick = time.perf_counter()
            probe = linear_probe(image_features(base, pixels(support, transform)), torch.tensor(support.labels()),
                                 test_x, test_y, len(names))
            probe_s = time.perf_counter() - tick
            with tempfile.TemporaryDirectory() as out:
                tick = time.perf_counter()
                trainer = Trainer(lora_config(Path(out), shots, seed, args), train_data=shot_pool, val_data=test,
                                  base_model=copy.deepcopy(base))
                lora = trainer.fit().final["accuracy"]
                lora_s = time.perf_counter() - tick
            rows.setdefault(shots, []).append((probe, lora, probe_s, lora_s))
            print(f"  {shots:>2}-shot seed {seed}: probe {probe:.4f} ({probe_s:.1f} s)  LoRA {lora:.4f} "
                  f"({lora_s:.1f} s, {args.iterations_per_shot * shots} iterations)", flush=True)
    print_table(rows, zero_shot, args)
    print(f"total wall time {time.perf_counter() - start:.0f} s")


def print_table(rows: dict, zero_shot: float, args: argparse.Namespace) -> None:
    def mean_sd(values):
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0:.4f}"

    print(f"\nFashion-MNIST, {args.test_images} test images, mean ± sd over seeds {args.seeds}")
    print(f"{'shots':>5}  {'zero-shot':>9}  {'linear probe':>15}  {'LoRA (both towers)':>18}  {'LoRA - probe':>12}  "
          f"{'probe s/run':>11}  {'LoRA s/run':>10}")
    for shots, values in rows.items():
        probe, lora, probe_s, lora_s = (list(v) for v in zip(*values, strict=True))
        gain = 100 * (statistics.mean(lora) - statistics.mean(probe))
        print(f"{shots:>5}  {zero_shot:>9.4f}  {mean_sd(probe):>15}  {mean_sd(lora):>18}  {gain:>+10.1f}pt  "
              f"{statistics.mean(probe_s):>11.1f}  {statistics.mean(lora_s):>10.1f}")


if __name__ == "__main__":
    main()
