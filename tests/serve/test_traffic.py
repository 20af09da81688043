"""Rollouts: weighted splits follow the weights, shadow draws follow their fraction, seeds repeat."""

import math
from collections import Counter

import pytest

from vislora.serve.config import RolloutConfig
from vislora.serve.traffic import Assignment, TrafficPolicy

N = 4000


def tolerance(p, n=N, sds=5):
    """5 binomial standard deviations of a share p over n draws: a correct split lands outside it with
    probability < 1e-6 (so any seed passes); a split off by more than ~0.03 at n=4000 fails."""
    return sds * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("weights", [{"v1": 0.8, "v2": 0.2}, {"a": 1, "b": 2, "c": 7}, {"only": 5, "off": 0}])
def test_weighted_split_follows_the_weights(weights):
    policy = TrafficPolicy({"r": RolloutConfig(weights=weights)}, seed=3)
    counts = Counter(policy.assign("r").adapter for _ in range(N))
    total = sum(weights.values())
    for name, weight in weights.items():
        share = weight / total
        assert abs(counts[name] / N - share) <= tolerance(share), (name, counts)
    assert set(counts) == {n for n, w in weights.items() if w > 0}


def test_shadow_runs_on_its_fraction_of_requests_and_never_answers():
    policy = TrafficPolicy({"r": RolloutConfig(weights={"v1": 1}, shadow="v2", shadow_fraction=0.25)}, seed=0)
    draws = [policy.assign("r") for _ in range(N)]
    assert all(d.adapter == "v1" and d.rollout == "r" for d in draws)
    shadowed = sum(d.shadow == "v2" for d in draws) / N
    assert abs(shadowed - 0.25) <= tolerance(0.25)


def test_same_seed_same_split_and_plain_names_pass_through():
    rollout = RolloutConfig(weights={"a": 1, "b": 1}, shadow="c", shadow_fraction=0.5)
    first, second = (TrafficPolicy({"r": rollout}, seed=11) for _ in range(2))
    assert [first.assign("r") for _ in range(200)] == [second.assign("r") for _ in range(200)]
    assert first.assign("a") == Assignment("a") and first.assign(None) == Assignment(None)
    assert first.using("c") == ["r"] and first.using("zzz") == []


def test_a_shadow_equal_to_the_drawn_primary_is_dropped():
    policy = TrafficPolicy({"r": RolloutConfig(weights={"a": 1}, shadow="a")})
    assert policy.assign("r") == Assignment("a", "r", None)


@pytest.mark.parametrize("weights", [{}, {"a": -1, "b": 2}, {"a": 0}])
def test_bad_weights_are_refused(weights):
    with pytest.raises(ValueError, match="weights"):
        RolloutConfig(weights=weights)
