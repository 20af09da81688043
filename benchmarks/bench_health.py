"""Benchmark how fast /healthz follows faults: a live server (uvicorn on loopback, a tiny ViT with two adapters)
under steady client traffic, with faults injected into its forwards, the health judged with the real clock.

Phases, each measured from the clients' answers and a poller reading /healthz every --poll-ms:
  steady   2 x --window seconds of healthy traffic (must stay ok; its p95 sets the latency threshold below)
  errors   every --fail-every-th forward raises (its requests answer 500) for --fault-seconds, then healthy
  slow     every forward runs --slow-factor x the latency threshold's worth of real work (the forward repeated)
           for --fault-seconds; the threshold health.max_p95_latency_s is 3x the steady p95
Reported per fault: seconds from the first faulty answer to the first `degraded` poll, and from the last faulty
answer to the first `ok` poll after it, each also as a share of the window. Aim: degraded within one window (as
soon as the faults are more than the threshold's share of the window), ok again once they have left it (about
one window).

    python benchmarks/bench_health.py                       # window 5 s
    python benchmarks/bench_health.py --window 2 --fault-seconds 2 --clients 2   # smoke test
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import timm
import torch
import uvicorn
from PIL import Image

import vislora
from vislora.serve import Engine, ServeConfig, build_engine, create_app

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4}
NO_ANSWER = 599  # status recorded for a request the server never answered
BASE = {"spec": "timm:vit_tiny_patch16_224", "pretrained": False, "kwargs": TINY, "num_classes": 3, "image_size": 32}


class FaultyEngine(Engine):
    """The real engine with faults the benchmark switches on: every `fail_every`-th forward raises, and every
    forward is computed `repeat` times (real work: a slow batch)."""

    fail_every = 0
    repeat = 1
    forwards = 0

    def _logits(self, pixels: torch.Tensor, names: list[str | None]) -> torch.Tensor:
        self.forwards += 1
        if self.fail_every and self.forwards % self.fail_every == 0:
            raise RuntimeError("injected fault: the forward raised")
        for _ in range(self.repeat - 1):
            super()._logits(pixels, names)
        return super()._logits(pixels, names)


@dataclass
class Traffic:
    """Closed-loop clients: each answer's (end time, status, latency), in time order per client."""

    answers: list[tuple[float, int, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)


@dataclass
class Polls:
    """The poller's (time, status) readings of /healthz, and the reasons of each degraded one by time."""

    readings: list[tuple[float, str]] = field(default_factory=list)
    reasons: dict[float, list[str]] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=float, default=5.0, help="health.window_s (%(default)s)")
    parser.add_argument("--min-requests", type=int, default=10, help="health.min_requests (%(default)s)")
    parser.add_argument("--fault-seconds", type=float, default=5.0, help="how long each fault lasts (%(default)s)")
    parser.add_argument("--fail-every", type=int, default=2, help="every n-th forward raises (%(default)s)")
    parser.add_argument("--slow-factor", type=float, default=2.0, help="work of a slow forward, in latency "
                        "thresholds (%(default)s)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client threads (%(default)s)")
    parser.add_argument("--poll-ms", type=float, default=20.0, help="/healthz poll interval (%(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (%(default)s)")
    args = parser.parse_args(argv)
    if args.window <= 0 or args.fault_seconds <= 0 or args.fail_every < 1 or args.clients < 1:
        parser.error("--window and --fault-seconds must be > 0, --fail-every and --clients >= 1")
    return args


def adapters(root: Path) -> dict[str, str]:
    """Two LoRA adapters with seeded random weights on the tiny ViT."""
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, **TINY)
    model = vislora.inject(base, vislora.AdapterConfig(rank=4, alpha=8, targets=["q", "v"],
                                                       modules_to_save=["head"]))
    out = {}
    for name, seed in (("a0", 1), ("a1", 2)):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.adapter_parameters("default"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        vislora.save_adapter(model, root / name)
        out[name] = str(root / name)
    return out


def serve(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:  # waiting for the socket to listen
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start within 60 s")
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


def client(url: str, image: bytes, index: int, traffic: Traffic) -> None:
    with httpx.Client(base_url=url, timeout=60) as http:
        while not traffic.stop.is_set():
            started = time.monotonic()
            try:
                status = http.post("/v1/predict", files={"image": ("x.png", image)},
                                   data={"adapter": f"a{index % 2}"}).status_code
            except httpx.TransportError:  # no answer at all (the connection dropped): a failure too
                status = NO_ANSWER
            ended = time.monotonic()
            with traffic.lock:
                traffic.answers.append((ended, status, ended - started))


def poller(url: str, interval: float, polls: Polls) -> None:
    with httpx.Client(base_url=url, timeout=60) as http:
        while not polls.stop.is_set():
            health, now = http.get("/healthz").json(), time.monotonic()
            if health["reasons"]:
                polls.reasons[now] = health["reasons"]
            polls.readings.append((now, health["status"]))
            polls.stop.wait(interval)


def first(readings: list[tuple[float, str]], status: str, after: float) -> float | None:
    return next((t for t, s in readings if t >= after and s == status), None)


def wait_for(readings: list[tuple[float, str]], status: str, after: float, timeout: float) -> float | None:
    """The first poll at or after `after` reading `status`, waiting at most `timeout` s for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = first(readings, status, after)
        if found is not None:
            return found
        time.sleep(0.01)  # the poller thread takes the readings
    return None


def fault(name: str, engine: FaultyEngine, traffic: Traffic, polls: Polls, args: argparse.Namespace,
          is_faulty, switch) -> dict:
    """Switch a fault on for --fault-seconds, then off; times from the first/last faulty answer to degraded/ok."""
    begin = time.monotonic()
    switch(True)
    time.sleep(args.fault_seconds)  # the fault lasts this long while the clients keep sending
    switch(False)
    off = time.monotonic()
    time.sleep(min(1.0, args.window))  # answers of batches started before the switch still arrive
    degraded_at = first(polls.readings, "degraded", begin)
    with traffic.lock:
        dropped = sum(1 for t, status, _ in traffic.answers if t >= begin and status == NO_ANSWER)
        faulty = [t for t, status, latency in traffic.answers if t >= begin and is_faulty(status, latency)]
        during = [a for a in traffic.answers if begin <= a[0] <= off]
    first_fault, last_fault = (faulty[0], faulty[-1]) if faulty else (None, None)
    ok_at = wait_for(polls.readings, "ok", last_fault or off, timeout=4 * args.window)
    return {"fault": name, "requests": len(during), "faulty": len(faulty), "dropped": dropped,
            "to_degraded": degraded_at - first_fault if degraded_at and first_fault else None,
            "to_ok": ok_at - last_fault if ok_at and last_fault else None,
            "reasons": polls.reasons.get(degraded_at, [])}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("vislora").setLevel(logging.CRITICAL)  # every injected fault would log a traceback
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(png, format="PNG")
    with tempfile.TemporaryDirectory() as tmp:
        config = ServeConfig.parse({"base": BASE, "adapters": adapters(Path(tmp)),
                                    "batching": {"max_wait_ms": 2, "threads": args.threads},
                                    "health": {"window_s": args.window, "min_requests": args.min_requests}})
        torch.manual_seed(0)
        engine = build_engine(config, engines={"classifier": FaultyEngine})
        server, thread, url = serve(create_app(engine, config))
        traffic, polls = Traffic(), Polls()
        workers = [threading.Thread(target=client, args=(url, png.getvalue(), i, traffic), daemon=True)
                   for i in range(args.clients)]
        workers.append(threading.Thread(target=poller, args=(url, args.poll_ms / 1e3, polls), daemon=True))
        for worker in workers:
            worker.start()
        try:
            time.sleep(2 * args.window)  # warm-up, then one window of steady traffic
            steady = engine.health.judge()
            p95 = next(c.value for c in steady.checks if c.check == "p95_latency")
            if steady.status != "ok" or p95 is None:
                raise RuntimeError(f"the steady phase is not ok: {steady.reasons or ''} ({steady.requests} requests "
                                   f"in the window; lower --min-requests or raise --window)")
            forward_s = engine.metrics.snapshot()["forward"]["mean"] / 1e3
            limit = 3 * p95
            engine.health.config = engine.health.config.model_copy(update={"max_p95_latency_s": limit})
            print(f"window {args.window:g} s, min_requests {args.min_requests}, {args.clients} clients; steady: "
                  f"{steady.requests / args.window:.0f} requests/s, p95 {p95 * 1e3:.1f} ms, forward "
                  f"{forward_s * 1e3:.1f} ms; latency threshold {limit * 1e3:.1f} ms")
            results = [fault("errors", engine, traffic, polls, args, lambda status, _: status >= 500,
                             lambda on: setattr(engine, "fail_every", args.fail_every if on else 0))]
            repeat = max(2, math.ceil(args.slow_factor * limit / forward_s))
            results.append(fault(f"slow (forward x{repeat})", engine, traffic, polls, args,
                                 lambda _, latency: latency > limit,
                                 lambda on: setattr(engine, "repeat", repeat if on else 1)))
        finally:
            traffic.stop.set()
            polls.stop.set()
            for worker in workers:
                worker.join(60)
            server.should_exit = True
            thread.join(60)
            engine.close()
    print("\n| fault | requests | faulty answers | no answer | first fault -> degraded s | x window "
          "| last fault -> ok s | x window |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        cells = [f"{r[k]:.2f} | {r[k] / args.window:.2f}" if r[k] is not None else "never | –"
                 for k in ("to_degraded", "to_ok")]
        print(f"| {r['fault']} | {r['requests']} | {r['faulty']} | {r['dropped']} | {cells[0]} | {cells[1]} |")
    for r in results:
        print(f"{r['fault']}, first degraded reading: {'; '.join(r['reasons']) or '-'}")


if __name__ == "__main__":
    main()
