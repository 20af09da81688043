"""Base vs adapted: per-group deltas, regressions beyond the tolerance, McNemar's exact test, JSON output."""

import json

import pytest
import torch

from vislora.evaluate import Outputs, compare, mcnemar_p, points


def test_mcnemar_p_values_and_point_wording():
    assert mcnemar_p(5, 0) == 2 / 32 and mcnemar_p(0, 6) == 2 / 64 and mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(3, 3) == 1.0 and mcnemar_p(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert points(0.01) == "1 point" and points(0.025) == "2.5 points"


def test_group_regressions_are_flagged_beyond_the_tolerance():
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    right = torch.nn.functional.one_hot(labels, 2).float() * 4
    wrong = right.flip(-1)
    metadata = [{"site": s} for s in ("a", "a", "b", "b", "c", "c")]
    adapted = torch.cat([wrong[:2], right[2:]])  # site a: 1.0 -> 0.0, site b: 0.0 -> 1.0, site c: same
    base = torch.cat([right[:2], wrong[2:4], right[4:]])
    result = compare(Outputs(base), Outputs(adapted), labels, ["x", "y"], metadata, tolerance=0.01)
    groups = {d.name: d for d in result.per_group["site"]}
    assert groups["a"].regression and groups["a"].delta == -1.0 and groups["a"].n == 2
    assert (groups["a"].lost, groups["a"].gained, groups["a"].p_value) == (2, 0, 0.5)  # 2 * (1/2)^2
    assert not groups["b"].regression and not groups["c"].regression
    assert [d.name for d in result.regressions] == ["a"]
    assert result.drift is None
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["regressions"][0]["name"] == "a" and data["per_group"]["site"][0]["delta"] == -1.0
