"""Serving dual encoders: text and image embeddings and prompt-classifier predictions, each sample routed to its own
adapter, equal to the adapter loaded offline (`load_trained_dual`); the HTTP text endpoint; what is refused."""

import io
import json
import shutil

import pytest
import torch
from dual_fixtures import COLOR_NAMES, dual_train_config, save_towers
from fastapi.testclient import TestClient

import vislora
from synthetic_images import image_folder
from vislora.dual_encoder import build_dual_encoder
from vislora.errors import AdapterFileError, ServeError
from vislora.run_config import TrainConfig
from vislora.runs import load_trained_dual
from vislora.serve import ServeConfig, build_engine, create_app
from vislora.serve.dual import DualEngine
from vislora.tasks.clip import text_classifier
from vislora.train.trainer import Trainer

TEXTS = ["a photo of a red picture", "blue", "a green picture of the long caption that goes on", "una foto de rojo"]
LABELS = ["class0", "class1", "class2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two contrastive adapters (projections and logit scale trained per adapter): one trained, one derived from it
    with seeded weights; a captions-only copy (no classes); and test images."""
    root = tmp_path_factory.mktemp("dual")
    towers = save_towers(root / "towers")
    folder = image_folder(root / "images", per_class=4)
    config = dual_train_config(root / "run", towers, folder, optim={"batch_size": 6, "max_steps": 4})
    trained = Trainer(TrainConfig.parse(config)).fit().adapter_dir
    derived = root / "run" / "derived"
    model, task = load_trained_dual(trained)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.adapter_parameters("default"):
            param.add_(torch.randn(param.shape, generator=gen) * 0.2)
    vislora.save_adapter(model, derived, "default")
    (derived / "task.json").write_text(json.dumps(task))
    captions = shutil.copytree(derived, root / "run" / "captions")
    (captions / "task.json").write_text(json.dumps({**task, "classes": [], "class_names": []}))
    images = sorted(folder.rglob("*.png"))[::2]
    return {"a": trained, "b": derived, "captions": captions, "towers": towers, "images": images}


def reference(adapter_dir):
    """What the adapter computes offline: text and image embeddings, and its prompt-classifier logits."""
    model, task = load_trained_dual(adapter_dir)

    @torch.no_grad()
    def compute(texts, pixels):
        text = torch.cat([model.embed_texts([t]) for t in texts])  # one at a time: no padding
        image = model.encode_image(pixels)
        logits = None
        if task["class_names"]:
            weights = text_classifier(model.base_model, task["class_names"], task["templates"])
            logits = model.logit_scale() * image @ weights.T
        return text, image, logits

    return model, compute


@pytest.fixture(scope="module")
def engine(runs):
    config = ServeConfig.parse({"adapters": {"a": str(runs["a"]), "b": str(runs["b"]),
                                             "captions": str(runs["captions"])},
                                "batching": {"max_batch_size": 8, "max_wait_ms": 20}})
    with build_engine(config) as engine:
        yield engine


def pixels_of(engine, runs):
    return torch.stack([engine.preprocess(path) for path in runs["images"]])


def test_mixed_adapter_batches_of_texts_and_images_equal_each_adapter_offline(engine, runs):
    assert isinstance(engine, DualEngine) and engine.base.kind == "dual_encoder"
    pixels = pixels_of(engine, runs)
    refs = {}
    for name in ("a", "b"):
        model, compute = reference(runs[name])
        refs[name] = compute(TEXTS, pixels)
        with model.disabled():
            refs[None] = (*compute(TEXTS, pixels)[:2], None)
    assert not torch.allclose(refs["a"][0], refs["b"][0], atol=1e-3)  # the adapters differ: the test can fail
    names = ["a", "b", None, "a", "b", "b", None, "a"]
    texts = [TEXTS[i % len(TEXTS)] for i in range(len(names))]
    for i, (out, name) in enumerate(zip(engine.embed_texts(texts, names), names, strict=True)):
        assert out.adapter == name and out.vector.shape == (16,)
        assert torch.allclose(out.vector, refs[name][0][i % len(TEXTS)], atol=1e-5, rtol=0), (i, name)
    names = ["b", "a", None, "a", "b", "a"][: len(pixels)]
    embeddings = engine.embed_many(list(runs["images"]), names)
    predictions = engine.predict_many(list(runs["images"]), [n or "a" for n in names], k=3)
    for i, name in enumerate(names):
        assert torch.allclose(embeddings[i].vector, refs[name][1][i], atol=1e-5, rtol=0), (i, name)
        scores = torch.softmax(refs[name or "a"][2][i].double(), dim=-1)
        got = {label.label: label.score for label in predictions[i].labels}
        assert got == pytest.approx({LABELS[c]: float(scores[c]) for c in range(3)}, abs=1e-5)
    jobs = []  # texts and images queued together: each batch holds one modality, every answer is its own
    for i, name in enumerate(names):
        jobs.append(("text", i, name, engine.submit_text(engine.preprocess_text(TEXTS[i % len(TEXTS)]), name)))
        jobs.append(("image", i, name, engine.submit(pixels[i], name)))
    for kind, i, name, future in jobs:
        expected = refs[name][0][i % len(TEXTS)] if kind == "text" else refs[name][1][i]
        assert torch.allclose(future.result().features, expected, atol=1e-5, rtol=0), (kind, i, name)


def test_captions_only_adapters_embed_but_do_not_predict(engine, runs):
    with pytest.raises(ServeError, match="'captions' was trained without class labels"):
        engine.predict(runs["images"][0], adapter="captions")
    with pytest.raises(ServeError, match=r"predicts without one only when base\.classes"):
        engine.predict(runs["images"][0])
    _, compute = reference(runs["captions"])
    text, image, logits = compute(TEXTS[:1], pixels_of(engine, runs)[:1])
    assert logits is None
    assert torch.allclose(engine.embed_text(TEXTS[0], "captions").vector, text[0], atol=1e-5, rtol=0)
    assert torch.allclose(engine.embed(runs["images"][0], "captions").vector, image[0], atol=1e-5, rtol=0)


def test_bad_texts_are_refused_with_the_fix(engine):
    with pytest.raises(ServeError, match="the text is empty"):
        engine.embed_text("   ", "a")
    with pytest.raises(ServeError, match=r"limits\.max_text_chars"):
        engine.embed_text("red " * 5000, "a")
    with pytest.raises(ServeError, match="expected a text string, got int"):
        engine.embed_texts([3], ["a"])


def test_a_shadowed_rollout_records_drift_for_texts_and_agreement_for_images(runs):
    config = ServeConfig.parse({"adapters": {"a": str(runs["a"]), "b": str(runs["b"])},
                                "rollouts": {"live": {"weights": {"a": 1}, "shadow": "b"}}})
    with build_engine(config) as engine:
        out = engine.embed_text(TEXTS[0], "live")
        assert (out.adapter, out.rollout) == ("a", "live")
        assert torch.allclose(out.vector, engine.embed_text(TEXTS[0], "a").vector, atol=1e-6)
        drift = 1 - float(out.vector @ engine.embed_text(TEXTS[0], "b").vector)
        shadow = engine.metrics.snapshot()["shadow"]["live"]
        assert shadow == pytest.approx({"comparisons": 1, "agreement": None, "drift_mean": drift}, abs=1e-5)
        assert drift > 1e-3
        engine.predict(runs["images"][0], "live")
        shadow = engine.metrics.snapshot()["shadow"]["live"]
        assert shadow["comparisons"] == 2 and shadow["agreement"] in (0.0, 1.0)


def test_http_embed_takes_a_text_as_json_or_form_fields(engine, runs):
    _, compute = reference(runs["b"])
    text, image, _ = compute(TEXTS[:2], pixels_of(engine, runs)[:1])
    client = TestClient(create_app(engine, close_engine=False))
    for request in ({"json": {"text": TEXTS[1], "adapter": "b"}}, {"data": {"text": TEXTS[1], "adapter": "b"}},
                    {"files": {"text": (None, TEXTS[1])}, "data": {"adapter": "b"}}):
        response = client.post("/v1/embed", **request)
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["adapter"], body["dim"]) == ("b", 16)
        assert torch.allclose(torch.tensor(body["embedding"]), text[1], atol=1e-5, rtol=0)
    image_bytes = runs["images"][0].read_bytes()
    response = client.post("/v1/embed", files={"image": ("x.png", io.BytesIO(image_bytes), "image/png")},
                           data={"adapter": "b"})
    assert response.status_code == 200 and torch.allclose(torch.tensor(response.json()["embedding"]), image[0],
                                                          atol=1e-5, rtol=0)
    both = client.post("/v1/embed", files={"image": ("x.png", image_bytes, "image/png")},
                       data={"text": "red", "adapter": "b"})
    assert both.status_code == 400 and "exactly one of image and text" in both.json()["detail"]
    assert client.post("/v1/embed", json={"text": "", "adapter": "b"}).status_code == 400
    missing = client.post("/v1/embed", json={"text": "red", "adapter": "nope"})
    assert missing.status_code == 404 and "'nope' is not loaded" in missing.json()["detail"]
    refused = client.post("/v1/predict", json={"image": "aGk=", "adapter": "captions"})
    assert refused.status_code == 400 and "no classes to predict" in refused.json()["detail"]


def test_a_configured_base_predicts_its_zero_shot_classes_and_hot_loads_adapters(runs):
    vision, text = runs["towers"]
    classes = list(COLOR_NAMES.values())
    templates = ["a photo of a {}", "a {} picture"]
    base = {"kind": "dual_encoder", "spec": f"hf:{vision}", "text": f"hf:{text}", "embed_dim": 16, "image_size": 32,
            "classes": classes, "templates": templates}
    with build_engine(ServeConfig.parse({"base": base})) as engine:
        offline = build_dual_encoder(f"hf:{vision}", f"hf:{text}", embed_dim=16).eval()
        with torch.no_grad():
            logits = offline.logit_scale() * offline.encode_image(pixels_of(engine, runs)[:1]) @ text_classifier(
                offline, classes, templates).T
        top = engine.predict(runs["images"][0], k=1).labels[0]
        assert top.label == classes[int(logits.argmax())]
        assert top.score == pytest.approx(float(torch.softmax(logits[0].double(), -1).max()), abs=1e-5)
        engine.load("b", runs["b"])
        assert engine.predict(runs["images"][0], "b", k=3).labels[0].label in LABELS
        engine.unload("b")
        assert "b" not in engine._heads


def test_a_run_over_frozen_adapters_is_served_as_their_exact_sum(engine, runs, tmp_path):
    config = dual_train_config(tmp_path / "run", runs["towers"], runs["images"][0].parent.parent,
                               task={"class_names": {"class0": "rojo", "class1": "verde", "class2": "azul"},
                                     "templates": ["una foto de {}"]},
                               adapter={"vision_targets": None, "train_heads": False,
                                        "frozen": {"shared": str(runs["b"])}},
                               optim={"batch_size": 6, "max_steps": 2})
    spanish = Trainer(TrainConfig.parse(config)).fit().adapter_dir
    _, compute = reference(spanish)  # the frozen adapter active beneath the trained one
    text, image, logits = compute(TEXTS, pixels_of(engine, runs))
    before = set(engine.model.adapters)
    engine.load("es", spanish)
    try:
        assert set(engine.model.adapters) == before | {"es"}  # the parts are gone, one adapter routes
        for i, out in enumerate(engine.embed_texts(TEXTS, ["es", "a", "es", "es"])):
            if i != 1:
                assert torch.allclose(out.vector, text[i], atol=1e-5, rtol=0), i
        for i, prediction in enumerate(engine.predict_many(list(runs["images"]), ["es"] * len(runs["images"]), 3)):
            scores = torch.softmax(logits[i].double(), dim=-1)
            got = {label.label: label.score for label in prediction.labels}
            assert got == pytest.approx({LABELS[c]: float(scores[c]) for c in range(3)}, abs=1e-5)
        assert torch.allclose(engine.embed(runs["images"][1], "es").vector, image[1], atol=1e-5, rtol=0)
    finally:
        engine.unload("es")
    gone = shutil.copytree(spanish, tmp_path / "gone")
    task = json.loads((gone / "task.json").read_text())
    (gone / "task.json").write_text(json.dumps({**task, "frozen": {"shared": str(tmp_path / "nowhere")}}))
    with pytest.raises(AdapterFileError, match=r"trained over the frozen adapters .* which are not there"):
        engine.load("gone", gone)
    assert set(engine.model.adapters) == before


def test_a_run_on_a_base_prepared_in_python_is_refused(engine, runs, tmp_path):
    folder = shutil.copytree(runs["b"], tmp_path / "prepared")
    task = json.loads((folder / "task.json").read_text())
    (folder / "task.json").write_text(json.dumps({**task, "prepared_base": True}))
    with pytest.raises(AdapterFileError, match="prepared in Python"):
        engine.load("prepared", folder)
    assert "prepared" not in engine.model.adapters
