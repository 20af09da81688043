"""Health that degrades: thresholds over a sliding window, judged from real requests of a real engine with injected
faults (forwards that raise, forwards repeated to be slow, a forward held back), with time moved by a test clock."""

import math
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from serving import build_served, serve_config

from vislora.errors import ConfigError
from vislora.serve import Engine, ServeConfig, build_engine, create_app
from vislora.serve.config import HealthSection
from vislora.serve.health import HealthMonitor
from vislora.serve.metrics import SECONDS, ServeMetrics, histogram_quantile

ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"


class Clock:
    """Monotonic seconds that move only when a test moves them."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FaultyEngine(Engine):
    """The real engine with faults switched on by the test: every forward raises (`fail`), takes `slow_s` seconds
    on the test clock, or waits for `gate` (a stalled forward). benchmarks/bench_health.py makes batches slow with
    real work instead."""

    fail = False
    slow_s = 0.0
    gate: threading.Event | None = None

    def _logits(self, pixels, names):
        if self.gate is not None:
            self.gate.wait(30)
        if self.fail:
            raise RuntimeError("injected fault: the forward raised")
        self.health.clock.now += self.slow_s
        return super()._logits(pixels, names)


@pytest.fixture
def served(tmp_path_factory):
    return build_served(tmp_path_factory)


def faulty(served, health, **fields) -> tuple[FaultyEngine, ServeConfig, Clock]:
    config = serve_config(served, health=health, batching={"max_wait_ms": 1}, **fields)
    torch.manual_seed(0)
    engine = build_engine(config, engines={"classifier": FaultyEngine})
    clock = Clock()
    engine.health.clock = clock
    return engine, config, clock


def predict(client, served, adapter="a0", index=0):
    return client.post("/v1/predict", files={"image": ("x.png", served["images"][index])}, data={"adapter": adapter})


def until(condition, what: str) -> None:
    """Wait (at most 30 s) for another thread to reach a state; polling, not standing in for work."""
    deadline = time.monotonic() + 30
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within 30 s")
        time.sleep(0.005)


def measured(health: dict, check: str) -> float | None:
    return next(c["value"] for c in health["checks"] if c["check"] == check)


def failing(health: dict) -> dict:
    return {c["check"]: c["value"] for c in health["checks"] if c["failing"]}


# ------------------------------------------------------------ the monitor alone
def test_error_rate_is_rated_over_the_window_and_at_least_min_requests():
    clock = Clock()
    monitor = HealthMonitor(HealthSection(window_s=10, min_requests=20, max_p95_latency_s=None), clock=clock)
    monitor.record_request(0.01, failed=True)
    health = monitor.judge()
    assert (health.status, health.requests, health.failed) == ("ok", 1, 1)  # 1 of at least 20: 5%, not above
    assert [(c.check, c.value) for c in health.checks] == [("serving", None), ("error_rate", 0.05)]
    clock.now += 4
    monitor.record_request(0.01, failed=True)
    health = monitor.judge()
    assert health.status == "degraded"
    assert health.reasons == ["error rate 0.100 (2 of 2 requests in the last 10 s answered 5xx, rated over "
                              "health.min_requests 20) is above health.max_error_rate 0.05"]
    for _ in range(18):
        monitor.record_request(0.01, failed=False)
    monitor.record_request(0.01, failed=True)
    health = monitor.judge()
    assert health.reasons == ["error rate 0.143 (3 of 21 requests in the last 10 s answered 5xx) is above "
                              "health.max_error_rate 0.05"]
    clock.now += 6  # the first failure leaves the window (its start is exclusive): 2 of 20
    health = monitor.judge()
    assert (health.status, health.requests, health.failed) == ("degraded", 20, 2)
    clock.now += 4  # all leave: an idle window is ok
    health = monitor.judge()
    assert (health.status, health.requests, health.checks[1].value) == ("ok", 0, 0.0)


def test_a_few_slow_answers_in_a_quiet_window_keep_the_p95_degraded():
    """A server whose batches got slow answers fewer requests; with fewer than min_requests in the window the
    missing ones count as 0 s, so its slow answers still decide the p95 once they are over 5% of min_requests."""
    monitor = HealthMonitor(HealthSection(min_requests=20, max_error_rate=None), clock=Clock())
    monitor.record_request(3.0, failed=False)
    assert monitor.judge().checks[1].value == 0.0  # rank 19 of 20: a missing request
    monitor.record_request(2.0, failed=False)
    health = monitor.judge()
    assert health.checks[1].value == 2.0 and health.reasons == [
        "p95 latency 2.000 s (of 2 requests in the last 60 s, rated over health.min_requests 20) is above "
        "health.max_p95_latency_s 1"]


def test_p95_is_the_nearest_rank_and_crosses_its_threshold_exactly_when_promql_does():
    rng = np.random.default_rng(3)
    for slow in range(0, 12):  # of 100 requests, `slow` above the 1 s bound
        latencies = np.concatenate([rng.uniform(0.05, 0.9, 100 - slow), rng.uniform(1.05, 2.0, slow)])
        monitor = HealthMonitor(HealthSection(min_requests=100), clock=Clock())
        metrics = ServeMetrics()
        for seconds in rng.permutation(latencies):
            monitor.record_request(float(seconds), failed=False)
            metrics.latency.labels("predict").observe(float(seconds))
        check = next(c for c in monitor.judge().checks if c.check == "p95_latency")
        assert check.value == np.percentile(latencies, 95, method="inverted_cdf")
        snapshot = metrics.snapshot()["latency"]
        bounds = [b / 1e3 if b is not None else math.inf for b in snapshot["le"]]
        promql = histogram_quantile(0.95, bounds, snapshot["cumulative"])
        assert 1.0 in SECONDS and check.failing == (promql > 1.0) == (slow > 5), slow


def test_the_health_section_is_validated_with_its_key():
    assert ServeConfig.parse({"base": {"spec": "timm:x", "num_classes": 2}}).health == HealthSection()
    with pytest.raises(ConfigError, match=r"health\.max_error_rate: Input should be less than or equal to 1"):
        ServeConfig.parse({"base": {"spec": "timm:x", "num_classes": 2}, "health": {"max_error_rate": 5}})
    with pytest.raises(ConfigError, match=r"health\.window: Extra inputs are not permitted"):
        ServeConfig.parse({"base": {"spec": "timm:x", "num_classes": 2}, "health": {"window": 5}})


# ------------------------------------------------------------ a served engine with faults
def test_forwards_that_raise_degrade_health_within_the_window_and_it_recovers_after(served):
    engine, config, clock = faulty(served, {"window_s": 2, "min_requests": 4, "max_p95_latency_s": None})
    with TestClient(create_app(engine, config)) as client:  # would raise a failure that escaped the app
        for i in range(4):
            assert predict(client, served, index=i).status_code == 200
        assert predict(client, served, adapter="zz").status_code == 404  # the client's mistake: not a failure
        health = client.get("/healthz").json()
        assert health["status"] == "ok" and health["reasons"] == [] and (health["requests"], health["failed"]) == (5, 0)

        engine.fail = True
        clock.now += 0.5
        answers = [predict(client, served) for _ in range(2)]
        assert [a.status_code for a in answers] == [500, 500] and answers[0].json()["kind"] == "internal"
        response = client.get("/healthz")
        assert response.status_code == 200  # liveness: the process answers
        assert response.json()["reasons"] == ["error rate 0.286 (2 of 7 requests in the last 2 s answered 5xx) is "
                                              "above health.max_error_rate 0.05"]
        assert client.get("/v1/stats").json()["health"]["status"] == "degraded"
        metrics = client.get("/metrics").text
        assert "vislora_health_degraded 1.0" in metrics
        assert 'vislora_health_check_failing{check="error_rate"} 1.0' in metrics
        assert 'vislora_requests_total{endpoint="/v1/predict",status="500"} 2.0' in metrics  # 500s are counted
        assert client.get("/readyz").status_code == 200  # degraded, still serving

        engine.fail = False
        clock.now += 2.0  # the last fault leaves the window
        health = client.get("/healthz").json()
        assert (health["status"], health["requests"]) == ("ok", 0)
        assert "vislora_health_degraded 0.0" in client.get("/metrics").text


def test_slow_batches_degrade_health_for_p95_latency_as_promql_would(served):
    engine, config, clock = faulty(served, {"window_s": 30, "min_requests": 4})
    with TestClient(create_app(engine, config)) as client:
        for i in range(4):  # the test clock stands still: 0 s each
            assert predict(client, served, index=i).status_code == 200
        health = client.get("/healthz").json()
        assert health["status"] == "ok" and measured(health, "p95_latency") == 0.0
        engine.slow_s = 1.5
        assert predict(client, served).status_code == 200
        health = client.get("/healthz").json()
        assert failing(health) == {"p95_latency": 1.5}  # 5 requests: the nearest-rank p95 is the slowest
        assert health["reasons"] == ["p95 latency 1.500 s (of 5 requests in the last 30 s) is above "
                                     "health.max_p95_latency_s 1"]
        assert client.get("/v1/stats").json()["latency"]["p95"] > 1000  # ms, histogram_quantile over the buckets
        engine.slow_s = 0.0
        clock.now += 30
        assert client.get("/healthz").json()["status"] == "ok"


def test_a_stalled_forward_degrades_for_queue_depth_and_closing_is_not_ready(served):
    engine, config, _ = faulty(served, {"max_queue_depth": 2})
    engine.gate = threading.Event()
    with TestClient(create_app(engine, config)) as client:
        pixels = engine.preprocess(served["images"][0])
        running = engine.submit(pixels, "a0")
        until(running.running, "the worker did not take the first request")  # and is held in its forward
        queued = [engine.submit(pixels, "a1") for _ in range(3)]
        health = client.get("/healthz").json()
        assert health["reasons"] == ["queue depth 3 is above health.max_queue_depth 2"]
        closing = threading.Thread(target=engine.close)
        closing.start()
        until(lambda: not engine.ready, "close() did not start")
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json() == {"ready": False, "adapters": 3, "reason": "the engine is closing: new requests "
                                   "are refused while the queued ones are answered"}
        health = client.get("/healthz")
        assert health.status_code == 200 and health.json()["reasons"][0].startswith("not serving: the engine is")
        engine.gate.set()
        closing.join(30)
        assert all(f.result(30).adapter == "a1" for f in queued) and running.result().adapter == "a0"
        assert client.get("/readyz").json()["reason"] == "the engine is closed"
        assert failing(client.get("/healthz").json()) == {"serving": None}


def test_memory_and_shadow_drift_degrade_with_measured_values(served):
    drift_limit = 1e-4
    health = {"min_requests": 6, "max_memory_bytes": 2**20, "max_shadow_drift": drift_limit}
    engine, config, _ = faulty(served, health, rollouts={"canary": {"weights": {"a0": 1}, "shadow": "a1"}})
    with TestClient(create_app(engine, config)) as client:
        for i in range(6):
            assert predict(client, served, adapter="canary", index=i).status_code == 200
        verdict = client.get("/healthz").json()
        rss = int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024
        refs = served["refs"]
        drift = sum(1 - float(torch.cosine_similarity(refs["a0"].features[i], refs["a1"].features[i], dim=0))
                    for i in range(6)) / 6
        values = failing(verdict)
        assert set(values) == {"memory", "shadow_drift"}
        assert values["memory"] == pytest.approx(rss, rel=0.05)
        assert values["shadow_drift"] == pytest.approx(drift, abs=1e-5) and drift > drift_limit
        assert verdict["reasons"][1] == (f"rollout 'canary': mean shadow drift {values['shadow_drift']:.4f} (1 - "
                                         "cosine, 6 shadow runs in the last 60 s) is above health.max_shadow_drift "
                                         "0.0001")
        assert verdict["reasons"][0].startswith(f"resident memory {values['memory']} bytes (")
        assert verdict["reasons"][0].endswith("MiB) is above health.max_memory_bytes 1048576")
        exported = client.get("/metrics").text
    used = set(re.findall(r"\b((?:vislora|process)_[a-z_]+)", ALERTS.read_text()))
    assert used and {name for name in used if not re.search(rf"^{name}[{{ ]", exported, re.M)} == set()
