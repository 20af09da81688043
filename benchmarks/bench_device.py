"""Benchmark serving on a device and dtype: routed forwards over many adapters and images/s through the Engine,
for float32 and bfloat16, on whatever device `--device` names (auto: CUDA, else MPS, else the CPU).

For each dtype one Engine is built (`build_engine`, the base a randomly initialised timm ViT with the same seed,
`--adapters` LoRA adapters with seeded random weights loaded from disk), and measured:
  1. Routed forward: one batch of `--batch` images in which the samples use all `--adapters` adapters (round
     robin), against the same batch routed to one adapter; median seconds per forward, interleaved, and their ratio.
     Before timing, each mixed-batch sample must equal that sample routed alone with its adapter (float32: 1e-4).
  2. Served images/s: `--requests` preprocessed images submitted at once to the Engine (micro-batched up to
     `--max-batch-size`), naming all adapters round robin, and naming one; median over `--rounds`.
bfloat16 is also compared with float32 on the same batch (max |logits difference|). GPU timings wait for the
device (torch.cuda.synchronize) before the clock is read.

    python benchmarks/bench_device.py                                         # auto device, ViT-S/16 at 112 px
    python benchmarks/bench_device.py --device cpu --model vit_tiny_patch16_224 --image-size 64 --batch 64 \\
        --requests 128 --steps 3 --rounds 2 --threads 1                       # small CPU run
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from common import interleaved_medians, random_adapters

SEED = 0
TARGETS = ["attn.qkv", "attn.proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (%(default)s)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="(%(default)s)")
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm model, random init (%(default)s)")
    parser.add_argument("--image-size", type=int, default=112, help="input side in pixels (%(default)s)")
    parser.add_argument("--classes", type=int, default=10, help="head width (%(default)s)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank, alpha = 2 * rank (%(default)s)")
    parser.add_argument("--adapters", type=int, default=64, help="distinct adapters in the mixed batch (%(default)s)")
    parser.add_argument("--batch", type=int, default=64, help="routed forward batch (%(default)s)")
    parser.add_argument("--steps", type=int, default=5, help="timed forwards per contender (%(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards per contender (%(default)s)")
    parser.add_argument("--requests", type=int, default=256, help="requests per served round (%(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="served rounds per contender (%(default)s)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="engine batching (%(default)s)")
    parser.add_argument("--threads", type=int, help="CPU only: torch threads (default: torch's); 1 on a shared "
                        "machine, where threads waiting for busy cores make every parallel op far slower")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write all figures to this JSON file")
    return parser.parse_args(argv)


def make_adapters(args: argparse.Namespace, folder: Path) -> list[Path]:
    """--adapters adapter directories with seeded random weights (pairs and head copy)."""
    return random_adapters(args, folder, args.adapters, TARGETS, SEED)


def build(args: argparse.Namespace, dirs: list[Path], dtype: str):  # -> Engine
    from vislora.serve import ServeConfig, build_engine

    torch.manual_seed(SEED)  # the same random base weights for every dtype
    return build_engine(ServeConfig.parse({
        "base": {"spec": f"timm:{args.model}", "pretrained": False, "num_classes": args.classes,
                 "image_size": args.image_size},
        "adapters": {f"a{i:03d}": str(d) for i, d in enumerate(dirs)},
        "batching": {"max_batch_size": args.max_batch_size, "max_wait_ms": 2.0, "max_queue": 4 * args.requests,
                     "threads": args.threads},
        "device": args.device, "dtype": dtype}))


def png(size: int) -> bytes:
    gen = torch.Generator().manual_seed(SEED)
    pixels = (torch.rand(size, size, 3, generator=gen) * 255).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def routed_forward(engine, pixels: torch.Tensor, args: argparse.Namespace) -> tuple[dict, torch.Tensor]:
    """Median seconds of a mixed-adapter forward and a one-adapter forward of the same batch, and the mixed logits,
    on the model of a closed engine (on its device, in its dtype, its adapters loaded)."""
    place = engine.placement
    x = place.batch(list(pixels))
    mixed = [f"a{i % args.adapters:03d}" for i in range(len(pixels))]
    single = ["a000"] * len(pixels)

    def forward(names: list[str]) -> torch.Tensor:
        with torch.inference_mode():
            out = engine.model(x, adapters=names)
        place.synchronize()
        return out

    logits = forward(mixed).float().cpu()
    for i in range(min(4, len(pixels))):  # the mixed batch computes each sample with its own adapter
        with torch.inference_mode():
            alone = engine.model(x[i:i + 1], adapters=[mixed[i]]).float().cpu()
        tolerance = 1e-4 if place.dtype == torch.float32 else 0.1
        difference = (alone[0] - logits[i]).abs().max().item()
        if difference > tolerance:
            raise SystemExit(f"sample {i}: mixed batch differs from the sample alone by {difference:.3g}")
    samples = interleaved_medians({"mixed": lambda: forward(mixed), "single": lambda: forward(single)},
                                  args.steps, args.warmup)
    seconds = {name: statistics.median(values) for name, values in samples.items()}
    return {"mixed_s": seconds["mixed"], "single_s": seconds["single"],
            "mixed_over_single": seconds["mixed"] / seconds["single"]}, logits


def served(engine, pixels: torch.Tensor, args: argparse.Namespace) -> dict:
    """Median images/s of `--requests` submitted at once, naming every adapter round robin, and naming one."""
    rates: dict[str, list[float]] = {"all_adapters": [], "one_adapter": []}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for contender in (rates if round_ % 2 else reversed(list(rates))):
            names = [f"a{i % args.adapters:03d}" if contender == "all_adapters" else "a000"
                     for i in range(args.requests)]
            start = time.perf_counter()
            futures = [engine.submit(pixels[i % len(pixels)], name) for i, name in enumerate(names)]
            for future in futures:
                future.result()
            if round_:
                rates[contender].append(args.requests / (time.perf_counter() - start))
    return {f"{name}_images_per_s": statistics.median(values) for name, values in rates.items()}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from vislora.devices import Placement

    placement = Placement.resolve(args.device, "float32")
    figures: dict = {"device": placement.describe().split()[0], "model": args.model, "image_size": args.image_size,
                     "adapters": args.adapters, "batch": args.batch, "torch": torch.__version__,
                     "machine": platform.processor() or platform.machine(), "dtypes": {}}
    if args.threads and placement.is_cpu:
        torch.set_num_threads(args.threads)
        figures["threads"] = args.threads
    if placement.is_cuda:
        figures["gpu"] = torch.cuda.get_device_name(placement.device)
    logits = {}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_adapters(args, Path(tmp))
        for dtype in args.dtypes:
            with build(args, dirs, dtype) as engine:
                one = engine.preprocess(png(args.image_size))
                gen = torch.Generator().manual_seed(SEED)
                pixels = one + 0.1 * torch.randn((args.batch, *one.shape), generator=gen)  # distinct images
                rates = served(engine, pixels, args)
            # after close: the batch worker's OpenMP team is gone and cannot compete with this thread's (CPU)
            routed, logits[dtype] = routed_forward(engine, pixels, args)
            figures["dtypes"][dtype] = {**routed, **rates}
    if "float32" in logits:
        for dtype, values in logits.items():
            figures["dtypes"][dtype]["max_abs_diff_vs_float32"] = (values - logits["float32"]).abs().max().item()
    report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


def report(figures: dict) -> None:
    threads = f", {figures['threads']} threads" if "threads" in figures else ""
    print(f"{figures['model']} at {figures['image_size']} px on {figures.get('gpu', figures['device'])}{threads} "
          f"(torch {figures['torch']}); routed batch {figures['batch']} over {figures['adapters']} adapters")
    print(f"{'dtype':10} {'mixed ms':>9} {'1-adapter ms':>13} {'ratio':>6} {'img/s all':>10} {'img/s one':>10} "
          f"{'|diff| vs fp32':>15}")
    for dtype, f in figures["dtypes"].items():
        print(f"{dtype:10} {1e3 * f['mixed_s']:9.1f} {1e3 * f['single_s']:13.1f} {f['mixed_over_single']:6.2f} "
              f"{f['all_adapters_images_per_s']:10.1f} {f['one_adapter_images_per_s']:10.1f} "
              f"{f.get('max_abs_diff_vs_float32', float('nan')):15.3g}")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
