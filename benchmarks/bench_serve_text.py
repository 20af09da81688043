"""Benchmark text embeddings served by a dual encoder: many text-tower adapters in mixed micro-batches vs one
adapter vs the same texts encoded offline in batches, all measured in one run, in-process (no HTTP).

The base is the offline pair (DINOv2-S + all-MiniLM-L6-v2, projections to 256) built from the bundled assets.
Every adapter is LoRA rank 8 on the text tower's query and value plus its own text projection and logit scale,
with seeded random weights. Contenders:
  offline       AdaptedModel.embed_texts with one adapter active, batches of --max-batch-size captions
  routed-N      an Engine with N adapters; --clients threads call engine.embed_text, each request naming one
                adapter uniformly at random (N = 1: always the same)
Each contender runs alone in a fresh process (torch's OpenMP teams of other threads would slow it); a round runs
every contender on --requests captions (order rotated per round); reported: median captions/s over rounds,
p50/p99 request latency, the engine's mean batch size, and the adapter file size. Before timing, the routed
engine must give the offline embeddings of the same captions (max |diff| printed).

    python benchmarks/bench_serve_text.py                                   # 1, 16 and 64 adapters
    python benchmarks/bench_serve_text.py --adapters 1 4 --requests 64 --rounds 1 --clients 4   # smoke test
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
FORMS = ("a photo of a {}.", "a black and white photo of a {}.", "a close-up of a {} on a plain background",
         "someone is wearing a {} in this picture", "a low resolution photo of the {}, taken in a shop window")
BASE = {"kind": "dual_encoder", "spec": "asset:dinov2-small", "text": "asset:all-minilm-l6-v2", "embed_dim": 256,
        "image_size": 112}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 16, 64],
                        help="adapter counts of the routed engines (default: 1 16 64)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank, alpha = 2 * rank (%(default)s)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent client threads (%(default)s)")
    parser.add_argument("--requests", type=int, default=512, help="captions per contender per round (%(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (%(default)s)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="engine batching (%(default)s)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="engine batching (%(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (%(default)s)")
    args = parser.parse_args(argv)
    for name in ("rank", "clients", "requests", "rounds", "max_batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.adapters) < 1:
        parser.error(f"--adapters must be >= 1, got {args.adapters}")
    return args


def captions(n: int) -> list[str]:
    """n captions of varied length (4 to 16 words), the same every run."""
    return [FORMS[(i // len(CLASSES)) % len(FORMS)].format(CLASSES[i % len(CLASSES)]) for i in range(n)]


def make_adapters(folder: Path, count: int, rank: int) -> list[Path]:
    """`count` adapter folders on the text tower with seeded random weights (pairs, projection, logit scale)."""
    import vislora
    from vislora.dual_encoder import build_dual_encoder
    from vislora.towers import tower_adapter_config

    base = build_dual_encoder(BASE["spec"], BASE["text"], embed_dim=BASE["embed_dim"])
    model = vislora.inject(base, tower_adapter_config(base, text_targets=["q", "v"], rank=rank, alpha=2.0 * rank))
    dirs = []
    for i in range(count):
        generator = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for param in model.adapter_parameters("default"):
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)
        dirs.append(vislora.save_adapter(model, folder / f"text-{i}", "default"))
    return dirs


def offline_rate(adapter: Path, texts: list[str], batch: int) -> tuple[float, torch.Tensor]:
    """(captions/s, embeddings) of `texts` encoded in batches with one adapter active: the no-server floor."""
    import vislora
    from vislora.dual_encoder import build_dual_encoder

    model = vislora.load_adapter(build_dual_encoder(BASE["spec"], BASE["text"], embed_dim=BASE["embed_dim"]),
                                 adapter).eval()
    started = time.perf_counter()
    with torch.inference_mode():
        out = torch.cat([model.embed_texts(texts[i:i + batch]) for i in range(0, len(texts), batch)])
    return len(texts) / (time.perf_counter() - started), out


def drive(engine, texts: list[str], names: list[str], clients: int) -> tuple[float, list[float]]:
    """(captions/s, request latencies in s) of `clients` threads sharing the requests."""
    latencies: list[float] = []
    lock = threading.Lock()
    jobs = list(zip(texts, names, strict=True))

    def client(k: int) -> None:
        mine = []
        for text, name in jobs[k::clients]:
            started = time.perf_counter()
            engine.embed_text(text, name)
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(jobs) / (time.perf_counter() - started), latencies


def batch_totals(engine) -> tuple[float, float]:
    """(forward passes, samples) the engine has run so far."""
    batch = engine.metrics.snapshot()["batch_size"]
    return batch["count"], (batch["mean"] or 0.0) * batch["count"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def contender(name: str, dirs: list[Path], texts: list[str], names: list[str], args: argparse.Namespace
              ) -> dict[str, object]:
    """Run one contender in this (child) process: captions/s, and for engines the request latencies and the
    (forward passes, samples) of the timed requests."""
    torch.set_num_threads(args.threads)
    if name == "offline":
        offline_rate(dirs[0], texts[: args.max_batch_size], args.max_batch_size)  # warm-up
        return {"rate": offline_rate(dirs[0], texts, args.max_batch_size)[0]}
    from vislora.serve import ServeConfig, build_engine

    n = int(name.split("-")[1])
    batching = {"max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms, "threads": args.threads}
    config = ServeConfig.parse({"base": BASE, "batching": batching,
                                "adapters": {f"text-{i}": str(d) for i, d in enumerate(dirs[:n])}})
    with build_engine(config) as engine:
        drive(engine, texts[: 2 * args.clients], names[: 2 * args.clients], args.clients)  # warm-up
        before = batch_totals(engine)
        rate, times = drive(engine, texts, names, args.clients)
        after = batch_totals(engine)
    return {"rate": rate, "latencies": times, "batches": (after[0] - before[0], after[1] - before[1])}


def check(dirs: list[Path], texts: list[str], args: argparse.Namespace) -> float:
    """Max |served - offline| over the embeddings of `texts` under adapter text-0 (in a child process)."""
    from vislora.serve import ServeConfig, build_engine

    _, reference = offline_rate(dirs[0], texts, args.max_batch_size)
    config = ServeConfig.parse({"base": BASE, "adapters": {"text-0": str(dirs[0])}})
    with build_engine(config) as engine:
        served = torch.stack([e.vector for e in engine.embed_texts(texts, ["text-0"] * len(texts))])
    return float((served - reference).abs().max())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    texts = captions(args.requests)
    rng = random.Random(0)
    spawn = multiprocessing.get_context("spawn")  # every contender alone in a fresh process
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(1, mp_context=spawn) as pool:
        print(f"making {max(args.adapters)} text adapters (rank {args.rank}) ...", flush=True)
        dirs = pool.submit(make_adapters, Path(tmp), max(args.adapters), args.rank).result()
        size = (dirs[0] / "adapter_model.safetensors").stat().st_size
        diff = pool.submit(check, dirs, texts[:64], args).result()
        print(f"routed vs offline embeddings of the same captions: max |diff| {diff:.1e}")
        if diff > 1e-4:
            print("the routed engine does not compute what the adapter computes offline", file=sys.stderr)
            return 1
        contenders = ["offline", *(f"routed-{n}" for n in args.adapters)]
        runs: dict[str, list[dict]] = {name: [] for name in contenders}
        for round_ in range(args.rounds):
            shift = round_ % len(contenders)
            for name in contenders[shift:] + contenders[:shift]:
                n = int(name.split("-")[1]) if name != "offline" else 1
                names = [f"text-{rng.randrange(n)}" for _ in texts]
                with ProcessPoolExecutor(1, mp_context=spawn) as alone:
                    runs[name].append(alone.submit(contender, name, dirs, texts, names, args).result())
            print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(
                f"{k} {v[-1]['rate']:.0f}/s" for k, v in runs.items()), flush=True)
    offline = statistics.median(r["rate"] for r in runs["offline"])
    one = statistics.median(r["rate"] for r in runs[f"routed-{min(args.adapters)}"])
    print(f"\n{'contender':<12} {'captions/s':>10} {'vs 1':>6} {'vs offline':>10} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'batch':>6}")
    print(f"{'offline':<12} {offline:>10.1f} {'':>6} {1.0:>10.2f} {'':>7} {'':>7} {args.max_batch_size:>6}")
    for n in args.adapters:
        name = f"routed-{n}"
        rate = statistics.median(r["rate"] for r in runs[name])
        times = [t for r in runs[name] for t in r["latencies"]]
        batch = sum(r["batches"][1] for r in runs[name]) / sum(r["batches"][0] for r in runs[name])
        print(f"{name:<12} {rate:>10.1f} {rate / one:>6.2f} {rate / offline:>10.2f} "
              f"{percentile(times, 0.5) * 1e3:>7.1f} {percentile(times, 0.99) * 1e3:>7.1f} {batch:>6.1f}")
    print(f"\nper adapter: {size / 1024:.0f} KiB file (text-tower pairs, projection, logit scale)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
