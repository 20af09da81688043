"""Soak: a bounded mixed load (predict, embed, feedback, adapter load/unload) from several client threads against a real
uvicorn server on loopback, for VISLORA_SOAK_SECONDS (default 30). Every answer must be right (the offline
AdaptedModel's output for the adapter file that computed it and the image sent), and nothing may leak: live tensor
bytes, open file descriptors and threads come back to their baseline, resident memory grows by a bounded amount.

Each client thread runs one request at a time, so the load is bounded by CLIENTS. An operation is a function
`(http, rng, soak) -> None` that sends one request and checks its answer; OPERATIONS lists them with their
weights: another kind is one more line there.
"""

import gc
import os
import random
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
from serving import build_served, is_traced, live_server, make_engine, serve_config

from vislora.serve import create_app
from vislora.serve.sources import open_source

SECONDS = float(os.environ.get("VISLORA_SOAK_SECONDS", "30"))
CLIENTS = 4
ADMIN = {"Authorization": "Bearer admin-secret"}
STEADY = ("a0", "a1")  # loaded for the whole run
SLOTS = ("s0", "s1")  # names loaded and unloaded over and over, each time from one of SOURCES' files
SOURCES = ("a2", "a3", "a4", "a5")
RSS_GROWTH_MB = 64  # allocator arenas of the client and server threads settle within this (measured: see report)


@pytest.fixture
def served(tmp_path_factory):
    return build_served(tmp_path_factory)


@dataclass
class Soak:
    """What the operations share: the served files and references, one lock per slot, and the tallies."""

    served: dict
    refs_by_digest: dict
    slot_locks: dict = field(default_factory=lambda: {name: threading.Lock() for name in SLOTS})
    counts: Counter = field(default_factory=Counter)
    failures: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def tally(self, kind: str, ok: bool, what: str = "") -> None:
        with self.lock:
            self.counts[kind] += 1
            if not ok:
                self.failures.append(f"{kind}: {what}")


def reference(soak: Soak, body: dict):
    return soak.served["refs"][None] if body["adapter"] is None else soak.refs_by_digest[body["digest"]]


def predict(http: httpx.Client, rng: random.Random, soak: Soak) -> None:
    """A predict for a steady or a churned adapter: its labels and scores are the offline ones of the file whose
    digest the answer names; only churned names may be missing (404)."""
    image, adapter = rng.randrange(len(soak.served["images"])), rng.choice([*STEADY, *SLOTS])
    response = http.post("/v1/predict", files={"image": ("x.png", soak.served["images"][image])},
                         data={"adapter": adapter, "top_k": "3"})
    if response.status_code == 404 and adapter in SLOTS:
        return soak.tally("predict_404", True)
    body = response.json()
    if response.status_code != 200 or body["adapter"] != adapter:
        return soak.tally("predict", False, f"{adapter}: {response.status_code} {response.text[:200]}")
    probs = torch.softmax(reference(soak, body).logits[image].double(), dim=-1)
    ok = [label["index"] for label in body["labels"]] == probs.argsort(descending=True)[:3].tolist() and all(
        abs(label["score"] - probs[label["index"]].item()) < 1e-5 for label in body["labels"])
    soak.tally("predict", ok, f"{adapter} image {image}: {body}")


def embed(http: httpx.Client, rng: random.Random, soak: Soak) -> None:
    """An embedding of a steady adapter or of the base model: the offline pooled features."""
    image, adapter = rng.randrange(len(soak.served["images"])), rng.choice([*STEADY, None])
    response = http.post("/v1/embed", files={"image": ("x.png", soak.served["images"][image])},
                         data={"adapter": adapter} if adapter else {})
    if response.status_code != 200:
        return soak.tally("embed", False, f"{adapter}: {response.status_code} {response.text[:200]}")
    body = response.json()
    ok = torch.allclose(torch.tensor(body["embedding"]), reference(soak, body).features[image], atol=1e-5, rtol=0)
    soak.tally("embed", ok, f"{adapter} image {image}")


def churn(http: httpx.Client, rng: random.Random, soak: Soak) -> None:
    """Unload a slot if it is loaded, else load it from a random source file; a slot another thread is changing
    is left alone."""
    name = rng.choice(SLOTS)
    if not soak.slot_locks[name].acquire(blocking=False):
        return
    try:
        if any(a["name"] == name for a in http.get("/v1/adapters").json()):
            status = http.delete(f"/v1/adapters/{name}", headers=ADMIN).status_code
            return soak.tally("unload", status == 204, f"{name}: {status}")
        source = soak.served["dirs"][rng.choice(SOURCES)]
        response = http.post("/v1/adapters", json={"name": name, "path": str(source)}, headers=ADMIN)
        soak.tally("load", response.status_code == 201, f"{name}: {response.status_code} {response.text[:200]}")
    finally:
        soak.slot_locks[name].release()


def feedback(http: httpx.Client, rng: random.Random, soak: Soak) -> None:
    """A predict for a steady adapter, then its label (right or wrong) as feedback, taken once: a second feedback on
    the same request id is refused (409). The labels counted must equal the feedback given (checked at the end)."""
    image, adapter = rng.randrange(len(soak.served["images"])), rng.choice(STEADY)
    answer = http.post("/v1/predict", files={"image": ("x.png", soak.served["images"][image])},
                       data={"adapter": adapter})
    if answer.status_code != 200:
        return soak.tally("feedback", False, f"predict {adapter}: {answer.status_code} {answer.text[:200]}")
    body = answer.json()
    label = rng.choice([label["label"] for label in body["labels"]])
    first = http.post("/v1/feedback", json={"request_id": body["request_id"], "label": label, "click": True})
    again = http.post("/v1/feedback", json={"request_id": body["request_id"], "click": False})
    soak.tally("feedback", first.status_code == 200 and again.status_code == 409,
               f"{adapter}: {first.status_code} {first.text[:200]} then {again.status_code}")


OPERATIONS = {predict: 6, embed: 3, feedback: 2, churn: 1}  # operation -> relative weight


def client(url: str, seed: int, deadline: float, soak: Soak) -> None:
    rng = random.Random(seed)
    operations, weights = list(OPERATIONS), list(OPERATIONS.values())
    with httpx.Client(base_url=url, timeout=120) as http:
        while time.monotonic() < deadline:
            operation = rng.choices(operations, weights)[0]
            try:
                operation(http, rng, soak)
            except Exception as exc:  # a transport error is a failure to report, not a crash of the thread
                soak.tally(operation.__name__, False, repr(exc))


def run_load(url: str, seconds: float, soak: Soak, seed: int) -> None:
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=client, args=(url, seed + i, deadline, soak)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 300)


def live_tensor_bytes() -> int:
    """Bytes of the distinct storages of every CPU tensor alive in this process."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some torch module objects warns of their deprecation
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor) and not is_traced(obj)]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def settled(measure, baseline: int, timeout: float = 60.0) -> int:
    """`measure()` once it is back to `baseline` or below, else its value after `timeout` s (idle server threads
    and connections close on their own schedule: this waits for them, bounded)."""
    deadline = time.monotonic() + timeout
    while (value := measure()) > baseline and time.monotonic() < deadline:
        time.sleep(0.25)
    return value


@pytest.mark.slow
def test_a_mixed_load_gets_right_answers_and_leaks_nothing(served):
    fields = {"auth": {"admin_token": "admin-secret"}, "batching": {"max_wait_ms": 3, "max_batch_size": 16}}
    engine = make_engine(served, names=STEADY, **fields)
    soak = Soak(served, {open_source(served["dirs"][n]).digest: served["refs"][n] for n in (*STEADY, *SOURCES)})
    with live_server(create_app(engine, serve_config(served, names=STEADY, **fields))) as url:
        run_load(url, min(10.0, SECONDS), soak, seed=1000)  # warm-up: thread pools, allocator, routing stacks
        with httpx.Client(base_url=url) as http:  # the slots unloaded, as at the end
            for name in SLOTS:
                http.delete(f"/v1/adapters/{name}", headers=ADMIN)
        warm = Counter(soak.counts)
        fds, threads = len(os.listdir("/proc/self/fd")), threading.active_count()
        tensors, rss = live_tensor_bytes(), rss_bytes()

        run_load(url, SECONDS, soak, seed=0)
        with httpx.Client(base_url=url) as http:
            for name in SLOTS:
                http.delete(f"/v1/adapters/{name}", headers=ADMIN)
            assert [a["name"] for a in http.get("/v1/adapters").json()] == list(STEADY)
        done = soak.counts - warm
        assert not soak.failures, (len(soak.failures), soak.failures[:5], done)
        assert done["predict"] > 0 and done["embed"] > 0 and done["load"] > 0 and done["unload"] > 0, done
        assert done["feedback"] > 0, done
        with httpx.Client(base_url=url) as http:  # every feedback counted once, warm-up included
            labels = [line for line in http.get("/metrics").text.splitlines()
                      if line.startswith("vislora_feedback_labels_total{")]
        assert sum(float(line.rsplit(" ", 1)[1]) for line in labels) == soak.counts["feedback"]
        assert settled(lambda: len(os.listdir("/proc/self/fd")), fds) <= fds
        assert settled(threading.active_count, threads) <= threads
        batch_bytes = 16 * 2 * served["refs"]["a0"].features.shape[1] * 4 + 16 * 3 * 64 * 64 * 4
        assert live_tensor_bytes() <= tensors + batch_bytes  # at most another last batch held by the worker
        growth = rss_bytes() - rss
    assert engine.in_flight("a0") == engine.in_flight("a1") == 0
    print(f"soak {SECONDS:.0f} s: {dict(done)}; resident growth {growth / 2**20:.1f} MiB")
    assert growth < RSS_GROWTH_MB * 2**20, growth
