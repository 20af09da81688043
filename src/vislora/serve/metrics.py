"""Prometheus metrics of one server (its own registry), and a JSON snapshot of them for the dashboard.

Latency percentiles are derived from histogram buckets the way PromQL's histogram_quantile does (linear
inside the bucket), so the dashboard and a Prometheus query agree.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.4, 0.6, 1.0, 2.5, 5.0, 10.0)
GENERATE_SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DRIFT = (1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
QUANTILES = (0.5, 0.95, 0.99)
COSINES = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999, 1.0)
NO_ADAPTER = "none"  # label value of requests served by the base model


class ServeMetrics:
    """Everything the server measures. One instance per server; `registry` is what /metrics exposes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu seconds, open fds
        self.latency = Histogram("vislora_request_seconds", "Request latency, receipt to response.", ["endpoint"],
                                 buckets=SECONDS, registry=r)
        self.queue_wait = Histogram("vislora_queue_wait_seconds", "Time a request waited for its batch to start.",
                                    buckets=SECONDS, registry=r)
        self.forward = Histogram("vislora_forward_seconds", "Seconds of one batched forward pass.", buckets=SECONDS,
                                 registry=r)
        self.batch_size = Histogram("vislora_batch_size", "Samples per forward pass (shadow copies included).",
                                    buckets=BATCH_SIZES, registry=r)
        self.samples = Counter("vislora_samples", "Samples computed by adapter; role primary (answered) or shadow "
                               "(compared only). rate() of the primaries is the throughput.", ["adapter", "role"],
                               registry=r)
        self.requests = Counter("vislora_requests", "HTTP requests answered, by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("vislora_errors", "Refused or failed requests by kind.", ["kind"], registry=r)
        self.adapters_loaded = Gauge("vislora_adapters_loaded", "Adapters loaded now.", registry=r)
        self.adapter_bytes = Gauge("vislora_adapter_bytes", "Bytes of each loaded adapter's tensors.", ["adapter"],
                                   registry=r)
        self.model_bytes = Gauge("vislora_model_bytes", "Bytes of the base model's parameters and buffers.",
                                 registry=r)
        self.queue_depth = Gauge("vislora_queue_depth", "Requests waiting for a batch.", registry=r)
        self.shadow = Counter("vislora_shadow_comparisons", "Shadow runs that predict labels, by rollout and top-1 "
                              "agreement with the primary.", ["rollout", "primary", "shadow", "agree"], registry=r)
        self.drift = Histogram("vislora_shadow_drift", "1 - cosine(primary embedding, shadow embedding).",
                               ["rollout"], buckets=DRIFT, registry=r)
        self.base_cosine = Histogram("vislora_base_cosine", "cosine(drawn adapter's features, base model's features) "
                                     "of the runs of a rollout whose shadow is @base, by rollout and adapter.",
                                     ["rollout", "adapter"], buckets=COSINES, registry=r)
        self.answers = Counter("vislora_feedback_answers", "Answers given a request id that feedback can name, by "
                               "rollout ('' for none) and the adapter that answered.", ["rollout", "adapter"],
                               registry=r)
        self.feedback_labels = Counter("vislora_feedback_labels", "Labels received as feedback, by rollout, adapter, "
                                       "role (primary: the answer given; shadow: the rollout's shadow run on the same "
                                       "input) and whether its top-1 was the label.",
                                       ["rollout", "adapter", "role", "correct"], registry=r)
        self.feedback_clicks = Counter("vislora_feedback_clicks", "Click feedback on answers, by rollout, the adapter "
                                       "that answered and whether the answer was clicked.",
                                       ["rollout", "adapter", "clicked"], registry=r)
        self.generated_tokens = Counter("vislora_generated_tokens", "Tokens generated (POST /v1/generate), by the "
                                        "adapter that generated them.", ["adapter"], registry=r)
        self.generate_seconds = Histogram("vislora_generate_seconds", "Seconds of one batched generate call.",
                                          buckets=GENERATE_SECONDS, registry=r)
        self.generate_tokens_per_s = Gauge("vislora_generate_tokens_per_second", "Tokens per second of the last "
                                           "batched generate call (all its prompts together).", registry=r)
        self.feedback_pending = Gauge("vislora_feedback_pending", "Answers still waiting for feedback.", registry=r)

    def bind_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)

    def loaded(self, sizes: dict[str, int], gone: str | None = None, changed: Iterable[str] | None = None) -> None:
        """Publish the loaded adapters and their sizes (and forget the size of `gone`, just unloaded); with
        `changed`, only those adapters' sizes are set (a load among 1,000 adapters sets one gauge, not 1,000)."""
        self.adapters_loaded.set(len(sizes))
        if gone is not None:
            with contextlib.suppress(KeyError):
                self.adapter_bytes.remove(gone)
        for name in sizes if changed is None else changed:
            self.adapter_bytes.labels(name).set(sizes[name])

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # ------------------------------------------------------------ the dashboard's JSON
    def snapshot(self) -> dict[str, Any]:
        """Counts, percentiles (ms), adapters, memory and shadow figures, with the cumulative latency buckets so a
        client can compute percentiles over its own window."""
        got: dict[str, list[Any]] = defaultdict(list)
        for metric in self.registry.collect():
            for sample in metric.samples:
                got[sample.name].append(sample)
        per_adapter: dict[str, float] = defaultdict(float)
        for s in got["vislora_samples_total"]:
            per_adapter[s.labels["adapter"], s.labels["role"]] += s.value
        sizes = {s.labels["adapter"]: s.value for s in got["vislora_adapter_bytes"]}
        rss = got["process_resident_memory_bytes"]
        return {
            "time": time.time(),
            "requests": sum(s.value for s in got["vislora_requests_total"]),
            "samples": sum(v for (_, role), v in per_adapter.items() if role == "primary"),
            "shadow_samples": sum(v for (_, role), v in per_adapter.items() if role == "shadow"),
            "base_samples": per_adapter.get((NO_ADAPTER, "primary"), 0.0),
            "errors": {s.labels["kind"]: s.value for s in got["vislora_errors_total"]},
            "latency": _histogram(got, "vislora_request_seconds", scale=1e3),
            "queue_wait": _histogram(got, "vislora_queue_wait_seconds", scale=1e3),
            "forward": _histogram(got, "vislora_forward_seconds", scale=1e3),
            "batch_size": _histogram(got, "vislora_batch_size"),
            "adapters": [{"name": n, "bytes": sizes[n], "samples": per_adapter.get((n, "primary"), 0.0)}
                         for n in sorted(sizes)],
            "memory": {"rss_bytes": rss[0].value if rss else None,
                       "model_bytes": got["vislora_model_bytes"][0].value, "adapter_bytes": sum(sizes.values())},
            "queue_depth": got["vislora_queue_depth"][0].value,
            "shadow": _shadow(got["vislora_shadow_comparisons_total"], got["vislora_shadow_drift_sum"],
                              got["vislora_shadow_drift_count"]),
            "base_cosine": _base_cosine(got),
            "feedback": _feedback(got),
            "generate": _generate(got),
        }


def _histogram(got: dict[str, list[Any]], family: str, scale: float = 1.0) -> dict[str, Any]:
    """One histogram merged over its labels: count, mean, p50/p95/p99 and cumulative buckets, values x `scale`."""
    cumulative: dict[float, float] = defaultdict(float)
    for s in got[f"{family}_bucket"]:
        cumulative[float(s.labels["le"])] += s.value
    count = sum(s.value for s in got[f"{family}_count"])
    total = sum(s.value for s in got[f"{family}_sum"])
    bounds = sorted(cumulative)
    counts = [cumulative[b] for b in bounds]
    out: dict[str, Any] = {"count": count, "mean": total / count * scale if count else None,
                           "le": [b * scale if math.isfinite(b) else None for b in bounds], "cumulative": counts}
    for q in QUANTILES:
        value = histogram_quantile(q, bounds, counts)
        out[f"p{round(q * 100)}"] = value * scale if value is not None else None
    return out


def _shadow(comparisons: list[Any], drift_sums: list[Any], drift_counts: list[Any]
            ) -> dict[str, dict[str, float | None]]:
    """Per rollout: shadow runs (`comparisons`), top-1 agreement rate over the runs that predict labels (None when
    none did: text embeddings), mean drift (1 - cosine) over all runs."""
    labelled: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # rollout -> [comparisons, agreeing]
    for s in comparisons:
        row = labelled[s.labels["rollout"]]
        row[0] += s.value
        row[1] += s.value if s.labels["agree"] == "true" else 0.0
    drift = {s.labels["rollout"]: s.value for s in drift_sums}
    out: dict[str, dict[str, float | None]] = {}
    for runs in drift_counts:  # every shadow run records a drift
        rollout = runs.labels["rollout"]
        if runs.value:
            compared, agreeing = labelled[rollout]
            out[rollout] = {"comparisons": runs.value, "agreement": agreeing / compared if compared else None,
                            "drift_mean": drift.get(rollout, 0.0) / runs.value}
    return out


def _base_cosine(got: dict[str, list[Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per rollout and drawn adapter: runs against the base (`samples`), mean cosine, and the 5th percentile (the
    cosine 95% of the runs reach) from the buckets."""
    cumulative: dict[tuple[str, str], dict[float, float]] = defaultdict(dict)
    for s in got["vislora_base_cosine_bucket"]:
        cumulative[s.labels["rollout"], s.labels["adapter"]][float(s.labels["le"])] = s.value
    sums = {(s.labels["rollout"], s.labels["adapter"]): s.value for s in got["vislora_base_cosine_sum"]}
    out: dict[str, dict[str, dict[str, float | None]]] = defaultdict(dict)
    for s in got["vislora_base_cosine_count"]:
        key = s.labels["rollout"], s.labels["adapter"]
        if s.value:
            bounds = sorted(cumulative[key])
            out[key[0]][key[1]] = {"samples": s.value, "mean": sums[key] / s.value, "p5": histogram_quantile(
                0.05, bounds, [cumulative[key][b] for b in bounds])}
    return dict(out)


def _feedback(got: dict[str, list[Any]]) -> dict[str, Any]:
    """Feedback per adapter (its answers, whichever rollout drew it) and per rollout arm (`arms`: each drawn
    adapter; `shadow`: the shadow's top-1 scored against the same labels): answers, labels, accuracy (top-1 ==
    label), clicks, click feedback and CTR = clicks / click feedback; None where nothing was counted."""
    arms: dict[tuple[str, str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for s in got["vislora_feedback_answers_total"]:
        arms[s.labels["rollout"], s.labels["adapter"], "primary"]["answers"] += s.value
    for s in got["vislora_feedback_labels_total"]:
        row = arms[s.labels["rollout"], s.labels["adapter"], s.labels["role"]]
        row["labels"] += s.value
        row["correct"] += s.value if s.labels["correct"] == "true" else 0.0
    for s in got["vislora_feedback_clicks_total"]:
        row = arms[s.labels["rollout"], s.labels["adapter"], "primary"]
        row["click_feedback"] += s.value
        row["clicks"] += s.value if s.labels["clicked"] == "true" else 0.0
    adapters: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    rollouts: dict[str, dict[str, dict[str, Any]]] = {}
    for (rollout, adapter, role), row in sorted(arms.items()):
        if role == "primary":
            for key, value in row.items():
                adapters[adapter][key] += value
        if rollout:
            arm = rollouts.setdefault(rollout, {"arms": {}, "shadow": {}})
            arm["arms" if role == "primary" else "shadow"][adapter] = _score(row, role)
    pending = got["vislora_feedback_pending"]
    return {"pending": pending[0].value if pending else 0.0, "rollouts": rollouts,
            "adapters": {name: _score(row, "primary") for name, row in sorted(adapters.items())}}


def _generate(got: dict[str, list[Any]]) -> dict[str, Any]:
    """Generated tokens (in all and per adapter), tokens/s of the last batched generate and its durations (ms)."""
    tokens = {s.labels["adapter"]: s.value for s in got["vislora_generated_tokens_total"]}
    speed = got["vislora_generate_tokens_per_second"]
    return {"tokens": sum(tokens.values()), "adapters": tokens, "tokens_per_s": speed[0].value if speed else 0.0,
            "seconds": _histogram(got, "vislora_generate_seconds", scale=1e3)}


def _score(row: dict[str, float], role: str) -> dict[str, float | None]:
    labels, clicked = row.get("labels", 0.0), row.get("click_feedback", 0.0)
    score = {"labels": labels, "accuracy": row.get("correct", 0.0) / labels if labels else None}
    if role == "primary":  # clicks are on the answer given: the shadow's was never shown
        score.update(answers=row.get("answers", 0.0), clicks=row.get("clicks", 0.0), click_feedback=clicked,
                     ctr=row.get("clicks", 0.0) / clicked if clicked else None)
    return score


def histogram_quantile(q: float, bounds: Sequence[float], cumulative: Sequence[float]) -> float | None:
    """PromQL's histogram_quantile: the q-quantile from cumulative bucket counts (upper bounds ascending, the
    last +Inf), linear inside the bucket it falls in; None without observations."""
    if not cumulative or cumulative[-1] <= 0:
        return None
    rank = q * cumulative[-1]
    for i, (bound, count) in enumerate(zip(bounds, cumulative, strict=True)):
        if count >= rank:
            if not math.isfinite(bound):  # past the last finite bucket: its bound is all that is known
                return bounds[i - 1] if i else None
            lower, below = (bounds[i - 1], cumulative[i - 1]) if i else (0.0, 0.0)
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
    return None
