"""Latency of base, unmerged and merged forward passes, timed without touching the model."""

import math

import pytest
import torch

import vislora
from conftest import randomize_adapters, tensor_batches, tiny_classifier
from vislora.evaluate import measure_latency


@pytest.fixture
def classifier():
    base, head = tiny_classifier()
    return vislora.inject(base, vislora.AdapterConfig(rank=4, alpha=8, targets=["q", "v"], modules_to_save=[head]))


def test_latency_times_all_three_and_leaves_the_model_untouched(classifier):
    randomize_adapters(classifier)
    images = tensor_batches(1)[0]["image"]
    with torch.no_grad():
        before = classifier(images)
    latency = measure_latency(classifier, images, repeats=2)
    assert latency.batch_size == 4 and min(latency.base, latency.unmerged, latency.merged) > 0
    assert latency.merged_max_abs_diff < 1e-4 and not classifier.merged
    with torch.no_grad():
        assert torch.equal(classifier(images), before)  # timed on a merged copy: this model is untouched
    assert math.isclose(latency.throughput(latency.base), 4 / latency.base)


def test_latency_of_an_adapter_that_cannot_merge_has_no_merged_figure():
    base, _ = tiny_classifier()
    model = vislora.inject(base, vislora.AdapterConfig(rank=2, alpha=4, targets=["fc1"], method="molora"))
    latency = measure_latency(model, tensor_batches(1)[0]["image"], repeats=1)
    assert latency.merged is None and math.isnan(latency.merged_max_abs_diff) and latency.unmerged > 0
    assert not model.merged
