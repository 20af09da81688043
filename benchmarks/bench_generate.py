"""Generated tokens/s of a LoRA-adapted generative VLM serving 16 concurrent requests with 1, 8 and 16 distinct
adapters routed per sample in ONE `generate` call, against one adapter, and against PEFT on the same model.

The model is the real LLaVA of vislora's bundled assets (DINOv2-S + SmolLM2-135M-Instruct, 16 image tokens at
56 px; `--model tiny` swaps in random 2-layer towers for a quick run). Every adapter is LoRA rank r on the language
model (q, k, v, o and the MLP), with nonzero random B so none is a no-op. The requests are questions about
Fashion-MNIST test images; greedy decoding with min_new_tokens = max_new_tokens, so every contender generates
exactly the same number of tokens.

Contenders (each one `generate` of all requests, timed interleaved, rotating order, medians of --repeats):
  vislora active          one adapter active, no routing (the baseline of the vislora rows)
  vislora routed N        model.generate(..., adapters=[...]) with N distinct adapters over the requests
  peft active             PEFT on a copy of the same model, one adapter active (the baseline of the PEFT rows)
  peft routed N           PeftModel.generate(..., adapter_names=[...]) with the same N adapters

PEFT's adapters are built first and their A/B copied into vislora's, so both libraries hold identical weights; the
script checks that they generate identical tokens for the 16-adapter route (and that the adapters change the base
model's output) before timing.

    python benchmarks/bench_generate.py                    # the real VLM, 16 requests x 16 new tokens, 2 threads
    python benchmarks/bench_generate.py --model tiny --quick
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import peft
import torch
from torch import nn

import vislora
from common import (
    VLM_MODELS,
    bench_vlm,
    copy_from_peft,
    fashion_pixels,
    interleaved_medians,
    print_table,
    randomize_peft,
)
from vislora.assets import read_fashion_mnist
from vislora.vlm import vlm_adapter_config

SEED = 0
QUESTIONS = ("What is this item?", "Which category is it?", "Is it worn on the feet?", "What is it used for?")
ROUTED_AIM = 0.90  # routed tokens/s against one active adapter


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=VLM_MODELS, default="smollm2",
                        help="smollm2: the real DINOv2-S + SmolLM2-135M LLaVA; tiny: random 2-layer towers "
                             "(default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=56,
                        help="image side in pixels, a multiple of 14 (56 px = 16 image tokens) (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=16, help="prompts per generate call (default: %(default)s)")
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 16], metavar="N",
                        help="distinct adapters routed over the requests, one contender each (default: 1 8 16)")
    parser.add_argument("--new-tokens", type=int, default=16,
                        help="tokens generated per request, min = max (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r, alpha = 2r (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed generate calls per contender; the median is reported (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed calls per contender before timing (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 4 new tokens, 1 repeat, no warmup (timings are only indicative)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write all figures to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.new_tokens, args.repeats, args.warmup = 4, 1, 0
    for name in ("requests", "new_tokens", "rank", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.image_size % 14:
        parser.error(f"--image-size must be a multiple of 14 (DINOv2's patch), got {args.image_size}")
    bad = [n for n in args.adapters if not 1 <= n <= args.requests]
    if bad:
        parser.error(f"--adapters counts must lie in 1..--requests ({args.requests}), got {bad}")
    return args


def adapter_names(count: int) -> list[str]:
    return [f"a{i:02d}" for i in range(count)]


def build_models(vlm: object, args: argparse.Namespace) -> tuple[vislora.AdaptedModel, nn.Module, str]:
    """(vislora model, PEFT model on a copy of the same VLM, PEFT's target regex), both holding adapters a00, a01,
    ... with identical random weights (PEFT's, copied into vislora's)."""
    names = adapter_names(max(args.adapters))
    config = vlm_adapter_config(vlm.model, ["lm"], rank=args.rank, alpha=2 * args.rank)
    regex = "|".join(f"(?:{target.removeprefix('re:')})" for target in config.targets)  # PEFT fullmatches a str
    peft_config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=regex)
    reference = peft.get_peft_model(copy.deepcopy(vlm.model), peft_config, adapter_name=names[0])
    for name in names[1:]:
        reference.add_adapter(name, peft_config)
    randomize_peft(reference, SEED)
    reference.set_adapter(names[0])
    model = vislora.inject(vlm.model, config, names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    for name in names:
        copy_from_peft(model, reference, name, name)
    model.set_active(names[0])
    return model.eval(), reference.eval(), regex


def routes(counts: list[int], requests: int) -> dict[int, list[str]]:
    """For each count N: one adapter name per request, N distinct names spread round-robin."""
    return {n: [adapter_names(n)[i % n] for i in range(requests)] for n in counts}


def generate_fn(model: nn.Module, inputs: dict[str, torch.Tensor], settings: dict[str, object],
                **route: object) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(**inputs, **settings, **route)

    return run


def check_outputs(model: vislora.AdaptedModel, reference: nn.Module, inputs: dict[str, torch.Tensor],
                  settings: dict[str, object], route: list[str]) -> dict[str, int]:
    """Tokens generated by vislora and PEFT with the same route, and by the base model: how many sequences agree."""
    ours = generate_fn(model, inputs, settings, adapters=route)()
    theirs = generate_fn(reference, inputs, settings, adapter_names=route)()
    with model.disabled():
        base = generate_fn(model, inputs, settings)()
    width = inputs["input_ids"].shape[1] + settings["max_new_tokens"]
    if ours.shape[1] != width or theirs.shape[1] != width:
        sys.exit(f"error: generated {ours.shape[1]} / {theirs.shape[1]} columns, expected {width}: min_new_tokens "
                 "did not hold, so the contenders would not generate the same number of tokens")
    return {"requests": len(route), "same_as_peft": int((ours == theirs).all(dim=1).sum()),
            "differ_from_base": int((ours != base).any(dim=1).sum())}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    vlm = bench_vlm(args.model, args.image_size)
    model, reference, regex = build_models(vlm, args)
    images, _ = read_fashion_mnist("test")
    inputs = {**vlm.processor.prompt_batch([QUESTIONS[i % len(QUESTIONS)] for i in range(args.requests)]),
              "pixel_values": fashion_pixels(vlm, images[: args.requests])}
    settings = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
                **vlm.processor.generation_kwargs()}
    by_count = routes(args.adapters, args.requests)
    layers = len(model.layers_of("a00"))
    print(f"model {args.model}: {args.requests} requests x {args.new_tokens} new tokens, prompt "
          f"{inputs['input_ids'].shape[1]} tokens ({vlm.record.get('image_tokens', '?')} image tokens), LoRA r="
          f"{args.rank} on {layers} LM layers per adapter, {args.threads} threads; peft {peft.__version__}")

    check = check_outputs(model, reference, inputs, settings, by_count[max(args.adapters)])
    print(f"check, {max(args.adapters)} distinct adapters: {check['same_as_peft']}/{check['requests']} sequences "
          f"identical to PEFT's; {check['differ_from_base']}/{check['requests']} differ from the base model's")

    contenders = {"vislora active": generate_fn(model, inputs, settings),
                  "peft active": generate_fn(reference, inputs, settings)}
    baseline_of = {"vislora active": "vislora active", "peft active": "peft active"}
    for n, route in by_count.items():
        contenders[f"vislora routed {n}"] = generate_fn(model, inputs, settings, adapters=route)
        contenders[f"peft routed {n}"] = generate_fn(reference, inputs, settings, adapter_names=route)
        baseline_of[f"vislora routed {n}"] = "vislora active"
        baseline_of[f"peft routed {n}"] = "peft active"
    samples = interleaved_medians(contenders, args.repeats, args.warmup)
    medians = print_table(samples, baseline_of)

    tokens = args.requests * args.new_tokens
    rate = {name: tokens / seconds for name, seconds in medians.items()}
    print(f"\ngenerated tokens/s ({tokens} tokens per call; x active = against one active adapter of the same "
          f"library; aim: vislora routed >= {ROUTED_AIM:.2f}x active, and faster than PEFT)")
    print(f"{'adapters':>8}  {'vislora':>8}  {'x active':>8}  {'peft':>8}  {'x active':>8}  {'vislora/peft':>12}")
    print(f"{'active':>8}  {rate['vislora active']:>8.1f}  {1:>8.3f}  {rate['peft active']:>8.1f}  {1:>8.3f}  "
          f"{rate['vislora active'] / rate['peft active']:>12.3f}")
    figures = {}
    for n in by_count:
        ours, theirs = rate[f"vislora routed {n}"], rate[f"peft routed {n}"]
        figures[n] = {"vislora_tokens_per_s": ours, "vislora_vs_active": ours / rate["vislora active"],
                      "peft_tokens_per_s": theirs, "peft_vs_active": theirs / rate["peft active"],
                      "vislora_vs_peft": ours / theirs}
        print(f"{n:>8}  {ours:>8.1f}  {figures[n]['vislora_vs_active']:>8.3f}  {theirs:>8.1f}  "
              f"{figures[n]['peft_vs_active']:>8.3f}  {figures[n]['vislora_vs_peft']:>12.3f}")
    worst = min(f["vislora_vs_active"] for f in figures.values())
    slowest = min(f["vislora_vs_peft"] for f in figures.values())
    print(f"\nvislora routed, worst against one adapter: {worst:.3f}x (aim >= {ROUTED_AIM:.2f}); against PEFT, "
          f"slowest: {slowest:.3f}x (aim > 1)")
    if args.json:
        report = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  "platform": platform.platform(), "torch": torch.__version__, "peft": peft.__version__,
                  "peft_target_regex": regex, "check": check, "samples_s": samples,
                  "median_s": medians, "tokens_per_s": rate, "routed": figures,
                  "spread": {name: statistics.pstdev(s) for name, s in samples.items()}}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
