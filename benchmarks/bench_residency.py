"""Benchmark adapter residency and hot load in `vislora serve`: 1,000 adapters in one server, what they cost in
memory, and how soon a freshly loaded adapter answers, idle and under a concurrent predict load.

One real uvicorn server (a child process on 127.0.0.1) over a randomly initialised timm ViT (fixed seed); the
script writes --adapters small LoRA adapters (rank --rank on attn.qkv and attn.proj, each with its own head) to a
temporary folder and loads every one over HTTP (POST /v1/adapters). Reported:
  memory     the server's resident memory (/proc, read by this script) with the base alone and with every
             adapter loaded, against the base's tensor bytes plus the adapters' own tensor bytes (the sum the
             server reports per adapter, and the files' tensors): the aim is no copies, so the growth per
             adapter should be its tensors plus a bounded bookkeeping overhead.
  hot load   time from POST /v1/adapters to the first answered predict naming the new adapter (p50/p99 over
             --loads loads, each unloaded after), idle and while --clients threads send predicts for random
             loaded adapters; the split into the load call and the first predict; every first answer must come
             from the new adapter's file (its digest). Aim: p50 < 50 ms idle (S-LoRA and LoRAX keep thousands
             of adapters on one GPU and swap them in per request).

    python benchmarks/bench_residency.py                                   # 1,000 adapters, 50 loads
    python benchmarks/bench_residency.py --adapters 50 --loads 10          # smoke test
"""

from __future__ import annotations

import argparse
import hashlib
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

from common import free_port, wait_ready

SEED = 0
TARGETS = ["attn.qkv", "attn.proj"]
TOKEN = "bench-admin"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
AIM_MS = 50.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_tiny_patch16_224", help="timm model, random init (%(default)s)")
    parser.add_argument("--image-size", type=int, default=64, help="input side in pixels (%(default)s)")
    parser.add_argument("--classes", type=int, default=10, help="head width (%(default)s)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank, alpha = 2 * rank (%(default)s)")
    parser.add_argument("--adapters", type=int, default=1000, help="adapters loaded in the server (%(default)s)")
    parser.add_argument("--loads", type=int, default=50, help="hot loads timed per condition (%(default)s)")
    parser.add_argument("--clients", type=int, default=4, help="predict threads of the loaded condition "
                        "(%(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (%(default)s)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write all figures to this JSON file")
    parser.add_argument("--serve", type=Path, metavar="CONFIG", help=argparse.SUPPRESS)  # child: run the server
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("image_size", "classes", "rank", "adapters", "loads", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


# ---------------------------------------------------------------- the server (child process)
def run_server(args: argparse.Namespace) -> None:
    import uvicorn

    from vislora.serve import ServeConfig, build_engine, create_app

    config = ServeConfig.load(args.serve)
    torch.manual_seed(SEED)
    uvicorn.run(create_app(build_engine(config), config), host="127.0.0.1", port=args.port, log_level="warning")


# ---------------------------------------------------------------- setup (parent)
def make_adapters(args: argparse.Namespace, folder: Path, count: int) -> list[Path]:
    """`count` adapter directories: the first written by `vislora.save_adapter`, the others with the same files
    and fresh seeded random tensors of the same keys and shapes (pairs and head)."""
    import shutil

    import timm
    from safetensors.torch import load_file, save_file

    import vislora

    torch.manual_seed(SEED)
    base = timm.create_model(args.model, pretrained=False, num_classes=args.classes, img_size=args.image_size)
    model = vislora.inject(base, vislora.AdapterConfig(rank=args.rank, alpha=2 * args.rank, targets=TARGETS,
                                                       modules_to_save=["head"]))
    with torch.no_grad():
        for param in model.adapter_parameters("default"):
            param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1000)) * 0.02)
    first = vislora.save_adapter(model, folder / "a0000", "default")
    weights = first / "adapter_model.safetensors"
    shapes = {key: tensor.shape for key, tensor in load_file(str(weights)).items()}
    dirs = [first]
    for i in range(1, count):
        gen = torch.Generator().manual_seed(1000 + i)
        dirs.append(shutil.copytree(first, folder / f"a{i:04d}", ignore=shutil.ignore_patterns(weights.name)))
        save_file({key: torch.randn(shape, generator=gen) * 0.02 for key, shape in shapes.items()},
                  str(dirs[-1] / weights.name))
    return dirs


def write_config(args: argparse.Namespace, folder: Path) -> Path:
    import yaml

    config = {"base": {"spec": f"timm:{args.model}", "pretrained": False, "num_classes": args.classes,
                       "image_size": args.image_size, "classes": [f"c{i}" for i in range(args.classes)]},
              "batching": {"max_batch_size": 32, "max_wait_ms": 2.0, "threads": args.threads, "max_queue": 4096},
              "auth": {"admin_token": TOKEN}, "limits": {"max_top_k": args.classes}}
    path = folder / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Server:
    """The server: a child process on a free loopback port."""

    def __init__(self, config: Path) -> None:
        self.port = free_port()
        self.process = subprocess.Popen([sys.executable, __file__, "--serve", str(config), "--port", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 300.0) -> None:
        wait_ready(self.process, self.url, "the server", timeout)

    def rss(self) -> int:
        """Resident bytes of the server process, read from /proc (not from the server's own report)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def png(size: int) -> bytes:
    pixels = np.random.default_rng(SEED).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def digest(folder: Path) -> str:
    return hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()[:16]


def tensor_bytes(folder: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        return sum(handle.get_tensor(key).nbytes for key in handle.keys())  # noqa: SIM118 (not a dict)


# ---------------------------------------------------------------- measurements
def load_all(http: httpx.Client, dirs: list[Path]) -> list[float]:
    """Load every adapter over HTTP; seconds per load call."""
    seconds = []
    for i, folder in enumerate(dirs):
        start = time.perf_counter()
        response = http.post("/v1/adapters", json={"name": f"a{i:04d}", "path": str(folder)}, headers=ADMIN)
        seconds.append(time.perf_counter() - start)
        if response.status_code != 201:
            sys.exit(f"error: loading a{i:04d} answered {response.status_code}: {response.text[:300]}")
    return seconds


def hot_loads(http: httpx.Client, folders: list[Path], image: bytes) -> list[tuple[float, float]]:
    """(load call s, first predict s) of each folder loaded as a new adapter, answered by it, then unloaded."""
    timings = []
    for i, folder in enumerate(folders):
        name = f"hot{i:03d}"
        start = time.perf_counter()
        loaded = http.post("/v1/adapters", json={"name": name, "path": str(folder)}, headers=ADMIN)
        between = time.perf_counter()
        answer = http.post("/v1/predict", files={"image": ("x.png", image)}, data={"adapter": name, "top_k": "1"})
        end = time.perf_counter()
        if loaded.status_code != 201 or answer.status_code != 200:
            sys.exit(f"error: hot load {name}: {loaded.status_code} {loaded.text[:200]} / {answer.status_code} "
                     f"{answer.text[:200]}")
        if answer.json()["digest"] != digest(folder):
            sys.exit(f"error: the first answer of {name} did not come from its file")
        timings.append((between - start, end - between))
        if http.delete(f"/v1/adapters/{name}", headers=ADMIN).status_code != 204:
            sys.exit(f"error: unloading {name} failed")
    return timings


def predict_load(url: str, image: bytes, names: list[str], clients: int, stop: threading.Event,
                 counts: list[int]) -> list[threading.Thread]:
    """`clients` threads posting predicts for random loaded adapters until `stop`; answers counted in `counts`."""
    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=120) as http:
            while not stop.is_set():
                response = http.post("/v1/predict", files={"image": ("x.png", image)},
                                     data={"adapter": rng.choice(names), "top_k": "1"})
                counts[seed] += 1
                if response.status_code != 200:
                    counts[seed] = -10**9  # reported as a failure below
                    return

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    return threads


def summary(timings: list[tuple[float, float]]) -> dict:
    total = [a + b for a, b in timings]
    return {"p50_ms": float(np.percentile(total, 50) * 1e3), "p99_ms": float(np.percentile(total, 99) * 1e3),
            "load_call_p50_ms": statistics.median(a for a, _ in timings) * 1e3,
            "first_predict_p50_ms": statistics.median(b for _, b in timings) * 1e3}


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.serve is not None:
        run_server(args)
        return {}
    print(f"model {args.model} at {args.image_size} px, rank {args.rank} on {TARGETS} + head, {args.adapters} "
          f"adapters, {args.loads} hot loads per condition, {args.clients} predict clients under load, load "
          f"average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="bench-residency-") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        dirs = make_adapters(args, folder, args.adapters + args.loads)
        print(f"wrote {len(dirs)} adapters in {time.perf_counter() - started:.1f} s")
        server = Server(write_config(args, folder))
        try:
            server.wait_ready()
            return measure(args, server, dirs[:args.adapters], dirs[args.adapters:])
        finally:
            server.stop()


def measure(args: argparse.Namespace, server: Server, resident: list[Path], fresh: list[Path]) -> dict:
    image = png(args.image_size)
    with httpx.Client(base_url=server.url, timeout=120) as http:
        http.post("/v1/predict", files={"image": ("x.png", image)}, data={"top_k": "1"})  # warm the base model
        stats = http.get("/v1/stats").json()
        rss_base, model_bytes = server.rss(), stats["memory"]["model_bytes"]
        load_seconds = load_all(http, resident)
        http.post("/v1/predict", files={"image": ("x.png", image)}, data={"adapter": "a0000", "top_k": "1"})
        rss_loaded = server.rss()
        listed = http.get("/v1/adapters").json()
        own = sum(a["bytes"] for a in listed)
        files = tensor_bytes(resident[0]) * len(resident)
        idle = hot_loads(http, fresh, image)
        stop, counts = threading.Event(), [0] * args.clients
        threads = predict_load(server.url, image, [a["name"] for a in listed], args.clients, stop, counts)
        try:
            loaded_run = hot_loads(http, fresh, image)
        finally:
            stop.set()
            for thread in threads:
                thread.join(120)
        if min(counts) < 0:
            sys.exit("error: a predict of the concurrent load failed")
    growth = rss_loaded - rss_base
    memory = {"rss_base_mb": rss_base / 2**20, "rss_loaded_mb": rss_loaded / 2**20, "model_mb": model_bytes / 2**20,
              "adapters_own_mb": own / 2**20, "adapters_file_tensors_mb": files / 2**20,
              "rss_growth_mb": growth / 2**20, "growth_over_own": growth / own,
              "overhead_per_adapter_kib": (growth - own) / len(resident) / 1024}
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "memory": memory,
              "load_all": {"adapters": len(resident), "mean_ms": statistics.mean(load_seconds) * 1e3,
                           "p99_ms": float(np.percentile(load_seconds, 99) * 1e3)},
              "hot_load_idle": summary(idle), "hot_load_under_load": summary(loaded_run),
              "predicts_during_loaded_run": sum(counts), "load_average": os.getloadavg()[0]}
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


def report(result: dict) -> None:
    m, n = result["memory"], result["load_all"]["adapters"]
    print(f"\nresident memory: base alone {m['rss_base_mb']:.0f} MiB (model tensors {m['model_mb']:.1f} MiB); with "
          f"{n} adapters {m['rss_loaded_mb']:.0f} MiB: +{m['rss_growth_mb']:.1f} MiB for {m['adapters_own_mb']:.1f} "
          f"MiB of adapter tensors ({m['adapters_file_tensors_mb']:.1f} MiB in the files) = "
          f"{m['growth_over_own']:.2f}x, {m['overhead_per_adapter_kib']:.1f} KiB per adapter beyond its tensors")
    print(f"loading {n} adapters over HTTP: mean {result['load_all']['mean_ms']:.1f} ms, p99 "
          f"{result['load_all']['p99_ms']:.1f} ms per load")
    print(f"\n{'hot load':<14} {'p50 ms':>8} {'p99 ms':>8} {'load call':>10} {'1st predict':>12}  "
          f"(aim p50 < {AIM_MS:g})")
    for key, label in (("hot_load_idle", "idle"), ("hot_load_under_load", "under load")):
        row = result[key]
        print(f"{label:<14} {row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f} {row['load_call_p50_ms']:>10.1f} "
              f"{row['first_predict_p50_ms']:>12.1f}")
    print(f"predicts answered during the loaded run: {result['predicts_during_loaded_run']}")


if __name__ == "__main__":
    main()
