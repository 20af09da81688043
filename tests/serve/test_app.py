"""The HTTP API through FastAPI's TestClient: answers equal offline outputs, bad input gets clear 4xx answers."""

import base64
import math
from pathlib import Path

import pydicom
import pytest
import torch
from fastapi.testclient import TestClient
from serving import build_served, make_engine, offline, serve_config

from vislora.data import build_transform, load_image
from vislora.errors import AdapterFileError, ConfigError, ServeError
from vislora.runs import input_spec
from vislora.serve import build_engine, create_app
from vislora.serve.sources import base_from_task

ADMIN = {"Authorization": "Bearer admin-secret"}
CT = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"  # bundled with pydicom


@pytest.fixture
def served(tmp_path_factory):
    return build_served(tmp_path_factory)


@pytest.fixture
def client(served):
    fields = {"auth": {"admin_token": "admin-secret"}, "batching": {"max_wait_ms": 2}}
    engine = make_engine(served, **fields)
    with TestClient(create_app(engine, serve_config(served, **fields))) as client:
        yield client


def upload(served, index=0):
    return {"image": (f"img{index}.png", served["images"][index], "image/png")}


def scores(body):
    return {label["index"]: label["score"] for label in body["labels"]}


def assert_predict_matches(body, ref, image):
    expected = torch.softmax(ref.logits[image].double(), dim=-1)
    got = scores(body)
    assert len(got) == min(5, expected.shape[0])
    assert [label["index"] for label in body["labels"]] == expected.argsort(descending=True)[:len(got)].tolist()
    for index, score in got.items():
        assert math.isclose(score, expected[index].item(), abs_tol=1e-5)
    assert all(label["label"] == ref.classes[label["index"]] for label in body["labels"])


def test_predict_multipart_and_json_equal_offline(client, served):
    for i, adapter in enumerate(["a0", "a1", "a2", "a1"]):
        response = client.post("/v1/predict", files=upload(served, i), data={"adapter": adapter})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["adapter"] == adapter and body["rollout"] is None and len(body["digest"]) == 16
        assert_predict_matches(body, served["refs"][adapter], i)
    encoded = base64.b64encode(served["images"][3]).decode()
    response = client.post("/v1/predict", json={"image": f"data:image/png;base64,{encoded}", "adapter": "a2",
                                                "top_k": 2})
    assert response.status_code == 200, response.text
    assert len(response.json()["labels"]) == 2
    top2 = served["refs"]["a2"].logits[3].argsort(descending=True)[:2].tolist()
    assert [label["index"] for label in response.json()["labels"]] == top2


def test_embed_equals_offline_features_of_its_adapter_and_of_the_base(client, served):
    for adapter in ("a1", None):
        data = {"adapter": adapter} if adapter else {}
        response = client.post("/v1/embed", files=upload(served, 5), data=data)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["adapter"] == adapter and body["dim"] == len(body["embedding"])
        ref = served["refs"][adapter]
        assert torch.allclose(torch.tensor(body["embedding"]), ref.features[5], atol=1e-5, rtol=0)


def test_text_embeddings_are_refused_by_a_classifier_base_and_embed_needs_one_input(client, served):
    response = client.post("/v1/embed", json={"text": "a photo of a cat", "adapter": "a1"})
    assert response.status_code == 400 and "image classifier and embeds images only" in response.json()["detail"]
    response = client.post("/v1/embed", data={"text": "a cat", "adapter": "a1"})  # multipart, no file
    assert response.status_code == 400 and "image classifier" in response.json()["detail"]
    response = client.post("/v1/embed", json={"adapter": "a1"})
    assert response.status_code == 400 and "exactly one of image and text" in response.json()["detail"]
    with pytest.raises(ServeError, match="image classifier"):  # in-process, tokens made elsewhere
        client.app.state.engine.submit_text(torch.zeros(2, 4, dtype=torch.long), "a1")
    response = client.post("/v1/predict", data={"adapter": "a1"}, files={"other": ("x", b"x")})
    assert response.status_code == 400 and "file field named 'image'" in response.json()["detail"]


def test_predict_without_adapter_is_refused_when_the_base_head_names_nothing(client, served):
    response = client.post("/v1/predict", files=upload(served))
    assert response.status_code == 400
    assert "name an adapter" in response.json()["detail"] and "a0" in response.json()["detail"]


@pytest.mark.parametrize(("payload", "message"), [
    (b"this is not an image", "could not decode the upload"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "could not decode the upload"),
    (b"", "the image is empty"),
])
def test_malformed_image_gets_400_with_a_message(client, payload, message):
    response = client.post("/v1/predict", files={"image": ("x.png", payload, "image/png")}, data={"adapter": "a0"})
    assert response.status_code == 400
    assert message in response.json()["detail"] and response.json()["kind"] == "bad_image"


def test_truncated_image_and_bad_base64_get_400(client, served):
    cut = served["images"][0][: len(served["images"][0]) // 2]
    response = client.post("/v1/predict", files={"image": ("cut.png", cut, "image/png")}, data={"adapter": "a0"})
    assert response.status_code == 400 and "could not decode" in response.json()["detail"]
    response = client.post("/v1/predict", json={"image": "not base64 !!", "adapter": "a0"})
    assert response.status_code == 400 and "not valid base64" in response.json()["detail"]


def test_oversized_image_in_pixels_gets_413_naming_the_limit(served):
    engine = make_engine(served, limits={"max_image_pixels": 100})
    with TestClient(create_app(engine)) as client:
        response = client.post("/v1/predict", files=upload(served), data={"adapter": "a0"})
        dicom = client.post("/v1/predict", files={"image": ("ct.dcm", CT.read_bytes(), "application/dicom")},
                            data={"adapter": "a0"})
    assert response.status_code == 413 and response.json()["kind"] == "too_large"
    assert "40x40 = 1,600 pixels, above the limit of 100 pixels" in response.json()["detail"]
    assert "(limits.max_image_pixels)" in response.json()["detail"]
    assert dicom.status_code == 413 and "128x128 = 16,384 pixels" in dicom.json()["detail"]


def test_dicom_upload_is_read_as_training_reads_it(client, served):
    pixels = build_transform(input_spec(served["task"]), train=False)(load_image(CT))[None]
    expected = torch.softmax(offline(served["dirs"]["a1"], pixels, served["trained"]).logits[0].double(), dim=-1)
    response = client.post("/v1/predict", files={"image": ("ct.dcm", CT.read_bytes(), "application/dicom")},
                           data={"adapter": "a1", "top_k": 3})
    assert response.status_code == 200, response.text
    for label in response.json()["labels"]:
        assert math.isclose(label["score"], expected[label["index"]].item(), abs_tol=1e-5)
    jpeg_ls = CT.parent / "MR_small_jpeg_ls_lossless.dcm"  # no decoder installed for it
    response = client.post("/v1/predict", files={"image": ("mr.dcm", jpeg_ls.read_bytes(), "application/dicom")},
                           data={"adapter": "a1"})
    assert response.status_code == 400 and response.json()["kind"] == "bad_image"
    assert "JPEG-LS Lossless" in response.json()["detail"] and "pip install" in response.json()["detail"]


def test_unknown_adapter_gets_404_naming_the_loaded_ones(client, served):
    response = client.post("/v1/predict", files=upload(served), data={"adapter": "nope"})
    assert response.status_code == 404
    assert "'nope' is not loaded" in response.json()["detail"] and "a0" in response.json()["detail"]


def test_oversize_upload_is_rejected_with_413(served):
    fields = {"limits": {"max_upload_bytes": 2048}}
    engine = make_engine(served, **fields)
    big = served["images"][0] + b"\x00" * 4096
    with TestClient(create_app(engine, serve_config(served, **fields))) as client:
        response = client.post("/v1/predict", files={"image": ("big.png", big, "image/png")}, data={"adapter": "a0"})
        assert response.status_code == 413 and "above the limit of 2,048 bytes" in response.json()["detail"]

        def chunks():  # no Content-Length: the limit is enforced while reading
            for start in range(0, len(big), 512):
                yield big[start:start + 512]
        response = client.post("/v1/predict", content=chunks(), headers={"Content-Type": "application/json"})
        assert response.status_code == 413 and response.json()["kind"] == "too_large"
        snapshot = engine.metrics.snapshot()
    assert snapshot["errors"]["too_large"] == 2


def test_admin_endpoints_need_the_bearer_token(client, served):
    load = {"name": "a3", "path": str(served["dirs"]["a3"])}
    assert client.post("/v1/adapters", json=load).status_code == 401
    wrong = client.post("/v1/adapters", json=load, headers={"Authorization": "Bearer guess"})
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
    assert client.delete("/v1/adapters/a0").status_code == 401
    assert client.put("/v1/rollouts/r", json={"weights": {"a0": 1}}).status_code == 401
    assert [a["name"] for a in client.get("/v1/adapters").json()] == ["a0", "a1", "a2"]  # nothing changed

    loaded = client.post("/v1/adapters", json=load, headers=ADMIN)
    assert loaded.status_code == 201 and loaded.json()["name"] == "a3" and loaded.json()["bytes"] > 0
    response = client.post("/v1/predict", files=upload(served, 2), data={"adapter": "a3"})
    assert_predict_matches(response.json(), served["refs"]["a3"], 2)
    assert client.delete("/v1/adapters/a3", headers=ADMIN).status_code == 204
    assert client.post("/v1/predict", files=upload(served), data={"adapter": "a3"}).status_code == 404


def test_admin_endpoints_are_off_without_a_token(served, monkeypatch):
    monkeypatch.delenv("VISLORA_ADMIN_TOKEN", raising=False)
    with TestClient(create_app(make_engine(served))) as client:
        response = client.delete("/v1/adapters/a0", headers=ADMIN)
    assert response.status_code == 403 and "VISLORA_ADMIN_TOKEN" in response.json()["detail"]


def test_client_token_guards_inference_when_set(served, monkeypatch):
    monkeypatch.setenv("VISLORA_CLIENT_TOKEN", "client-secret")
    with TestClient(create_app(make_engine(served))) as client:
        assert client.post("/v1/predict", files=upload(served), data={"adapter": "a0"}).status_code == 401
        ok = client.post("/v1/predict", files=upload(served), data={"adapter": "a0"},
                         headers={"Authorization": "Bearer client-secret"})
        assert ok.status_code == 200
        assert client.get("/healthz").status_code == 200 and client.get("/v1/stats").status_code == 200
        assert client.get("/metrics").status_code == 401  # expose.metrics: client by default
        assert client.get("/metrics", headers={"Authorization": "Bearer client-secret"}).status_code == 200


@pytest.mark.parametrize("name", ["../etc", "a/b", "..", "-x", "x" * 65, "a b"])
def test_adapter_names_that_could_be_paths_are_refused(client, served, name):
    response = client.post("/v1/adapters", json={"name": name, "path": str(served["dirs"]["a3"])}, headers=ADMIN)
    assert response.status_code == 400 and "invalid adapter name" in response.json()["detail"]


def test_adapter_root_keeps_loads_inside_it(served):
    root = served["dirs"]["a3"].parent
    fields = {"auth": {"admin_token": "admin-secret"}, "adapter_root": str(root)}
    with TestClient(create_app(make_engine(served, **fields), serve_config(served, **fields))) as client:
        inside = client.post("/v1/adapters", json={"name": "a4", "path": "a4"}, headers=ADMIN)
        outside = client.post("/v1/adapters", json={"name": "x", "path": "../../etc"}, headers=ADMIN)
    assert inside.status_code == 201
    assert outside.status_code == 403 and "outside the adapter root" in outside.json()["detail"]


def test_loading_a_pickle_or_a_missing_folder_is_refused_and_serving_goes_on(client, served, tmp_path):
    pickle = tmp_path / "adapter_model.bin"
    pickle.write_bytes(b"not really")
    for path, message in ((str(pickle), "pickle"), (str(tmp_path / "none"), "not an adapter directory")):
        response = client.post("/v1/adapters", json={"name": "bad", "path": path}, headers=ADMIN)
        assert response.status_code == 400 and message in response.json()["detail"]
    assert client.post("/v1/predict", files=upload(served), data={"adapter": "a0"}).status_code == 200
    duplicate = client.post("/v1/adapters", json={"name": "a0", "path": str(served["dirs"]["a3"])}, headers=ADMIN)
    assert duplicate.status_code == 409


def test_shadow_never_changes_the_response_and_records_agreement_and_drift(client, served):
    rollout = {"weights": {"a0": 1.0}, "shadow": "a1", "shadow_fraction": 1.0}
    assert client.put("/v1/rollouts/canary", json=rollout, headers=ADMIN).status_code == 200
    direct = [client.post("/v1/predict", files=upload(served, i), data={"adapter": "a0"}).json() for i in range(6)]
    drawn = [client.post("/v1/predict", files=upload(served, i), data={"adapter": "canary"}).json()
             for i in range(6)]
    for i, (a, b) in enumerate(zip(direct, drawn, strict=True)):
        assert b["adapter"] == "a0" and b["rollout"] == "canary"
        assert [label["index"] for label in a["labels"]] == [label["index"] for label in b["labels"]]
        assert_predict_matches(b, served["refs"]["a0"], i)
    shadow = client.get("/v1/stats").json()["shadow"]["canary"]
    refs = served["refs"]
    agree = sum(int(refs["a0"].logits[i].argmax() == refs["a1"].logits[i].argmax()) for i in range(6))
    drift = sum(1 - float(torch.cosine_similarity(refs["a0"].features[i], refs["a1"].features[i], dim=0))
                for i in range(6)) / 6
    assert shadow["comparisons"] == 6 and shadow["agreement"] == pytest.approx(agree / 6)
    assert shadow["drift_mean"] == pytest.approx(drift, abs=1e-5) and drift > 1e-3
    metrics = client.get("/metrics").text
    assert 'vislora_samples_total{adapter="a1",role="shadow"} 6.0' in metrics


def test_rollouts_refuse_unloaded_adapters_and_pin_theirs(client):
    missing = client.put("/v1/rollouts/r", json={"weights": {"a0": 1, "zz": 1}}, headers=ADMIN)
    assert missing.status_code == 404 and "zz" in missing.json()["detail"]
    assert client.put("/v1/rollouts/r", json={"weights": {"a0": 1, "a1": 3}}, headers=ADMIN).status_code == 200
    pinned = client.delete("/v1/adapters/a1", headers=ADMIN)
    assert pinned.status_code == 409 and "rollouts ['r']" in pinned.json()["detail"]
    assert client.delete("/v1/rollouts/r", headers=ADMIN).status_code == 204
    assert client.delete("/v1/adapters/a1", headers=ADMIN).status_code == 204
    assert client.put("/v1/rollouts/a0", json={"weights": {"a2": 1}}, headers=ADMIN).status_code == 409


def test_operations_endpoints(client, served):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["reasons"] == []  # judged in tests/serve/test_health.py
    assert client.get("/readyz").json() == {"ready": True, "adapters": 3}
    client.post("/v1/predict", files=upload(served), data={"adapter": "a0"})
    metrics = client.get("/metrics").text
    for name in ("vislora_request_seconds_bucket", "vislora_queue_wait_seconds", "vislora_batch_size_bucket",
                 "vislora_adapters_loaded 3.0", 'vislora_adapter_bytes{adapter="a0"}', "process_resident_memory_bytes",
                 'vislora_samples_total{adapter="a0",role="primary"} 1.0'):
        assert name in metrics, name
    schema = client.get("/openapi.json").json()
    for path in ("/v1/predict", "/v1/embed", "/v1/adapters", "/v1/adapters/{name}", "/v1/rollouts",
                 "/v1/rollouts/{name}", "/healthz", "/readyz", "/metrics", "/dashboard"):
        assert path in schema["paths"], path
    assert not any(path.startswith("/v1/routes") for path in schema["paths"])  # renamed /v1/rollouts
    content = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data"}
    assert "<canvas" in client.get("/dashboard").text
    assert client.post("/v1/predict", content=b"x", headers={"Content-Type": "text/plain"}).status_code == 415
    two = client.post("/v1/predict", files=[("image", ("a.png", served["images"][0])),
                                            ("image", ("b.png", served["images"][1]))], data={"adapter": "a0"})
    assert two.status_code == 400 and "Too many files" in two.json()["detail"]
    assert client.get("/nowhere").json()["kind"] == "http_404"
    errors = client.get("/v1/stats").json()["errors"]
    assert errors["unsupported_media"] == 1 and errors["http_400"] == 1 and errors["http_404"] == 1


def test_weighted_rollout_answers_with_the_drawn_adapter_and_its_exact_output(client, served):
    assert client.put("/v1/rollouts/split", json={"weights": {"a0": 3, "a1": 1}}, headers=ADMIN).status_code == 200
    answered = []
    for i in range(40):
        body = client.post("/v1/predict", files=upload(served, i % 8), data={"adapter": "split"}).json()
        assert body["rollout"] == "split"
        assert_predict_matches(body, served["refs"][body["adapter"]], i % 8)
        answered.append(body["adapter"])
    assert set(answered) == {"a0", "a1"}  # P(a1 never drawn in 40) = 0.75**40 ~ 1e-5; the split itself is
    assert answered.count("a0") > answered.count("a1")  # measured on 4,000 draws in test_traffic.py
    listed = client.get("/v1/rollouts").json()
    assert listed == [{"name": "split", "weights": {"a0": 3.0, "a1": 1.0}, "shadow": None, "shadow_fraction": 1.0}]


def test_adapters_from_the_registry_by_version(served, tmp_path):
    from vislora.registry import Registry

    registry = Registry(tmp_path / "registry")
    registry.add("cats", served["dirs"]["a3"], metrics={}, promote=True)
    registry.add("cats", served["dirs"]["a4"], metrics={})
    # the tiny base is random init and a registry copy leaves its run folder (and run seed) behind: name the base
    base = base_from_task(served["task"]).model_dump()
    fields = {"auth": {"admin_token": "admin-secret"}, "registry": str(tmp_path / "registry"),
              "adapters": {"cats": "registry:cats"}, "base": base}
    engine = make_engine(served, **fields)
    assert engine.base_fingerprint == registry.get("cats", 1).base_fingerprint  # the base weights were compared
    with TestClient(create_app(engine, serve_config(served, **fields))) as client:
        listed = client.get("/v1/adapters", headers=ADMIN).json()
        assert [(a["name"], a["source"]) for a in listed] == [("cats", "registry:cats")]
        assert listed[0]["path"] == str(tmp_path / "registry" / "cats" / "1")
        body = client.post("/v1/predict", files=upload(served, 1), data={"adapter": "cats"}).json()
        assert_predict_matches(body, served["refs"]["a3"], 1)
        loaded = client.post("/v1/adapters", json={"name": "cats-next", "path": "registry:cats@latest"},
                             headers=ADMIN)
        assert loaded.status_code == 201 and loaded.json()["path"].endswith("cats/2")
        body = client.post("/v1/predict", files=upload(served, 1), data={"adapter": "cats-next"}).json()
        assert_predict_matches(body, served["refs"]["a4"], 1)
        missing = client.post("/v1/adapters", json={"name": "x", "path": "registry:dogs"}, headers=ADMIN)
        assert missing.status_code == 400 and "no adapter named 'dogs'" in missing.json()["detail"]


def test_a_registry_reference_without_a_registry_is_refused(served):
    with pytest.raises(ConfigError, match="no registry is set"):
        make_engine(served, adapters={"cats": "registry:cats"})


def test_requests_not_computed_in_time_get_504_and_waiting_ones_are_dropped(served):
    fields = {"limits": {"request_timeout_s": 0.3}, "batching": {"max_wait_ms": 0}}
    engine = make_engine(served, **fields)
    with TestClient(create_app(engine, serve_config(served, **fields))) as client:
        with engine._model_lock:  # the worker takes the first request and waits for the model
            running = client.post("/v1/predict", files=upload(served), data={"adapter": "a0"})
            waiting = client.post("/v1/predict", files=upload(served), data={"adapter": "a1"})
        for response in (running, waiting):
            assert response.status_code == 504 and "request_timeout_s" in response.json()["detail"]
        # the next request may take its time (a loaded test machine): it shows what the server computes now
        client.app.state.config = serve_config(served, **{**fields, "limits": {"request_timeout_s": 60}})
        after = client.post("/v1/predict", files=upload(served, 2), data={"adapter": "a1"})
        assert_predict_matches(after.json(), served["refs"]["a1"], 2)
        samples = {a["name"]: a["samples"] for a in client.get("/v1/stats").json()["adapters"]}
    assert samples["a0"] == 1 and samples["a1"] == 1  # the timed-out a1 request was never computed
    assert engine.in_flight("a0") == 0 and engine.in_flight("a1") == 0


def test_a_registry_adapter_registered_against_other_base_weights_is_refused(served, tmp_path):
    from vislora.registry import Registry

    Registry(tmp_path / "registry").add("cats", served["dirs"]["a3"], metrics={}, promote=True)
    fields = {"registry": str(tmp_path / "registry"), "base": base_from_task(served["task"]).model_dump()}
    torch.manual_seed(1)  # another draw of the random base: other weights, same architecture
    with build_engine(serve_config(served, names=(), **fields)) as engine:
        with pytest.raises(AdapterFileError, match="registered against other base weights"):
            engine.load("cats", "registry:cats")
        engine.load("plain", served["dirs"]["a3"])  # a plain folder carries no fingerprint to compare
