"""Multilabel adapters served: the attributes above their saved thresholds, beside single-label adapters."""

import json
import shutil

import pytest
import torch
from fastapi.testclient import TestClient
from serving import build_served, make_engine, serve_config

from vislora.data import AttributeSet
from vislora.serve import create_app
from vislora.tasks.multilabel import attribute_scores


@pytest.fixture
def served(tmp_path_factory):
    return build_served(tmp_path_factory)


@pytest.fixture
def tagger(served):
    """Adapter a0's weights saved as a multilabel adapter: its 3 outputs are attributes, class0/class1 a
    single-choice group, each threshold midway between the 4th and 5th highest score of the 8 test images (half
    pass, and no score sits on a threshold where float rounding could decide)."""
    folder = served["dirs"]["a0"].parent / "tag0"
    if not folder.is_dir():
        shutil.copytree(served["dirs"]["a0"], folder)
        task = json.loads((folder / "task.json").read_text())
        attributes = AttributeSet(tuple(task["classes"]), {"g": tuple(task["classes"][:2])}, ("g",))
        scores = attribute_scores(served["refs"]["a0"].logits, attributes)
        task.update(task="multilabel", attributes=attributes.to_dict(),
                    thresholds={"names": task["classes"], "values": scores.sort(0).values[3:5].mean(0).tolist()})
        (folder / "task.json").write_text(json.dumps(task))
    task = json.loads((folder / "task.json").read_text())
    return folder, AttributeSet.from_dict(task["attributes"]), torch.tensor(task["thresholds"]["values"])


def expected_tags(served, tagger, image):
    _, attributes, thresholds = tagger
    scores = attribute_scores(served["refs"]["a0"].logits[image:image + 1].double(), attributes)[0]
    order = scores.argsort(descending=True).tolist()
    return [(attributes.names[i], scores[i].item()) for i in order if scores[i] >= thresholds[i]]


def test_mixed_batch_of_tagger_and_classifier_answers_each_its_own_way(served, tagger):
    names = ["tag0", "a1", "tag0", "a1", "tag0", "tag0", "a1", "tag0"]
    fields = {"adapters": {"a1": str(served["dirs"]["a1"]), "tag0": str(tagger[0])},
              "batching": {"max_wait_ms": 200, "max_batch_size": 16}}
    with make_engine(served, **fields) as engine:
        predictions = engine.predict_many(served["images"], names, k=2)
    seen_counts = set()
    for i, (name, prediction) in enumerate(zip(names, predictions, strict=True)):
        if name == "a1":
            probs = torch.softmax(served["refs"]["a1"].logits[i].double(), dim=-1)
            assert not prediction.multilabel and len(prediction.labels) == 2
            assert [label.index for label in prediction.labels] == probs.argsort(descending=True)[:2].tolist()
            continue
        want = expected_tags(served, tagger, i)
        assert prediction.multilabel
        assert [label.label for label in prediction.labels] == [name for name, _ in want]
        assert [label.score for label in prediction.labels] == pytest.approx([s for _, s in want], abs=1e-5)
        assert all(label.threshold == pytest.approx(tagger[2][label.index].item()) for label in prediction.labels)
        seen_counts.add(len(want))
    assert len(seen_counts) > 1  # images differ in how many attributes pass: thresholds are in use


def test_predict_endpoint_returns_the_attributes_above_their_thresholds(served, tagger):
    config = serve_config(served, adapters={"tag0": str(tagger[0])}, batching={"max_wait_ms": 2})
    with TestClient(create_app(make_engine(served, adapters={"tag0": str(tagger[0])}), config)) as client:
        for i in range(4):
            response = client.post("/v1/predict", files={"image": ("x.png", served["images"][i], "image/png")},
                                   data={"adapter": "tag0", "top_k": "1"})
            assert response.status_code == 200, response.text
            body = response.json()
            want = expected_tags(served, tagger, i)
            assert body["multilabel"] is True
            assert [(label["label"], label["score"]) for label in body["labels"]] == [
                (name, pytest.approx(score, abs=1e-5)) for name, score in want]
            assert all(label["threshold"] is not None for label in body["labels"])
