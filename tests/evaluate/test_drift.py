"""Embedding drift: per-image cosine similarity of base and adapted embeddings, summary and histogram."""

import numpy as np
import pytest
import torch

from vislora.evaluate import embedding_drift


def test_drift_of_identical_and_rotated_embeddings():
    x = torch.randn(50, 16)
    same = embedding_drift(x, x.clone())
    assert same.mean == pytest.approx(1.0) and same.p5 == pytest.approx(1.0) and sum(same.counts) == 50
    rotated = torch.cat([x[:, 8:], x[:, :8]], dim=1)
    expected = torch.nn.functional.cosine_similarity(x.double(), rotated.double())
    drift = embedding_drift(x, rotated)
    assert drift.mean == pytest.approx(expected.mean().item()) and drift.min == pytest.approx(expected.min().item())
    assert drift.p5 == pytest.approx(np.percentile(expected.numpy(), 5))
    assert sum(drift.counts) == 50 and drift.edges[0] <= drift.min and drift.edges[-1] >= 1.0
