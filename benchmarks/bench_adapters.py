"""Benchmark routing, DoRA and memory against PEFT on a timm vision transformer, all figures measured in one run.

1. Train step (forward + cross-entropy + backward + AdamW) with LoRA and with DoRA on attn.qkv + attn.proj:
   vislora vs PEFT, identical adapter weights (forward outputs compared before anything is timed), and the
   floor no adapter can go below: forward + backward through the frozen model.
2. Per-sample routing inference: a batch in which the samples use 8 (or 64) different adapters, against
   the same batch with one adapter active; PEFT's `adapter_names` mixed batch beside it.
3. Peak resident memory (RSS) of a process that runs LoRA training steps (plain, and with timm's gradient
   checkpointing) against one that fine-tunes every weight, each in a fresh subprocess so none sees another's
   allocations. The peak is that of the steps: the kernel's high-water mark is reset just before them.

Contenders run interleaved, one repetition each in turn (the order rotates every round); medians are reported.

    python benchmarks/bench_adapters.py                      # ViT-B/16, train batch 8, routing batch 64
    python benchmarks/bench_adapters.py --model vit_tiny_patch16_224 --steps 2 --warmup 1 --adapters 4
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
from collections.abc import Callable
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
MEMORY_MODES = ("lora", "lora-checkpointing", "full")
SEED = 0
MAX_ABS_DIFF = 5e-5
AIMS = {"lora_train_over_peft": 0.90, "dora_over_lora": 1.15, "routing_over_single": 1.10, "memory_lora_over_full": 0.5}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224",
                        help="timm model name, built with pretrained=False (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="images per train step (default: %(default)s)")
    parser.add_argument("--routing-batch", type=int, default=64,
                        help="images per routed inference call (default: %(default)s)")
    parser.add_argument("--adapters", type=int, nargs="+", default=[8, 64],
                        help="numbers of distinct adapters in one routed batch (default: 8 64)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=5, help="timed repetitions per contender (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank; alpha = 2 * rank (default: %(default)s)")
    parser.add_argument("--parts", default="train,routing,memory",
                        help="comma-separated subset of train,routing,memory (default: %(default)s)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write all figures to this JSON file")
    parser.add_argument("--memory-probe", choices=MEMORY_MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("batch", "routing_batch", "threads", "steps", "rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(n < 1 or n > args.routing_batch for n in args.adapters):
        parser.error(f"--adapters must lie in 1..--routing-batch ({args.routing_batch}), got {args.adapters}")
    unknown = set(args.parts.split(",")) - {"train", "routing", "memory"}
    if unknown:
        parser.error(f"--parts has unknown entries {sorted(unknown)}")
    return args


def images(args: argparse.Namespace, base: nn.Module, n: int) -> torch.Tensor:
    size = base.pretrained_cfg.get("input_size", (3, 224, 224))
    return torch.randn(n, *size, generator=torch.Generator().manual_seed(SEED))


# ---------------------------------------------------------------- 1. train steps
def bench_train(base: nn.Module, args: argparse.Namespace) -> dict[str, object]:
    x = images(args, base, args.batch)
    labels = torch.randint(0, base.num_classes, (args.batch,), generator=torch.Generator().manual_seed(SEED))
    steps, checks = {}, {}
    for method in ("lora", "dora"):
        reference = randomize_peft(peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, use_dora=method == "dora")), SEED)
        ours = vislora.inject(copy.deepcopy(base), vislora.AdapterConfig(
            rank=args.rank, alpha=2 * args.rank, targets=TARGETS, method=method))
        copy_from_peft(ours, reference)
        diff = max_abs_diff(ours, reference, x)
        print(f"{method}: forward vislora vs PEFT, identical weights: max |diff| = {diff:.2e}")
        if not diff <= MAX_ABS_DIFF:
            sys.exit(f"error: {method} outputs differ by {diff:.2e}; the timing would compare different work")
        if sum(p.numel() for p in trainable(ours)) != sum(p.numel() for p in trainable(reference)):
            sys.exit(f"error: {method}: vislora and PEFT train a different number of parameters")
        checks[method] = diff
        steps[f"train {method} vislora"] = train_step_fn(ours, x, labels)
        steps[f"train {method} peft"] = train_step_fn(reference, x, labels)
    steps["train frozen floor"] = frozen_floor_step(copy.deepcopy(base), x, labels)
    return {"max_abs_diff": checks, "samples_s": interleaved_medians(steps, args.steps, args.warmup)}


def frozen_floor_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> Callable[[], float]:
    """What any adapter step costs at least: forward and backward through every block of the frozen model
    (gradients flow from the loss back to the patch embedding's output; no adapter, no optimizer)."""
    model.requires_grad_(False).train()
    model.patch_embed.register_forward_hook(lambda _module, _inputs, out: out.detach().requires_grad_())
    loss_fn = nn.CrossEntropyLoss()

    def step() -> float:
        loss = loss_fn(model(x), labels)
        loss.backward()
        return loss.item()

    return step


# ---------------------------------------------------------------- 2. routing
def bench_routing(base: nn.Module, args: argparse.Namespace) -> dict[str, object]:
    n_adapters = max(args.adapters)
    x = images(args, base, args.routing_batch)
    config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS)
    reference = peft.get_peft_model(copy.deepcopy(base), config, adapter_name="a0")
    for i in range(1, n_adapters):
        reference.add_adapter(f"a{i}", config)
    randomize_peft(reference, SEED)
    ours = vislora.inject(copy.deepcopy(base), vislora.AdapterConfig(rank=args.rank, alpha=2 * args.rank,
                                                                     targets=TARGETS), name="a0")
    for i in range(1, n_adapters):
        ours.add_adapter(f"a{i}", ours.configs["a0"])
    for i in range(n_adapters):
        copy_from_peft(ours, reference, f"a{i}", f"a{i}")
    ours.set_active("a0")
    reference.set_adapter("a0")
    contenders = {"single adapter vislora": inference_fn(ours, x), "single adapter peft": inference_fn(reference, x)}
    checks = {}
    for k in args.adapters:
        names = [f"a{i % k}" for i in range(args.routing_batch)]
        checks[k] = _routed_diff(ours, reference, x, names)
        print(f"{k} adapters: routed vislora vs PEFT adapter_names: max |diff| = {checks[k]:.2e}")
        if not checks[k] <= MAX_ABS_DIFF:
            sys.exit(f"error: routed outputs differ from PEFT's by {checks[k]:.2e}")
        contenders[f"{k} adapters routed vislora"] = inference_fn(ours, x, adapters=names)
        contenders[f"{k} adapters routed peft"] = inference_fn(reference, x, adapter_names=names)
    return {"max_abs_diff": checks, "samples_s": interleaved_medians(contenders, args.steps, args.warmup)}


def _routed_diff(ours: vislora.AdaptedModel, reference: nn.Module, x: torch.Tensor, names: list[str]) -> float:
    ours.eval()
    reference.eval()
    with torch.inference_mode():
        return (ours(x, adapters=names) - reference(x, adapter_names=names)).abs().max().item()


# ---------------------------------------------------------------- 3. memory
def memory_probe(args: argparse.Namespace) -> None:
    """Run in a fresh subprocess: build the model, take training steps, print RSS figures as JSON.

    The kernel's high-water mark is reset just before the steps (/proc/self/clear_refs), so the peak is that of
    the training steps themselves (model, gradients, optimizer state, activations), not of the imports.
    """
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    base = timm.create_model(args.model, pretrained=False)
    if args.memory_probe == "full":
        model = base.requires_grad_(True)
    else:
        model = vislora.inject(base, vislora.AdapterConfig(rank=args.rank, alpha=2 * args.rank, targets=TARGETS))
        base.set_grad_checkpointing(args.memory_probe == "lora-checkpointing")
    x = images(args, base, args.batch)
    labels = torch.zeros(args.batch, dtype=torch.long)
    step = train_step_fn(model, x, labels)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_mib("VmRSS")
    for _ in range(3):
        step()
    print(json.dumps({"mode": args.memory_probe, "rss_before_steps_mib": before, "peak_rss_mib": _status_mib("VmHWM"),
                      "trainable": sum(p.numel() for p in trainable(model))}))


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field}; the memory figures need Linux")


def bench_memory(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    out = {}
    for mode in MEMORY_MODES:
        command = [sys.executable, __file__, "--memory-probe", mode, "--model", args.model, "--batch",
                   str(args.batch), "--rank", str(args.rank), "--threads", str(args.threads)]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        out[mode] = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"memory {mode}: peak RSS during training steps {out[mode]['peak_rss_mib']:.0f} MiB (before the "
              f"steps: {out[mode]['rss_before_steps_mib']:.0f} MiB), {out[mode]['trainable']:,} trainable parameters")
    return out


# ---------------------------------------------------------------- report
def report(results: dict[str, object], args: argparse.Namespace) -> dict[str, float]:
    headline: dict[str, float] = {}
    if "train" in results:
        samples = results["train"]["samples_s"]
        base_of = {name: "train lora peft" if "peft" in name else "train lora vislora" for name in samples}
        base_of["train lora vislora"] = "train lora peft"
        base_of["train frozen floor"] = "train lora vislora"
        m = print_table(samples, base_of)
        headline["lora_train_over_peft"] = m["train lora vislora"] / m["train lora peft"]
        headline["lora_train_over_frozen_floor"] = m["train lora vislora"] / m["train frozen floor"]
        headline["peft_lora_train_over_frozen_floor"] = m["train lora peft"] / m["train frozen floor"]
        headline["dora_over_lora"] = m["train dora vislora"] / m["train lora vislora"]
        headline["peft_dora_over_peft_lora"] = m["train dora peft"] / m["train lora peft"]
        headline["dora_train_over_peft_dora"] = m["train dora vislora"] / m["train dora peft"]
    if "routing" in results:
        samples = results["routing"]["samples_s"]
        base_of = {name: "single adapter peft" if name.endswith("peft") else "single adapter vislora"
                   for name in samples}
        m = print_table(samples, base_of)
        for k in args.adapters:
            headline[f"routing_{k}_over_single"] = m[f"{k} adapters routed vislora"] / m["single adapter vislora"]
            headline[f"peft_routing_{k}_over_single"] = m[f"{k} adapters routed peft"] / m["single adapter peft"]
    if "memory" in results:
        memory = results["memory"]
        grown = {k: memory[k]["peak_rss_mib"] - memory[k]["rss_before_steps_mib"] for k in memory}
        for mode in ("lora", "lora-checkpointing"):
            key = mode.replace("-", "_")
            headline[f"memory_{key}_over_full"] = memory[mode]["peak_rss_mib"] / memory["full"]["peak_rss_mib"]
            headline[f"memory_step_growth_{key}_over_full"] = grown[mode] / grown["full"]
    print()
    for name, value in headline.items():
        aim = AIMS.get(name) or (AIMS["routing_over_single"] if name.startswith("routing_") else None)
        print(f"{name:<38} {value:6.3f}" + (f"   (aim <= {aim:.2f})" if aim else ""))
    return headline


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_probe:
        memory_probe(args)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    base = timm.create_model(args.model, pretrained=False)
    print(f"{args.model}  train batch {args.batch}  routing batch {args.routing_batch}  threads "
          f"{torch.get_num_threads()}  rank {args.rank}  steps {args.steps} (+{args.warmup} warm-up)  torch "
          f"{torch.__version__}  peft {peft.__version__}  timm {timm.__version__}  vislora {vislora.__version__}")
    parts = args.parts.split(",")
    results: dict[str, object] = {}
    if "train" in parts:
        results["train"] = bench_train(base, args)
    if "routing" in parts:
        results["routing"] = bench_routing(base, args)
    if "memory" in parts:
        results["memory"] = bench_memory(args)
    headline = report(results, args)
    if args.json:
        record = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "versions": {"torch": torch.__version__, "peft": peft.__version__, "timm": timm.__version__,
                               "vislora": vislora.__version__, "python": platform.python_version()},
                  "results": results, "headline": headline}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
