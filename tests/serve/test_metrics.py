"""Metrics: PromQL-style quantiles from buckets, and the JSON snapshot built from the Prometheus registry."""

import math

import numpy as np
import pytest

from vislora.serve.metrics import ServeMetrics, histogram_quantile

INF = math.inf


@pytest.mark.parametrize(("q", "expected"), [
    (0.5, 1.5),  # rank 20 of 40: halfway through the (1, 2] bucket, which holds ranks 11..30
    (0.25, 1.0 + 1.0 * (10 - 10) / 20),  # rank 10: the top of the first bucket
    (0.1, 0.4),  # rank 4 in (0, 1], which holds 10
    (0.75, 2.0 + 2.0 * (30 - 30) / 10),
    (0.9, 2.0 + 2.0 * (36 - 30) / 10),
])
def test_histogram_quantile_interpolates_inside_the_bucket_like_promql(q, expected):
    assert histogram_quantile(q, [1, 2, 4, INF], [10, 30, 40, 40]) == pytest.approx(expected)


def test_histogram_quantile_edges():
    assert histogram_quantile(0.5, [1, INF], [0, 0]) is None
    assert histogram_quantile(0.99, [1, 2, INF], [1, 1, 10]) == 2  # in +Inf: the last finite bound
    assert histogram_quantile(0.5, [], []) is None


def test_snapshot_reads_back_what_was_observed():
    metrics = ServeMetrics()
    rng = np.random.default_rng(0)
    latencies = rng.uniform(0.012, 0.018, size=200)  # all inside the (0.01, 0.02] bucket
    for seconds in latencies:
        metrics.latency.labels("predict").observe(seconds)
    for size in (1, 4, 4, 16):
        metrics.batch_size.observe(size)
    metrics.samples.labels("a", "primary").inc(7)
    metrics.samples.labels("none", "primary").inc(2)
    metrics.samples.labels("b", "shadow").inc(3)
    metrics.errors.labels("bad_image").inc()
    metrics.loaded({"a": 1000, "b": 24})
    metrics.loaded({"a": 1000}, gone="b")
    for agree, drift in ((True, 0.01), (True, 0.03), (False, 0.2)):
        metrics.shadow.labels("r", "a", "b", str(agree).lower()).inc()
        metrics.drift.labels("r").observe(drift)
    metrics.bind_queue(lambda: 5)
    snap = metrics.snapshot()
    assert snap["latency"]["count"] == 200
    assert snap["latency"]["mean"] == pytest.approx(latencies.mean() * 1e3)
    assert 10 <= snap["latency"]["p50"] <= 20 and snap["latency"]["p50"] == pytest.approx(15.0)  # 10 + 10 * 0.5
    assert snap["batch_size"]["mean"] == pytest.approx(25 / 4)
    assert snap["samples"] == 9 and snap["base_samples"] == 2 and snap["shadow_samples"] == 3
    assert snap["errors"] == {"bad_image": 1}
    assert snap["adapters"] == [{"name": "a", "bytes": 1000, "samples": 7}]
    assert snap["memory"]["adapter_bytes"] == 1000 and snap["memory"]["rss_bytes"] > 0
    assert snap["queue_depth"] == 5
    assert snap["shadow"]["r"] == pytest.approx({"comparisons": 3, "agreement": 2 / 3, "drift_mean": 0.08})
    assert b'vislora_adapter_bytes{adapter="b"}' not in metrics.exposition()
