"""Benchmark vislora's adapter core against PEFT on a timm vision transformer, all figures measured.

1. Train step (forward + cross-entropy + backward + AdamW step) with LoRA on attn.qkv + attn.proj:
   vislora vs PEFT, same config and identical weights (checked by comparing forward outputs first).
2. Inference under torch.inference_mode: the base model, vislora unmerged, vislora merged, and the
   plain model returned by unload(merge=True).

Contenders run interleaved, one repetition each in turn (the order rotates every round), so drift in
machine load hits all of them alike; medians of time.perf_counter intervals are reported.

    python benchmarks/bench_core.py                       # ViT-B/16, batch 8, 2 threads
    python benchmarks/bench_core.py --model vit_tiny_patch16_224 --steps 3 --warmup 1
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
from pathlib import Path

import peft
import timm
import torch
from torch import nn

import vislora
from common import (
    copy_from_peft,
    inference_fn,
    interleaved_medians,
    max_abs_diff,
    print_table,
    randomize_peft,
    train_step_fn,
    trainable,
)

TARGETS = ["attn.qkv", "attn.proj"]
SEED = 0
MAX_ABS_DIFF = 5e-5  # float32 logits of a random-init ViT: matching implementations differ by ~1e-6
TRAIN_AIM = 1.00
MERGED_AIM = 1.02


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vit_base_patch16_224",
                        help="timm model name, built with pretrained=False (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="images per step (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=10,
                        help="timed repetitions per contender; the median is reported (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed repetitions per contender before timing (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=16,
                        help="LoRA rank r; alpha = 2r for both libraries (default: %(default)s)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write all figures to this JSON file")
    args = parser.parse_args(argv)
    for name in ("batch", "threads", "steps", "rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


# ---------------------------------------------------------------- building the contenders
def build_peft(base: nn.Module, rank: int) -> nn.Module:
    """PEFT LoRA on a copy of `base`, with lora_B made non-zero so the adapters change the output."""
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
    return randomize_peft(peft.get_peft_model(copy.deepcopy(base), config), SEED)


def build_vislora(base: nn.Module, rank: int, reference: nn.Module) -> vislora.AdaptedModel:
    """vislora LoRA on a copy of `base`, adapter weights copied from the PEFT model `reference`."""
    model = vislora.inject(copy.deepcopy(base), vislora.AdapterConfig(rank=rank, alpha=2 * rank, targets=TARGETS))
    copy_from_peft(model, reference)
    return model


# ---------------------------------------------------------------- the two benchmarks
def bench_train(base: nn.Module, args: argparse.Namespace, x: torch.Tensor) -> dict[str, object]:
    peft_model = build_peft(base, args.rank)
    vis_model = build_vislora(base, args.rank, peft_model)
    diff = max_abs_diff(vis_model, peft_model, x)
    effect = max_abs_diff(vis_model, base, x)  # shows the check is not comparing two untouched base models
    print(f"forward check vislora vs PEFT (identical adapter weights): max |diff| = {diff:.2e} "
          f"(adapters move the output by up to {effect:.2e} from the base model)")
    if not diff <= MAX_ABS_DIFF:
        sys.exit(f"error: vislora and PEFT outputs differ by {diff:.2e} > {MAX_ABS_DIFF:.0e}; "
                 "the timing would compare different computations, so it is not run")
    n_vis, n_peft = (sum(p.numel() for p in trainable(m)) for m in (vis_model, peft_model))
    print(f"trainable parameters: vislora {n_vis:,}  PEFT {n_peft:,}")
    if n_vis != n_peft:
        sys.exit("error: vislora and PEFT train a different number of parameters; fix the config first")
    labels = torch.randint(0, base.num_classes, (x.shape[0],), generator=torch.Generator().manual_seed(SEED))
    steps = {"train vislora": train_step_fn(vis_model, x, labels),
             "train peft": train_step_fn(peft_model, x, labels)}
    samples = interleaved_medians(steps, args.steps, args.warmup)
    return {"forward_max_abs_diff": diff, "adapter_effect_max_abs": effect, "trainable_params": n_vis,
            "samples_s": samples}


def bench_inference(base: nn.Module, args: argparse.Namespace, x: torch.Tensor) -> dict[str, object]:
    reference = build_peft(base, args.rank)
    unmerged = build_vislora(base, args.rank, reference)
    merged = build_vislora(base, args.rank, reference)
    merged.merge()
    unloaded = build_vislora(base, args.rank, reference).unload(merge=True)
    del reference
    diffs = {"merged": max_abs_diff(merged, unmerged, x), "unloaded": max_abs_diff(unloaded, unmerged, x)}
    print(f"forward check vs vislora unmerged: merged max |diff| = {diffs['merged']:.2e}, "
          f"unloaded max |diff| = {diffs['unloaded']:.2e}")
    if max(diffs.values()) > MAX_ABS_DIFF:
        sys.exit(f"error: merging changed the output by more than {MAX_ABS_DIFF:.0e}: {diffs}")
    samples = interleaved_medians(
        {
            "infer base": inference_fn(base, x),
            "infer vislora unmerged": inference_fn(unmerged, x),
            "infer vislora merged": inference_fn(merged, x),
            "infer unloaded (merged)": inference_fn(unloaded, x),
        },
        args.steps, args.warmup,
    )
    return {"merge_max_abs_diff": diffs, "samples_s": samples}


# ---------------------------------------------------------------- report
def report(train: dict[str, object], infer: dict[str, object]) -> dict[str, dict[str, float]]:
    """Print the table and the headline ratios; return medians (ms), ratios and headline figures."""
    samples = {name: s for part in (train, infer) for name, s in part["samples_s"].items()}
    base_of = {name: "train peft" if name.startswith("train") else "infer base" for name in samples}
    medians = print_table(samples, base_of)
    ratios = {name: medians[name] / medians[base_of[name]] for name in medians}
    headline = {
        "train_vislora_over_peft": ratios["train vislora"],
        "merged_over_base": ratios["infer vislora merged"],
        "unloaded_over_base": ratios["infer unloaded (merged)"],
        "unmerged_over_base": ratios["infer vislora unmerged"],
    }
    # the unloaded model is a plain timm module like the base, so its distance from 1 is timing noise
    print(f"\nunloaded inference / base = {headline['unloaded_over_base']:.3f} (plain module: the noise)")
    print(f"train step vislora/peft = {headline['train_vislora_over_peft']:.2f} (aim <= {TRAIN_AIM:.2f})")
    print(f"merged inference / base = {headline['merged_over_base']:.3f} (aim <= {MERGED_AIM:.2f})")
    return {"median_ms": {k: v * 1e3 for k, v in medians.items()}, "ratios": ratios, "headline": headline}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    base = timm.create_model(args.model, pretrained=False)
    input_size = base.pretrained_cfg.get("input_size", (3, 224, 224))
    x = torch.randn(args.batch, *input_size, generator=torch.Generator().manual_seed(SEED))
    print(f"{args.model}  batch {args.batch}  threads {torch.get_num_threads()}  rank {args.rank}  "
          f"steps {args.steps} (+{args.warmup} warm-up)  torch {torch.__version__}  peft {peft.__version__}  "
          f"timm {timm.__version__}  vislora {vislora.__version__}")
    train = bench_train(base, args, x)
    infer = bench_inference(base, args, x)
    figures = report(train, infer)
    if args.json:
        record = {
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "versions": {"torch": torch.__version__, "peft": peft.__version__, "timm": timm.__version__,
                         "vislora": vislora.__version__, "python": platform.python_version()},
            "train": train, "inference": infer, **figures,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
