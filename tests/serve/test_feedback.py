"""Drift against the base (a rollout whose shadow is @base) and feedback (POST /v1/feedback): request ids, the
per-arm accuracy and click-through arithmetic, and the 404/409/400 answers."""

import re
import uuid
from collections import defaultdict

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from serving import build_served, make_engine, serve_config

from vislora.errors import Conflict, ServeError, UnknownRequest
from vislora.serve import create_app
from vislora.serve.config import FeedbackSection, RolloutConfig
from vislora.serve.feedback import FeedbackBook
from vislora.serve.metrics import ServeMetrics
from vislora.serve.records import Output

ADMIN = {"Authorization": "Bearer admin-secret"}
FIELDS = {"auth": {"admin_token": "admin-secret"}, "batching": {"max_wait_ms": 2}}


@pytest.fixture
def served(tmp_path_factory):
    return build_served(tmp_path_factory)


def open_client(served, **extra):
    fields = {**FIELDS, **extra}
    return TestClient(create_app(make_engine(served, **fields), serve_config(served, **fields)))


def upload(served, index):
    return {"image": (f"img{index}.png", served["images"][index], "image/png")}


def samples(client, name, headers=None):
    """{labels as a sorted tuple of pairs: value} of one metric family's samples named `name` in /metrics."""
    families = text_string_to_metric_families(client.get("/metrics", headers=headers).text)
    return {tuple(sorted(s.labels.items())): s.value for f in families for s in f.samples if s.name == name}


def test_answers_carry_a_unique_request_id_in_the_body_and_the_header(served):
    with open_client(served) as client:
        answers = [client.post("/v1/predict", files=upload(served, i), data={"adapter": "a0"}) for i in range(3)]
        answers.append(client.post("/v1/embed", files=upload(served, 3), data={"adapter": "a1"}))
        answers.append(client.post("/v1/embed", files=upload(served, 4)))  # the base model
        ids = []
        for answer in answers:
            assert answer.status_code == 200, answer.text
            ids.append(answer.json()["request_id"])
            assert answer.headers["X-Request-Id"] == ids[-1]
            assert re.fullmatch("[0-9a-f]{32}", ids[-1]) and uuid.UUID(ids[-1]).version == 4
        assert len(set(ids)) == len(ids)
        assert client.get("/v1/stats").json()["feedback"]["pending"] == len(ids)


def test_a_base_shadow_records_the_offline_cosine_of_adapted_and_base_features(served):
    refs = served["refs"]
    with open_client(served) as client:
        rollout = {"weights": {"a0": 1, "a1": 1}, "shadow": "@base"}
        assert client.put("/v1/rollouts/drift", json=rollout, headers=ADMIN).status_code == 200
        drawn = defaultdict(list)
        for i in range(6):
            before = samples(client, "vislora_base_cosine_sum")
            body = client.post("/v1/predict", files=upload(served, i), data={"adapter": "drift"}).json()
            adapter = body["adapter"]
            assert body["rollout"] == "drift" and body["labels"][0]["index"] == int(refs[adapter].logits[i].argmax())
            key = (("adapter", adapter), ("rollout", "drift"))
            recorded = samples(client, "vislora_base_cosine_sum")[key] - before.get(key, 0.0)
            offline = float(torch.cosine_similarity(refs[adapter].features[i], refs[None].features[i], dim=0))
            assert recorded == pytest.approx(offline, abs=1e-5) and offline < 1 - 1e-3
            drawn[adapter].append(offline)
        assert set(drawn) == {"a0", "a1"}  # seed 0 draws both within 6 requests
        summary = client.get("/v1/stats").json()["base_cosine"]["drift"]
        for adapter, cosines in drawn.items():
            assert summary[adapter]["samples"] == len(cosines)
            assert summary[adapter]["mean"] == pytest.approx(sum(cosines) / len(cosines), abs=1e-5)
        assert samples(client, "vislora_samples_total")[(("adapter", "none"), ("role", "shadow"))] == 6
        refused = client.put("/v1/rollouts/bad", json={"weights": {"a0": 1}, "shadow": "@bse"}, headers=ADMIN)
        assert refused.status_code == 422 and "write shadow: '@base'" in refused.json()["detail"]


def test_feedback_accuracy_and_click_through_per_adapter_and_per_rollout_arm(served):
    refs, classes = served["refs"], served["refs"]["a0"].classes
    expected = defaultdict(lambda: defaultdict(float))  # (rollout, adapter, role) -> tallies
    with open_client(served) as client:
        rollout = {"weights": {"a0": 1, "a1": 1}, "shadow": "a2"}
        assert client.put("/v1/rollouts/ab", json=rollout, headers=ADMIN).status_code == 200
        for j in range(12):
            image, name = j % 8, "ab" if j < 8 else "a0"  # 8 through the rollout, 4 straight to a0
            body = client.post("/v1/predict", files=upload(served, image), data={"adapter": name}).json()
            rollout_name, adapter, top1 = body["rollout"] or "", body["adapter"], body["labels"][0]["label"]
            primary = expected[rollout_name, adapter, "primary"]
            primary["answers"] += 1
            feedback = {"request_id": body["request_id"]}
            if j % 4 != 1:
                feedback["label"] = classes[(j // 2) % 3]
            if j % 2:
                feedback["click"] = j % 3 == 0
            scored = client.post("/v1/feedback", json=feedback)
            assert scored.status_code == 200, scored.text
            scored = scored.json()
            if "label" in feedback:
                correct = top1 == feedback["label"]
                primary["labels"] += 1
                primary["correct"] += correct
                assert scored["correct"] is correct
                if rollout_name:
                    shadow_correct = classes[int(refs["a2"].logits[image].argmax())] == feedback["label"]
                    assert scored["shadow"] == "a2" and scored["shadow_correct"] is shadow_correct
                    expected[rollout_name, "a2", "shadow"]["labels"] += 1
                    expected[rollout_name, "a2", "shadow"]["correct"] += shadow_correct
            if "click" in feedback:
                primary["click_feedback"] += 1
                primary["clicks"] += feedback["click"]
        stats = client.get("/v1/stats").json()["feedback"]
        labels = samples(client, "vislora_feedback_labels_total")
        clicks = samples(client, "vislora_feedback_clicks_total")
        answers = samples(client, "vislora_feedback_answers_total")

    total = sum(t["labels"] for t in expected.values()), sum(t["correct"] for t in expected.values())
    assert 0 < total[1] < total[0]  # some labels right, some wrong: the arithmetic is exercised
    assert {k[1] for k in expected if k[0] == "ab" and k[2] == "primary"} == {"a0", "a1"}
    assert stats["pending"] == 0
    for (rollout_name, adapter, role), tally in expected.items():
        key = (("adapter", adapter), ("rollout", rollout_name))
        for correct in ("true", "false"):
            counted = labels.get((*key[:1], ("correct", correct), ("role", role), *key[1:]), 0.0)
            assert counted == (tally["correct"] if correct == "true" else tally["labels"] - tally["correct"])
        accuracy = tally["correct"] / tally["labels"] if tally["labels"] else None
        if role == "shadow":
            assert stats["rollouts"][rollout_name]["shadow"][adapter] == {"labels": tally["labels"],
                                                                         "accuracy": pytest.approx(accuracy)}
            continue
        for clicked in ("true", "false"):
            counted = clicks.get((*key[:1], ("clicked", clicked), *key[1:]), 0.0)
            assert counted == (tally["clicks"] if clicked == "true" else tally["click_feedback"] - tally["clicks"])
        assert answers[key] == tally["answers"]
        if rollout_name:
            arm = stats["rollouts"][rollout_name]["arms"][adapter]
            assert arm["labels"] == tally["labels"] and arm["accuracy"] == pytest.approx(accuracy)
            assert arm["click_feedback"] == tally["click_feedback"] and arm["answers"] == tally["answers"]
            assert arm["ctr"] == pytest.approx(tally["clicks"] / tally["click_feedback"])
    for adapter in ("a0", "a1"):  # per adapter: its answers whichever way it was reached
        rows = [t for (r, a, role), t in expected.items() if a == adapter and role == "primary"]
        got = stats["adapters"][adapter]
        assert got["labels"] == sum(t["labels"] for t in rows) and got["answers"] == sum(t["answers"] for t in rows)
        assert got["accuracy"] == pytest.approx(sum(t["correct"] for t in rows) / got["labels"])
        assert got["ctr"] == pytest.approx(sum(t["clicks"] for t in rows) / got["click_feedback"])


def test_feedback_refusals_unknown_expired_twice_bad_label_and_token(served):
    auth = {"Authorization": "Bearer client-secret"}
    with open_client(served, auth={**FIELDS["auth"], "client_token": "client-secret"},
                     feedback={"ttl_s": 60, "max_pending": 100}) as client:
        engine = client.app.state.engine
        now = [1000.0]
        engine.feedback.clock = lambda: now[0]

        def answer(image=0):
            return client.post("/v1/predict", files=upload(served, image), data={"adapter": "a1"},
                               headers=auth).json()["request_id"]

        def give(**body):
            return client.post("/v1/feedback", json=body, headers=auth)

        first, late = answer(0), answer(1)
        assert client.post("/v1/feedback", json={"request_id": first, "click": True}).status_code == 401
        unknown = give(request_id=uuid.uuid4().hex, click=True)
        assert unknown.status_code == 404 and unknown.json()["kind"] == "unknown_request"
        assert "was never issued by this server or was forgotten" in unknown.json()["detail"]

        bad = give(request_id=first, label="purple")
        classes = ", ".join(repr(c) for c in served["refs"]["a1"].classes)
        assert bad.status_code == 400 and bad.json()["detail"] == (
            f"label 'purple' is not one of adapter 'a1''s 3 classes ({classes}); send the true class by its name, "
            "as predict's labels spell it")
        neither = give(request_id=first)
        assert neither.status_code == 422 and "give a label (the true class), a click" in neither.json()["detail"]

        assert give(request_id=first, label=served["refs"]["a1"].classes[0]).status_code == 200  # refusals kept it
        twice = give(request_id=first, click=False)
        assert twice.status_code == 409 and twice.json()["detail"] == (
            f"request {first!r} already got its feedback (label {served['refs']['a1'].classes[0]!r}); each answer "
            "is counted once")

        now[0] += 59.5
        fresh = answer(2)
        now[0] += 0.5  # `late` is 60 s old: expired; `fresh` is not
        expired = give(request_id=late, click=True)
        assert expired.status_code == 404 and expired.json()["detail"] == (
            f"request {late!r} expired after 60 s without feedback (feedback.ttl_s); send feedback sooner or raise "
            "feedback.ttl_s")
        assert give(request_id=fresh, click=True).status_code == 200
        assert samples(client, "vislora_feedback_pending", auth) == {(): 0.0}  # /metrics takes the client token
        errors = client.get("/v1/stats", headers=auth).json()["errors"]
        assert errors["unknown_request"] == 2 and errors["conflict"] == 1 and errors["bad_request"] == 1


def output(request_id, logits=(0.1, 0.9), classes=("cat", "dog")):
    return Output(torch.tensor(logits), torch.zeros(2), "a", None, None, classes, 0.0, request_id=request_id)


def test_the_book_drops_the_oldest_beyond_max_pending_and_forgets_as_many_gone_ids():
    metrics = ServeMetrics()
    book = FeedbackBook(FeedbackSection(ttl_s=60, max_pending=2), metrics, clock=lambda: 0.0)
    for i in range(5):
        book.remember(output(f"r{i}"))
    assert book.pending == 2
    with pytest.raises(UnknownRequest, match=r"'r2' was dropped unanswered: more than 2 answers were waiting"):
        book.give("r2", click=True)
    with pytest.raises(UnknownRequest, match="'r0' was never issued by this server or was forgotten"):
        book.give("r0", click=True)  # the memory of gone ids holds two: r1 and r2
    scored = book.give("r4", label="dog", click=False)
    assert (scored.correct, scored.click, scored.shadow_correct) == (True, False, None)
    with pytest.raises(Conflict, match=r"'r4' already got its feedback \(label 'dog', click False\)"):
        book.give("r4", label="cat")
    assert book.give("r3", label="cat").correct is False
    snapshot = metrics.snapshot()["feedback"]["adapters"]["a"]
    assert snapshot == {"labels": 2, "accuracy": 0.5, "answers": 5, "clicks": 0, "click_feedback": 1, "ctr": 0.0}
    book.remember(Output(None, torch.zeros(2), "a", None, None, None, 0.0, request_id="text"))  # a text's embedding
    with pytest.raises(ServeError, match=r"'text' was answered by adapter 'a' without class scores .* send a click"):
        book.give("text", label="cat")
    assert book.give("text", click=True).click is True


def test_rollout_config_keeps_the_base_shadow_out_of_its_adapters():
    rollout = RolloutConfig(weights={"a": 1}, shadow="@base", shadow_fraction=0.5)
    assert rollout.adapters() == {"a"}
    with pytest.raises(ValueError, match="write shadow: '@base'"):
        RolloutConfig(weights={"a": 1}, shadow="@BASE")
