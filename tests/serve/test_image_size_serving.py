"""A server at another input side than its adapters were trained at: they load with a warning naming both sides and
answer; an adapter whose preprocessing differs is still refused."""

import json
import shutil

import pytest
import torch
from serving import build_served, make_engine

from vislora.errors import AdapterFileError, VisloraWarning
from vislora.formats import load_adapter
from vislora.tasks.classification import build_classifier


@pytest.fixture
def served(tmp_path_factory):
    return build_served(tmp_path_factory)


def base_at(served, side):
    model = served["task"]["model"]
    return {"spec": model["spec"], "pretrained": False, "kwargs": model["kwargs"], "num_classes": 3,
            "image_size": side}


def test_adapters_trained_at_32_px_answer_on_a_64_px_server_with_a_warning(served):
    with pytest.warns(VisloraWarning, match=r"adapter 'a0' .* trained at 32 px and runs at 64 px"):
        engine = make_engine(served, names=("a0",), base=base_at(served, 64))
    with engine:
        assert engine.input_spec.size == 64 and engine.input_spec.position_embeddings == "native"
        pixels = engine.preprocess(served["images"][0])
        assert pixels.shape == (3, 64, 64)
        prediction = engine.predict(served["images"][0], adapter="a0", k=3)
        output = engine.submit(pixels, "a0").result()
    assert {label.label for label in prediction.labels} == set(served["task"]["classes"])
    torch.manual_seed(0)  # offline: the base the server built (random weights drawn at 64 px), a0 loaded on it
    base, _ = build_classifier(**{k: v for k, v in base_at(served, 64).items() if k != "kwargs"},
                               **served["task"]["model"]["kwargs"])
    with torch.no_grad():
        expected = load_adapter(base, served["dirs"]["a0"]).eval()(pixels[None])[0]
    assert torch.allclose(output.logits, expected, atol=1e-5, rtol=0)


def test_another_preprocessing_is_refused_even_when_only_the_size_may_differ(served, tmp_path):
    other = shutil.copytree(served["dirs"]["a3"], tmp_path / "other")
    task = json.loads((other / "task.json").read_text())
    task["input"]["mean"] = [0.4, 0.4, 0.4]
    (other / "task.json").write_text(json.dumps(task))
    with pytest.warns(VisloraWarning, match="runs at 64 px"), make_engine(served, names=("a0",),
                                                                          base=base_at(served, 64)) as engine:
        with pytest.raises(AdapterFileError, match=r"input transform: adapter \{'mean': \(0\.4, 0\.4, 0\.4\)"):
            engine.load("other", other)
        assert [a.name for a in engine.adapters()] == ["a0"]
