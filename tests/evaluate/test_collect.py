"""A classifier run with and without its adapters over the same batches."""

import pytest
import torch

import vislora
from conftest import randomize_adapters, tensor_batches, tiny_classifier
from vislora.evaluate import collect


@pytest.fixture
def classifier():
    base, head = tiny_classifier()
    return vislora.inject(base, vislora.AdapterConfig(rank=4, alpha=8, targets=["q", "v"], modules_to_save=[head]))


def test_collect_runs_base_and_adapted_on_the_same_images(classifier):
    run = collect(classifier, tensor_batches())
    base, adapted = run.base, run.adapted
    assert run.skipped == [3]  # the corrupt image the second batch reported
    assert torch.equal(base.logits, adapted.logits) and torch.equal(base.embeddings, adapted.embeddings)  # B = 0
    randomize_adapters(classifier)
    run = collect(classifier, tensor_batches())
    base, adapted, labels, rows = run.base, run.adapted, run.labels, run.rows
    images = torch.cat([b["image"] for b in tensor_batches()])
    with torch.no_grad():
        assert torch.allclose(adapted.logits, classifier(images), atol=1e-5)
        with classifier.disabled():
            base_features = classifier.base_model.features(images)
        trained_head = classifier.base_model.head.current()
        assert torch.allclose(base.logits, trained_head(base_features), atol=1e-5)
        original = collect(classifier, tensor_batches(), base_head="original").base
        with classifier.disabled():
            assert torch.allclose(original.logits, classifier(images), atol=1e-5)
    assert not torch.allclose(base.logits, adapted.logits) and [r["index"] for r in rows] == list(range(8))
    assert labels.tolist() == [0, 1, 2, 0, 0, 1, 2, 0]
    with pytest.raises(vislora.ConfigError, match="base_head must be 'trained' or 'original', got 'own'"):
        collect(classifier, tensor_batches(), base_head="own")
