"""Health that degrades: the server judges itself against `HealthSection` thresholds over a sliding window.

The app's middleware records every inference request (predict, embed, search) with its latency and whether it
failed; the engine records each shadow run's drift; queue depth and resident memory are read when judged.
Over the n requests of the last `window_s` seconds, counted as at least m = `min_requests`:

    error rate   = failed / max(n, m)                   (failed: answered 5xx; 4xx is the client's mistake)
    p95 latency  = the ceil(0.95 max(n, m))-th smallest latency (nearest rank), missing requests counted as 0 s
    shadow drift = sum of 1 - cosine(primary, shadow) / max(runs, m) per rollout; the worst rollout is judged

A quiet window thus counts its missing requests as answered fast and ok: one failure among three requests does
not degrade (1/20 with the default m), a few do, and a server whose throughput collapses because its batches
got slow stays degraded while its slow answers are more than 5% of m. The status is `degraded` while
any check fails (or the engine is not serving), each reason naming the measured value, the threshold and its
config key, and `ok` again once the failing observations have left the window. With the threshold at a bucket
bound of vislora_request_seconds (the default 1 s), the p95 of a set of at least m requests crosses it exactly
when PromQL's histogram_quantile over the same requests does: deploy/prometheus/alerts.yml agrees with /healthz.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from vislora.serve.config import HealthSection

CHECKS = ("serving", "error_rate", "p95_latency", "queue_depth", "memory", "shadow_drift")


@dataclass(frozen=True)
class Check:
    """One judged figure: `value` None when there was nothing to measure (no reading, no shadow run)."""

    check: str  # one of CHECKS
    key: str | None  # the config key of the threshold (none for serving)
    value: float | None
    threshold: float | None
    failing: bool


@dataclass(frozen=True)
class Health:
    """The verdict: `ok` or `degraded`, why (one sentence per failing check), and every check that was judged."""

    status: Literal["ok", "degraded"]
    reasons: list[str]
    checks: list[Check]
    window_s: float
    requests: int  # inference requests answered within the window
    failed: int  # of them answered 5xx

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def resident_bytes() -> int | None:
    """Resident memory of this process (what process_resident_memory_bytes reports); None where /proc is absent."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class HealthMonitor:
    """Records request outcomes and shadow drift with timestamps from `clock`, and judges them on demand; thread-safe.

    `queue_depth`, `not_serving` (why the engine takes no requests, None while it does) and `memory` are read when
    judged. `config` may be replaced while serving (the next verdict uses the new thresholds). `clock` (seconds,
    monotonic) is a parameter so that tests can move time without waiting for it."""

    def __init__(self, config: HealthSection | None = None, *, queue_depth: Callable[[], int] = lambda: 0,
                 not_serving: Callable[[], str | None] = lambda: None,
                 memory: Callable[[], int | None] = resident_bytes,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or HealthSection()
        self.clock = clock
        self._queue_depth, self._not_serving, self._memory = queue_depth, not_serving, memory
        self._lock = threading.Lock()
        self._requests: deque[tuple[float, float, bool]] = deque()  # (time, latency s, failed)
        self._drift: deque[tuple[float, str, float]] = deque()  # (time, rollout, 1 - cosine)

    def record_request(self, seconds: float, failed: bool) -> None:
        """One answered inference request: its latency and whether it failed (a 5xx answer)."""
        with self._lock:
            self._requests.append((self.clock(), seconds, failed))
            self._forget()

    def record_drift(self, rollout: str, drift: float) -> None:
        """One shadow run of `rollout`: 1 - cosine of its embedding against the primary's."""
        with self._lock:
            self._drift.append((self.clock(), rollout, drift))
            self._forget()

    def judge(self) -> Health:
        """The verdict over the last `window_s` seconds, with the queue depth and memory read now."""
        with self._lock:
            self._forget()
            latencies = sorted(seconds for _, seconds, _ in self._requests)
            failed = sum(1 for *_, bad in self._requests if bad)
            drift = [(rollout, value) for _, rollout, value in self._drift]
        judged = list(self._checks(latencies, failed, drift))
        reasons = [reason for check, reason in judged if check.failing]
        return Health("degraded" if reasons else "ok", reasons, [check for check, _ in judged], self.config.window_s,
                      len(latencies), failed)

    # ------------------------------------------------------------ internals
    def _forget(self) -> None:
        """Drop what left the window (the lock is held)."""
        start = self.clock() - self.config.window_s
        for events in (self._requests, self._drift):
            while events and events[0][0] <= start:
                events.popleft()

    def _checks(self, latencies: list[float], failed: int, drift: list[tuple[str, float]]
                ) -> Iterator[tuple[Check, str]]:
        """(check, the sentence saying why it fails) for the serving state and every threshold that is set."""
        c, n = self.config, len(latencies)
        window = f"in the last {c.window_s:g} s"
        why = self._not_serving()
        yield Check("serving", None, None, None, why is not None), f"not serving: {why}"
        size = max(n, c.min_requests)  # the sample; the missing requests count as answered in 0 s, ok
        counted = f", rated over health.min_requests {c.min_requests}" if n < size else ""
        if c.max_error_rate is not None:
            rate = failed / size
            yield (Check("error_rate", "health.max_error_rate", rate, c.max_error_rate, rate > c.max_error_rate),
                   f"error rate {rate:.3f} ({failed} of {n} requests {window} answered 5xx{counted}) is above "
                   f"health.max_error_rate {c.max_error_rate:g}")
        if c.max_p95_latency_s is not None:
            rank = math.ceil(0.95 * size) - 1 - (size - n)  # into the n measured latencies, below them: 0 s
            p95 = latencies[rank] if rank >= 0 else 0.0
            yield (Check("p95_latency", "health.max_p95_latency_s", p95, c.max_p95_latency_s,
                         p95 > c.max_p95_latency_s),
                   f"p95 latency {p95:.3f} s (of {n} requests {window}{counted}) is above "
                   f"health.max_p95_latency_s {c.max_p95_latency_s:g}")
        if c.max_queue_depth is not None:
            depth = self._queue_depth()
            yield (Check("queue_depth", "health.max_queue_depth", depth, c.max_queue_depth,
                         depth > c.max_queue_depth),
                   f"queue depth {depth} is above health.max_queue_depth {c.max_queue_depth}")
        if c.max_memory_bytes is not None:
            rss = self._memory()
            yield (Check("memory", "health.max_memory_bytes", rss, c.max_memory_bytes,
                         rss is not None and rss > c.max_memory_bytes),
                   f"resident memory {rss or 0} bytes ({(rss or 0) / 2**20:.1f} MiB) is above "
                   f"health.max_memory_bytes {c.max_memory_bytes}")
        if c.max_shadow_drift is not None:
            yield self._drift_check(drift, window)

    def _drift_check(self, drift: list[tuple[str, float]], window: str) -> tuple[Check, str]:
        """The worst mean drift of the rollouts with shadow runs in the window (None without any), each over at
        least `min_requests` runs (the missing ones counted as 0)."""
        c = self.config
        runs: dict[str, list[float]] = {}
        for rollout, value in drift:
            runs.setdefault(rollout, []).append(value)
        means = {r: sum(v) / max(len(v), c.min_requests) for r, v in runs.items()}
        worst = max(means, key=means.__getitem__, default=None)
        value = means[worst] if worst is not None else None
        failing = value is not None and value > c.max_shadow_drift
        k = len(runs.get(worst, []))
        counted = f", rated over health.min_requests {c.min_requests}" if k < c.min_requests else ""
        return (Check("shadow_drift", "health.max_shadow_drift", value, c.max_shadow_drift, failing),
                f"rollout {worst!r}: mean shadow drift {value or 0:.4f} (1 - cosine, {k} shadow runs "
                f"{window}{counted}) is above health.max_shadow_drift {c.max_shadow_drift:g}")


class HealthCollector(Collector):
    """Exports a verdict at every scrape: vislora_health_degraded (0/1) and vislora_health_check_failing{check}
    (0/1 for every judged check)."""

    def __init__(self, judge: Callable[[], Health]) -> None:
        self.judge = judge

    def collect(self) -> Iterator[GaugeMetricFamily]:
        health = self.judge()
        yield GaugeMetricFamily("vislora_health_degraded", "1 while /healthz answers degraded, else 0.",
                                value=float(health.status == "degraded"))
        failing = GaugeMetricFamily("vislora_health_check_failing", "1 while this health check fails (its reason "
                                    "is in /healthz), else 0.", labels=["check"])
        for check in health.checks:
            failing.add_metric([check.check], float(check.failing))
        yield failing

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # the families are computed at scrape time; registering must not judge
