"""The engine in-process: routed batches equal offline outputs, unload waits for in-flight requests, refusals."""

import json
import shutil
import threading
import time

import pytest
import torch
from serving import assert_matches, build_served, make_engine, serve_config

from vislora.errors import AdapterFileError, Busy, Conflict, ServeError, UnknownAdapter
from vislora.serve import build_engine


@pytest.fixture
def served(tmp_path_factory):
    return build_served(tmp_path_factory)


def wait_until(condition, timeout=20.0):
    """Poll a condition another thread makes true (a bounded wait, not standing in for work)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.005)


def test_mixed_adapter_batches_equal_offline_outputs(served):
    names = ["a0", "a1", None, "a2", "a0", "a1", None, "a2"] * 2
    images = [served["images"][i % 8] for i in range(len(names))]
    with make_engine(served, batching={"max_wait_ms": 200, "max_batch_size": 32}) as engine:
        futures = [engine.submit(engine.preprocess(image), name) for image, name in zip(images, names, strict=True)]
        outputs = [f.result() for f in futures]
        embeddings = engine.embed_many(images, names)
        forwards = engine.metrics.snapshot()["batch_size"]["count"]
    for i, (name, output, embedding) in enumerate(zip(names, outputs, embeddings, strict=True)):
        assert output.adapter == name and embedding.adapter == name
        assert output.digest == (None if name is None else engine.adapters()[int(name[1])].digest)
        assert_matches(output.logits, output.features, served["refs"][name], i % 8)
        assert torch.allclose(embedding.vector, served["refs"][name].features[i % 8], atol=1e-5, rtol=0)
    assert forwards <= 4, f"{2 * len(names)} requests took {forwards} forwards: they were not batched together"


def test_predict_many_names_labels_from_each_adapters_task(served):
    names = ["a0", "a1", "a2"]
    with make_engine(served) as engine:
        predictions = engine.predict_many(served["images"][:3], names, k=3)
        with pytest.raises(ServeError, match="name an adapter"):
            engine.predict(served["images"][0])
    for i, (name, prediction) in enumerate(zip(names, predictions, strict=True)):
        ref = served["refs"][name]
        probs = torch.softmax(ref.logits[i].double(), dim=-1)
        assert [label.index for label in prediction.labels] == probs.argsort(descending=True).tolist()
        assert [label.label for label in prediction.labels] == [ref.classes[label.index] for label in prediction.labels]
        assert prediction.labels[0].score == pytest.approx(probs.max().item(), abs=1e-6)


def test_base_predicts_when_its_classes_are_given(served):
    task = served["task"]
    base = {"spec": task["model"]["spec"], "pretrained": False, "kwargs": task["model"]["kwargs"],
            "num_classes": 3, "image_size": 32, "classes": ["x", "y", "z"]}
    with make_engine(served, names=(), base=base) as engine:
        prediction = engine.predict(served["images"][4], k=1)
    ref = served["refs"][None]
    assert prediction.adapter is None
    assert prediction.labels[0].label == "xyz"[int(ref.logits[4].argmax())]


def test_unload_lets_in_flight_requests_finish_and_refuses_new_ones(served):
    with make_engine(served) as engine:
        pixels = engine.preprocess(served["images"][1])
        with engine._model_lock:  # hold the model: the admitted requests cannot run yet
            futures = [engine.submit(pixels, "a1") for _ in range(3)]
            unloading = threading.Thread(target=engine.unload, args=("a1",))
            unloading.start()
            wait_until(lambda: "a1" not in [a.name for a in engine.adapters()])
            with pytest.raises(UnknownAdapter, match="'a1' is being loaded or unloaded"):
                engine.submit(pixels, "a1")
            assert unloading.is_alive() and not any(f.done() for f in futures)
        unloading.join(30)
        assert not unloading.is_alive()
        for future in futures:
            assert_matches(future.result().logits, None, served["refs"]["a1"], 1)
        assert "a1" not in engine.model.adapters
        with pytest.raises(UnknownAdapter, match="'a1' is not loaded"):
            engine.submit(pixels, "a1")


def test_adapter_for_another_base_is_refused_and_nothing_changes(served, tmp_path):
    other = shutil.copytree(served["dirs"]["a3"], tmp_path / "other")
    task = json.loads((other / "task.json").read_text())
    task["model"]["kwargs"]["depth"] = 3
    (other / "task.json").write_text(json.dumps(task))
    clip = shutil.copytree(served["dirs"]["a3"], tmp_path / "clip")
    (clip / "task.json").write_text(json.dumps({**task, "task": "contrastive"}))
    with make_engine(served) as engine:
        with pytest.raises(AdapterFileError, match=r"trained for another base model.*kwargs"):
            engine.load("other", other)
        with pytest.raises(AdapterFileError, match=r"is a dual_encoder adapter \('contrastive' task\) but this "
                                                   r"server's base is a classifier"):
            engine.load("clip", clip)
        with pytest.raises(Conflict, match="already loaded"):
            engine.load("a0", served["dirs"]["a3"])
        assert [a.name for a in engine.adapters()] == ["a0", "a1", "a2"]
        assert engine.model.adapters == ("a0", "a1", "a2")
        output = engine.submit(engine.preprocess(served["images"][0]), "a0").result()
    assert_matches(output.logits, output.features, served["refs"]["a0"], 0)


def test_reloading_a_name_serves_the_new_weights(served):
    with make_engine(served, names=("a0",)) as engine:
        pixels = engine.preprocess(served["images"][2])
        for source in ("a3", "a4", "a3"):
            engine.load("t", served["dirs"][source])
            output = engine.submit(pixels, "t").result()
            assert_matches(output.logits, output.features, served["refs"][source], 2)
            engine.unload("t")


def test_full_queue_answers_busy(served):
    with make_engine(served, batching={"max_queue": 1, "max_wait_ms": 0}) as engine:
        pixels = engine.preprocess(served["images"][0])
        with engine._model_lock:
            first = engine.submit(pixels, "a0")
            wait_until(lambda: engine.queue_depth == 0)  # the worker holds it, waiting for the model
            second = engine.submit(pixels, "a0")
            with pytest.raises(Busy, match="max_queue"):
                engine.submit(pixels, "a0")
        assert first.result() and second.result()
        assert engine.in_flight("a0") == 0  # the refused request was not left counted in flight


def test_a_random_init_base_is_rebuilt_from_its_runs_seed_whatever_the_global_seed(served):
    torch.manual_seed(123)  # not the run's seed: the engine must not depend on the caller's random state
    with build_engine(serve_config(served, ("a0",))) as engine:
        output = engine.submit(engine.preprocess(served["images"][3]), "a0").result()
    assert_matches(output.logits, output.features, served["refs"]["a0"], 3)


def test_a_shadow_run_is_counted_before_the_answer_and_never_changes_it(served, monkeypatch, caplog):
    canary = {"canary": {"weights": {"a0": 1}, "shadow": "a1"}}
    with make_engine(served, rollouts=canary) as engine:
        output = engine.submit(engine.preprocess(served["images"][0]), "canary").result()
        assert engine.metrics.snapshot()["shadow"]["canary"]["comparisons"] == 1  # no wait: counted already

    def broken(*args):
        raise RuntimeError("shadow bookkeeping broke")

    monkeypatch.setattr("vislora.serve.engine.record_shadow", broken)
    with make_engine(served, rollouts=canary) as engine:
        failed = engine.submit(engine.preprocess(served["images"][0]), "canary").result()
    for answer in (output, failed):
        assert (answer.adapter, answer.rollout) == ("a0", "canary")
        assert_matches(answer.logits, answer.features, served["refs"]["a0"], 0)
    assert "recording a shadow run of adapter 'a1' (rollout 'canary') failed" in caplog.text
