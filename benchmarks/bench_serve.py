"""Benchmark `vislora serve` over loopback HTTP: many adapters in mixed micro-batches vs one adapter vs the naive
server that swaps merged weights per request, all measured in one run.

Contenders, each a real uvicorn server in its own process on 127.0.0.1, over the same randomly initialised timm
ViT (same seed) with LoRA adapters (rank 8 on attn.qkv and attn.proj, plus each adapter's own head):
  routed-1      the engine serving 1 adapter (every request names it)
  routed-16     16 adapters, each request names one uniformly at random
  routed-128    128 adapters, the same
  swap-128      128 adapters loaded, each request computed alone with its adapter merged into the weights and
                unmerged after (batch size 1: merged weights serve one adapter at a time)
N concurrent clients post the same PNG; a round sends --requests requests to each contender in turn (order
rotated per round), so drift in machine load hits all alike. Reported: median throughput over rounds, p50/p99
latency over all requests, the servers' mean batch size, and memory per loaded adapter (tensor bytes, and the
resident-memory growth from 1 to 128 adapters). Before timing, routed-128 and swap-128 must give the same
scores for the same requests: the swap baseline does the same work.

    python benchmarks/bench_serve.py                                  # ViT-S/16 at 112 px, 16 clients
    python benchmarks/bench_serve.py --model vit_tiny_patch16_224 --image-size 32 --adapters 1 4 8 \\
        --swap-adapters 8 --requests 32 --rounds 1 --clients 4          # smoke test

Ray mode (--ray): the direct server against vislora.serve.ray on a local Ray cluster (one child process, one
application per replica count, all serving the same max(--adapters) adapters), same clients, same rounds, no swap
server. A replica holds every adapter (no eviction), and the torch threads are split between the replicas so every
contender runs on the same number of threads: the figure is Ray's overhead, and on more cores, its scale-out.

    python benchmarks/bench_serve.py --ray --adapters 16 --ray-replicas 1 2 --requests 128 --rounds 3
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from common import free_port, random_adapters, wait_ready

SEED = 0
TARGETS = ["attn.qkv", "attn.proj"]
AIMS = {"routed_128_over_1": 0.9, "routed_128_over_swap": 3.0}
RAY_AIMS = {"ray_1_over_direct": 0.8}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm model, random init (%(default)s)")
    parser.add_argument("--image-size", type=int, default=112, help="input side in pixels (%(default)s)")
    parser.add_argument("--classes", type=int, default=10, help="head width (%(default)s)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank, alpha = 2 * rank (%(default)s)")
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 16, 128],
                        help="adapter counts of the routed servers (default: 1 16 128)")
    parser.add_argument("--swap-adapters", type=int, default=128, help="adapters of the swap server (%(default)s)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (%(default)s)")
    parser.add_argument("--requests", type=int, default=256, help="requests per contender per round (%(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (%(default)s)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="engine batching (%(default)s)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="engine batching (%(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per server (%(default)s)")
    parser.add_argument("--time-limit", type=float, default=900.0,
                        help="seconds; no new round starts after this (%(default)s)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write all figures to this JSON file")
    parser.add_argument("--ray", action="store_true", help="compare the direct server with vislora.serve.ray "
                        "(pip install 'vislora[ray]') instead of the swap server")
    parser.add_argument("--ray-replicas", type=int, nargs="+", default=[1, 2],
                        help="replica counts of the Ray contenders (default: 1 2)")
    parser.add_argument("--serve-ray", type=Path, metavar="CONFIG", help=argparse.SUPPRESS)  # child: Ray apps
    parser.add_argument("--serve", type=Path, metavar="CONFIG", help=argparse.SUPPRESS)  # child: run one server
    parser.add_argument("--swap", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("image_size", "classes", "rank", "swap_adapters", "clients", "requests", "rounds", "threads",
                 *(["ray_replicas"] if min(args.ray_replicas) < 1 else [])):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.requests < args.clients:
        parser.error(f"--requests ({args.requests}) must be at least --clients ({args.clients})")
    return args


# ---------------------------------------------------------------- the servers (child processes)
def run_server(args: argparse.Namespace) -> None:
    """Child process: build the engine from CONFIG (seeded base) and serve it until terminated."""
    import uvicorn

    from vislora.serve import ServeConfig, build_engine, create_app
    from vislora.serve.factory import ENGINES

    config = ServeConfig.load(args.serve)
    torch.manual_seed(SEED)  # every server builds the same random base weights
    engines = {**ENGINES, "classifier": swap_engine_class()} if args.swap else ENGINES
    engine = build_engine(config, engines)
    uvicorn.run(create_app(engine, config), host="127.0.0.1", port=args.port, log_level="warning")


def run_ray(args: argparse.Namespace) -> None:
    """Child process: a local Ray cluster serving CONFIG as one application per replica count, at /ray-N, until
    terminated."""
    import signal

    import ray
    from ray import serve

    from vislora.serve import ServeConfig
    from vislora.serve.ray import build_app

    config = ServeConfig.load(args.serve_ray)
    for attempt in range(3):  # on a loaded machine the node's agents may start too late for the raylet
        try:
            ray.init(num_cpus=2 * sum(args.ray_replicas), include_dashboard=False, log_to_driver=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    for replicas in args.ray_replicas:
        threads = max(1, args.threads // replicas)  # every contender computes on args.threads threads in all
        split = config.model_copy(update={"batching": config.batching.model_copy(update={"threads": threads})})
        serve.run(build_app(split, replicas, max_adapters=len(config.adapters), base_seed=SEED),
                  name=f"ray-{replicas}", route_prefix=f"/ray-{replicas}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


def swap_engine_class() -> type:
    from vislora.serve import Engine

    class Swap(Engine):
        """The naive alternative: merge the request's adapter into the weights, forward, unmerge (batch size 1)."""

        def _logits(self, pixels: torch.Tensor, names: list[str | None]) -> torch.Tensor:
            if len(names) != 1:
                raise RuntimeError(f"the swap server computes one request at a time, got a batch of {len(names)}")
            if names[0] is None:
                return self.model(pixels)
            self.model.set_active(names[0])
            self.model.merge(safe=False)
            try:
                return self.model(pixels)
            finally:
                self.model.unmerge()
                self.model.set_active(())

    return Swap


# ---------------------------------------------------------------- setup (parent)
def make_adapters(args: argparse.Namespace, folder: Path) -> list[Path]:
    """max(--adapters, --swap-adapters) adapter directories with seeded random weights (pairs and head)."""
    return random_adapters(args, folder, max(*args.adapters, 0 if args.ray else args.swap_adapters), TARGETS, SEED)


def write_config(args: argparse.Namespace, folder: Path, dirs: list[Path], n: int, max_batch: int) -> Path:
    import yaml

    config = {"base": {"spec": f"timm:{args.model}", "pretrained": False, "num_classes": args.classes,
                       "image_size": args.image_size, "classes": [f"c{i}" for i in range(args.classes)]},
              "adapters": {f"a{i:03d}": str(d) for i, d in enumerate(dirs[:n])},
              "batching": {"max_batch_size": max_batch, "max_wait_ms": args.max_wait_ms, "threads": args.threads,
                           "max_queue": 4096},
              "limits": {"max_top_k": args.classes}}
    path = folder / f"serve-{n}-{max_batch}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Server:
    """One contender: a child process serving on a free loopback port (`process` given: a Ray application of that
    process, at `prefix`)."""

    def __init__(self, name: str, config: Path, adapters: int, swap: bool,
                 process: subprocess.Popen | None = None, port: int | None = None, prefix: str = "") -> None:
        self.name, self.adapters, self.port = name, adapters, port or free_port()
        command = [sys.executable, __file__, "--serve", str(config), "--port", str(self.port)]
        self.process = process or subprocess.Popen(command + (["--swap"] if swap else []), stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}{prefix}"
        self.ray = process is not None

    def wait_ready(self, timeout: float = 300.0) -> None:
        wait_ready(self.process, self.url, f"server {self.name}", timeout)

    def stats(self) -> dict:
        if not self.ray:
            return httpx.get(f"{self.url}/v1/stats", timeout=30).json()
        notes = httpx.get(f"{self.url}/v1/replicas", timeout=30).json().values()  # as each replica last reported
        batches, samples = sum(n["batches"] for n in notes), sum(n["samples"] for n in notes)
        return {"batch_size": {"count": batches, "mean": samples / batches if batches else 0.0},
                "memory": {"rss_bytes": float("nan")}, "loads": sum(n["loads"] for n in notes)}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(120)


def ray_servers(args: argparse.Namespace, config: Path, adapters: int) -> list[Server]:
    """The Ray contenders: one child process (a local Ray cluster), one application per --ray-replicas."""
    port = free_port()
    command = [sys.executable, __file__, "--serve-ray", str(config), "--port", str(port), "--threads",
               str(args.threads), "--ray-replicas", *map(str, args.ray_replicas)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return [Server(f"ray-{r}", config, adapters, False, process, port, f"/ray-{r}") for r in args.ray_replicas]


def png(size: int) -> bytes:
    """A noisy test image, encoded once: every request decodes the same bytes."""
    pixels = np.random.default_rng(SEED).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- load generation
def burst(server: Server, image: bytes, args: argparse.Namespace, seed: int) -> tuple[float, list[float]]:
    """--requests requests from --clients threads, each naming a uniformly random adapter; (wall s, latencies)."""
    names = [f"a{i:03d}" for i in range(server.adapters)]
    latencies: list[float] = []
    lock = threading.Lock()
    failures: list[str] = []

    def client(index: int, count: int) -> None:
        rng = random.Random(seed * 1000 + index)
        with httpx.Client(base_url=server.url, timeout=120) as http:
            for _ in range(count):
                start = time.perf_counter()
                response = http.post("/v1/predict", files={"image": ("x.png", image)},
                                     data={"adapter": rng.choice(names), "top_k": "1"})
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    if response.status_code != 200:
                        failures.append(f"{response.status_code} {response.text[:200]}")

    shares = [args.requests // args.clients + (i < args.requests % args.clients) for i in range(args.clients)]
    threads = [threading.Thread(target=client, args=(i, n)) for i, n in enumerate(shares)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if failures:
        sys.exit(f"error: {server.name}: {len(failures)} failed requests, first: {failures[0]}")
    return wall, latencies


def check_same_answers(routed: Server, swap: Server, image: bytes, n: int, classes: int) -> float:
    """Largest score difference between two servers (routed and swap, or direct and Ray) over the first n adapters."""
    worst = 0.0
    with httpx.Client(timeout=120) as http:
        for i in range(n):
            data = {"adapter": f"a{i:03d}", "top_k": str(classes)}
            a, b = (http.post(f"{s.url}/v1/predict", files={"image": ("x.png", image)}, data=data).json()
                    for s in (routed, swap))
            scores_a = {label["index"]: label["score"] for label in a["labels"]}
            scores_b = {label["index"]: label["score"] for label in b["labels"]}
            worst = max(worst, max(abs(scores_a[k] - scores_b[k]) for k in scores_a))
    return worst


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.serve is not None:
        run_server(args)
        return {}
    if args.serve_ray is not None:
        run_ray(args)
        return {}
    started = time.monotonic()
    print(f"model {args.model} at {args.image_size} px, rank {args.rank} on {TARGETS} + head, {args.clients} "
          f"clients, {args.requests} requests x {args.rounds} rounds per contender, {args.threads} torch threads "
          f"per server, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        folder = Path(tmp)
        dirs = make_adapters(args, folder)
        servers = [Server(f"routed-{n}", write_config(args, folder, dirs, n, args.max_batch_size), n, False)
                   for n in args.adapters]
        if args.ray:
            most = max(args.adapters)
            servers += ray_servers(args, write_config(args, folder, dirs, most, args.max_batch_size), most)
        else:
            servers.append(Server(f"swap-{args.swap_adapters}", write_config(args, folder, dirs, args.swap_adapters,
                                                                             1), args.swap_adapters, True))
        try:
            for server in servers:
                server.wait_ready(600 if server.ray else 300)
            return measure(args, servers, dirs, started)
        finally:
            for server in servers:
                server.stop()


def measure(args: argparse.Namespace, servers: list[Server], dirs: list[Path], started: float) -> dict:
    image = png(args.image_size)
    direct = [s for s in servers if not s.ray and "swap" not in s.name]
    routed_max = max(direct, key=lambda s: s.adapters)
    others = [s for s in servers if s.ray] if args.ray else [servers[-1]]
    diff = 0.0
    for other in others:
        diff = max(diff, check_same_answers(routed_max, other, image, min(8, routed_max.adapters, other.adapters),
                                            args.classes))
    print(f"{routed_max.name} vs {', '.join(o.name for o in others)} scores for the same requests: "
          f"max |diff| = {diff:.2e}")
    if not diff <= 1e-4:
        sys.exit(f"error: the servers disagree by {diff:.2e}; the timing would compare different work")
    for server in servers:  # warm-up: every adapter once (Ray replicas load theirs), then one untimed burst each
        with httpx.Client(base_url=server.url, timeout=120) as http:
            for i in range(server.adapters):
                http.post("/v1/predict", files={"image": ("x.png", image)}, data={"adapter": f"a{i:03d}"})
        burst(server, image, argparse.Namespace(**{**vars(args), "requests": args.clients}), seed=999)
    before = {s.name: s.stats() for s in servers}
    walls: dict[str, list[float]] = {s.name: [] for s in servers}
    latencies: dict[str, list[float]] = {s.name: [] for s in servers}
    for round_ in range(args.rounds):
        if round_ and time.monotonic() - started > args.time_limit:
            print(f"time limit reached: {round_} rounds measured")
            break
        for server in servers[round_ % len(servers):] + servers[: round_ % len(servers)]:
            wall, lat = burst(server, image, args, seed=round_)
            walls[server.name].append(wall)
            latencies[server.name].extend(lat)
    after = {s.name: s.stats() for s in servers}
    return report(args, servers, walls, latencies, before, after, dirs, diff)


def report(args: argparse.Namespace, servers: list[Server], walls: dict, latencies: dict, before: dict,
           after: dict, dirs: list[Path], diff: float) -> dict:
    rows = {}
    for server in servers:
        b, a = before[server.name]["batch_size"], after[server.name]["batch_size"]
        batches = a["count"] - b["count"]
        rows[server.name] = {
            "throughput": statistics.median(args.requests / w for w in walls[server.name]),
            "p50_ms": float(np.percentile(latencies[server.name], 50) * 1e3),
            "p99_ms": float(np.percentile(latencies[server.name], 99) * 1e3),
            "mean_batch": (a["mean"] * a["count"] - b["mean"] * b["count"]) / batches if batches else None,
            "rss_mb": after[server.name]["memory"]["rss_bytes"] / 2**20,
            "adapters": server.adapters,
        }
    first = servers[0].name
    print(f"\n{'server':<12} {'img/s':>8} {'ratio':>6} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6} {'RSS MB':>8}")
    for name, row in rows.items():
        print(f"{name:<12} {row['throughput']:>8.1f} {row['throughput'] / rows[first]['throughput']:>6.2f} "
              f"{row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f} {row['mean_batch'] or 0:>6.1f} {row['rss_mb']:>8.0f}")
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "max_abs_diff": diff, "servers": rows,
              "load_average": os.getloadavg()[0]}
    if args.ray:
        result.update(ray_ratios(servers, rows, after))
    else:
        result.update(swap_ratios(servers, rows, after, dirs))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


def ray_ratios(servers: list[Server], rows: dict, after: dict) -> dict:
    """Each Ray contender's throughput over the direct server's with as many adapters."""
    direct = max((s for s in servers if not s.ray), key=lambda s: s.adapters)
    ratios = {f"{s.name.replace('-', '_')}_over_direct": rows[s.name]["throughput"] / rows[direct.name]["throughput"]
              for s in servers if s.ray}
    print(f"\nratios against {direct.name}: {', '.join(f'{k} = {v:.2f}' for k, v in ratios.items())} (aims: "
          f"{', '.join(f'{k} >= {v}' for k, v in RAY_AIMS.items())}); adapter loads by the Ray replicas: "
          f"{ {s.name: after[s.name]['loads'] for s in servers if s.ray} }")
    return {"ratios": ratios}


def swap_ratios(servers: list[Server], rows: dict, after: dict, dirs: list[Path]) -> dict:
    routed = servers[:-1]
    most, swap = max(routed, key=lambda s: s.adapters), servers[-1]
    ratios = {f"routed_{most.adapters}_over_{routed[0].adapters}": rows[most.name]["throughput"]
              / rows[routed[0].name]["throughput"],
              f"routed_{most.adapters}_over_swap": rows[most.name]["throughput"] / rows[swap.name]["throughput"]}
    memory = memory_per_adapter(after, routed, dirs)
    print(f"\nratios: {', '.join(f'{k} = {v:.2f}' for k, v in ratios.items())} (aims: "
          f"{', '.join(f'{k} >= {v}' for k, v in AIMS.items())})")
    growth = memory["rss_growth_per_adapter"] / 1024
    print(f"memory per loaded adapter: {memory['tensor_bytes'] / 1024:.1f} KiB of tensors "
          f"({memory['file_bytes'] / 1024:.1f} KiB file); resident growth {growth:.1f} KiB per adapter from "
          f"{routed[0].adapters} to {most.adapters} adapters; base model "
          f"{memory['model_bytes'] / 2**20:.1f} MiB")
    return {"ratios": ratios, "memory": memory}


def memory_per_adapter(after: dict, routed: list, dirs: list[Path]) -> dict:
    least, most = min(routed, key=lambda s: s.adapters), max(routed, key=lambda s: s.adapters)
    loaded = after[most.name]["loaded"]
    growth = (after[most.name]["memory"]["rss_bytes"] - after[least.name]["memory"]["rss_bytes"]) / max(
        1, most.adapters - least.adapters)
    return {"tensor_bytes": statistics.mean(a["bytes"] for a in loaded),
            "file_bytes": (dirs[0] / "adapter_model.safetensors").stat().st_size,
            "rss_growth_per_adapter": growth, "model_bytes": after[most.name]["memory"]["model_bytes"]}


if __name__ == "__main__":
    main()
