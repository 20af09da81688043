"""Adapter methods on the demo's real setup, equal step budget: held-out accuracy and train-step time.

DINOv2 ViT-S/14 (offline asset) on Fashion-MNIST at the demo's size (56 px), as `make demo`: a frozen-backbone
linear probe is fitted once, then every method trains from the probe's head (LP-FT) for the same number of steps
on the same images and is scored on the same test images:

  lora         LoRA r8 on q, v
  dora         DoRA r8 on q, v
  adalora      AdaLoRA on q, v, rank 12 pruned to 8 per pair on the cubic budget
  molora       4 LoRA experts of rank 4 on q, v (DINOv2 has separate q/k/v projections), top-2 per token
  progressive  LoRA on q, v, rank 4 for the first half of the steps, grown to 8 for the second

A method that does not beat the linear probe does not learn; the table says so.

    python benchmarks/bench_variants.py                          # every method, the demo's budget
    python benchmarks/bench_variants.py --methods lora adalora --steps 40 --train-images 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vislora.parameters import parameter_report
from vislora.run_config import TrainConfig
from vislora.train.demo import Probe, demo_config, linear_probe
from vislora.train.demo_budget import DEMO_DEFAULTS
from vislora.train.schedule import parameter_groups
from vislora.train.trainer import Trainer

Q_V = ["q", "v"]
METHODS: dict[str, dict[str, Any]] = {
    "lora": {"targets": Q_V, "rank": 8, "alpha": 16},
    "dora": {"targets": Q_V, "rank": 8, "alpha": 16, "method": "dora"},
    "adalora": {"targets": Q_V, "rank": 12, "alpha": 24, "method": "adalora",
                "adalora": {"target_rank": 8, "delta_t": 5}},
    "molora": {"targets": Q_V, "rank": 4, "alpha": 8, "method": "molora", "molora": {"experts": 4, "top_k": 2}},
    "progressive": {"targets": Q_V, "rank": 4, "alpha": 8},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--steps", type=int, default=DEMO_DEFAULTS["steps"], help="optimizer steps per method")
    parser.add_argument("--batch", type=int, default=DEMO_DEFAULTS["batch_size"])
    parser.add_argument("--train-images", type=int, default=DEMO_DEFAULTS["train_images"])
    parser.add_argument("--test-images", type=int, default=DEMO_DEFAULTS["test_images"])
    parser.add_argument("--image-size", type=int, default=DEMO_DEFAULTS["image_size"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_variants"), help="run directories go here")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.steps < 4:
        parser.error("--steps must be >= 4 (AdaLoRA and the progressive schedule need room)")
    return args


def method_config(args: argparse.Namespace, method: str) -> TrainConfig:
    """The demo's run with this method's adapter; the progressive one grows 4 -> 8 halfway."""
    data = demo_config(args.out / method, args.steps, args.batch, args.train_images, args.test_images,
                       args.image_size, args.seed).model_dump(mode="json")
    data["adapter"] = {**METHODS[method], "modules_to_save": data["adapter"].get("modules_to_save") or []}
    data["run"].update({"monitor_gradients": False, "eval_every": 0, "save_every": 0, "log_every": 1})
    if method == "progressive":
        half = args.steps // 2
        data["stages"] = [{"steps": half, "rank": 4}, {"steps": args.steps - half, "rank": 8}]
        data["optim"].pop("max_steps")  # the stages' sum
    return TrainConfig.parse(data)


def train_method(args: argparse.Namespace, method: str, probe: Probe) -> dict[str, Any]:
    trainer = Trainer(method_config(args, method))
    _, head = parameter_groups(trainer.adapted)
    with torch.no_grad():  # LP-FT, as the demo: every method starts from the same probe head
        head[0].copy_(probe.weight)
        head[1].copy_(probe.bias)
    start = time.perf_counter()
    result = trainer.fit()
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    step_seconds = [args.batch / r["images_per_s"] for r in rows if r.get("split") == "train" and r["images_per_s"]]
    warm = step_seconds[len(step_seconds) // 4:]  # the first steps pay one-off allocations (and LoRA runs first)
    return {"method": method, "accuracy": result.final["accuracy"],
            "trainable": parameter_report(trainer.adapted).trainable,  # after growth, for the progressive run
            "median_step_ms": 1e3 * statistics.median(warm), "seconds": time.perf_counter() - start,
            "ranks": sum(result.adapter_ranks.values())}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"DINOv2-S + Fashion-MNIST at {args.image_size} px: {args.train_images} train / {args.test_images} test "
          f"images, {args.steps} steps x {args.batch}, threads {torch.get_num_threads()}, seed {args.seed}")
    probe_trainer = Trainer(method_config(args, "lora"))
    start = time.perf_counter()
    probe = linear_probe(probe_trainer, probe_trainer.train_data, probe_trainer.val_data)
    print(f"linear probe: {probe.accuracy:.4f} ({time.perf_counter() - start:.0f} s)")
    rows = []
    for method in args.methods:
        rows.append(train_method(args, method, probe))
        print(f"  {method}: accuracy {rows[-1]['accuracy']:.4f} in {rows[-1]['seconds']:.0f} s", flush=True)
    lora_ms = next((r["median_step_ms"] for r in rows if r["method"] == "lora"), None)
    print(f"\n{'method':<12} {'trainable':>10} {'ranks':>6} {'accuracy':>9} {'vs probe':>9} {'step_ms':>8} "
          f"{'vs lora':>8}  learns")
    for r in rows:
        ratio = f"{r['median_step_ms'] / lora_ms:8.2f}" if lora_ms else f"{'':>8}"
        learns = "yes" if r["accuracy"] > probe.accuracy else "NO (not above the probe)"
        print(f"{r['method']:<12} {r['trainable']:>10,} {r['ranks']:>6} {r['accuracy']:>9.4f} "
              f"{100 * (r['accuracy'] - probe.accuracy):>+8.1f}p {r['median_step_ms']:>8.0f} {ratio}  {learns}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                         "probe_accuracy": probe.accuracy, "methods": rows}, indent=2) + "\n")
    if any(r["accuracy"] <= probe.accuracy for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
