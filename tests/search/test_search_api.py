"""POST /v1/search through FastAPI's TestClient: mixed adapters, each query embedded by the engine and answered as
the library answers it; bad k, unknown index, wrong modality, another adapter version and corrupt files refused
with the reason; an index rebuilt while serving is reloaded."""

import base64
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from search_fixtures import build_runs

from vislora.registry import Registry
from vislora.search import AdapterIdentity, build_index, query
from vislora.serve import ServeConfig, build_engine, create_app


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return build_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def indexes(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("served-indexes")
    return {"v1": build_index(runs["images"], runs["classifier"], root / "v1").path,
            "v2": build_index(runs["images"], runs["classifier_v2"], root / "v2").path,
            "base": build_index(runs["images"], runs["classifier"], root / "base", base=True).path,
            "dual": build_index(runs["images"], runs["dual"], root / "dual").path}


def client_for(adapters: dict, indexes: dict, **fields) -> TestClient:
    config = ServeConfig.parse({"adapters": {k: str(v) for k, v in adapters.items()},
                                "indexes": {k: str(v) for k, v in indexes.items()},
                                "batching": {"max_batch_size": 8, "max_wait_ms": 20}, **fields})
    return TestClient(create_app(build_engine(config), config))


@pytest.fixture(scope="module")
def client(runs, indexes):
    with client_for({"v1": runs["classifier"], "v2": runs["classifier_v2"]},
                    {name: indexes[name] for name in ("v1", "v2", "base")},
                    limits={"max_search_k": 5}) as client:
        yield client


def images(runs):
    return sorted(runs["images"].rglob("*.png"))


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_mixed_adapters_search_their_own_indexes_as_the_library_does(client, runs, indexes):
    jobs = [(path, adapter, index) for path in images(runs)[::2]
            for adapter, index in (("v1", "v1"), ("v2", "v2"), (None, "base"))]

    def search(job):
        path, adapter, index = job
        return client.post("/v1/search", json={"image": b64(path), "adapter": adapter, "index": index, "k": 3})

    with ThreadPoolExecutor(8) as pool:  # concurrent requests: one micro-batch mixes the adapters
        responses = list(pool.map(search, jobs))
    for (path, adapter, index), response in zip(jobs, responses, strict=True):
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["adapter"], body["index"]) == (adapter, index)
        expected = query(indexes[index], image=path, k=3)
        assert [h["row"] for h in body["hits"]] == [h.row for h in expected]
        assert [h["score"] for h in body["hits"]] == pytest.approx([h.score for h in expected], abs=1e-5)
        assert body["hits"][0]["path"] == str(path) and body["hits"][0]["rank"] == 1
        assert body["adapter_sha256"] == (AdapterIdentity.of_folder(runs["classifier" if adapter == "v1" else
                                                                         "classifier_v2"]).sha256 if adapter else None)


def test_a_multipart_upload_searches_too(client, runs):
    path = images(runs)[3]
    response = client.post("/v1/search", files={"image": ("x.png", path.read_bytes(), "image/png")},
                           data={"adapter": "v1", "index": "v1", "k": "2"})
    assert response.status_code == 200, response.text
    assert response.json()["hits"][0]["path"] == str(path) and len(response.json()["hits"]) == 2


def test_bad_requests_are_refused_with_the_reason(client, runs):
    image = b64(images(runs)[0])
    response = client.post("/v1/search", json={"image": image, "adapter": "v1", "index": "v1", "k": 6})
    assert response.status_code == 400 and "k=6 is above the server's limit of 5 (limits.max_search_k)" in \
        response.json()["detail"]
    response = client.post("/v1/search", json={"image": image, "adapter": "v1", "index": "v1", "k": 0})
    assert response.status_code == 400 and "k: Input should be greater than or equal to 1" in response.json()["detail"]
    response = client.post("/v1/search", json={"image": image, "adapter": "v1", "index": "nope"})
    assert response.status_code == 404 and response.json()["kind"] == "unknown_index"
    assert "no index 'nope' on this server (indexes: ['base', 'v1', 'v2'])" in response.json()["detail"]
    response = client.post("/v1/search", json={"image": image, "adapter": "v1"})
    assert response.status_code == 400 and "name the index to search" in response.json()["detail"]
    response = client.post("/v1/search", json={"text": "a red picture", "adapter": "v1", "index": "v1"})
    assert response.status_code == 400
    assert "text queries need a dual encoder's joint image-text space" in response.json()["detail"]
    response = client.post("/v1/search", json={"image": image, "text": "red", "index": "v1"})
    assert response.status_code == 400 and "exactly one of image and text" in response.json()["detail"]
    response = client.post("/v1/search", json={"image": image, "adapter": "ghost", "index": "v1"})
    assert response.status_code == 404 and response.json()["kind"] == "unknown_adapter"


def test_a_query_embedded_by_another_adapter_version_is_refused(client, runs):
    image = b64(images(runs)[0])
    response = client.post("/v1/search", json={"image": image, "adapter": "v2", "index": "v1"})
    assert response.status_code == 409 and response.json()["kind"] == "conflict"
    detail = response.json()["detail"]
    for run in ("classifier", "classifier_v2"):
        assert AdapterIdentity.of_folder(runs[run]).sha256[:12] in detail
    assert "rebuild the index with the adapter in use: vislora index build" in detail
    response = client.post("/v1/search", json={"image": image, "index": "v1"})
    assert response.status_code == 409 and "embedded by the base model without an adapter" in response.json()["detail"]
    response = client.post("/v1/search", json={"image": image, "adapter": "v1", "index": "base"})
    assert response.status_code == 409 and "was built with the base model" in response.json()["detail"]


def test_corrupt_missing_and_rebuilt_indexes(runs, indexes, tmp_path):
    served = {"live": shutil.copytree(indexes["v1"], tmp_path / "live"),
              "broken": shutil.copytree(indexes["v1"], tmp_path / "broken"), "gone": tmp_path / "gone"}
    vectors = served["broken"] / "vectors.f32"
    vectors.write_bytes(vectors.read_bytes()[:-8])
    image = b64(images(runs)[5])
    with client_for({"v1": runs["classifier"], "v2": runs["classifier_v2"]}, served) as client:
        response = client.post("/v1/search", json={"image": image, "adapter": "v1", "index": "broken"})
        assert response.status_code == 400 and response.json()["kind"] == "IndexFileError"
        assert "vectors.f32 does not match the sha256" in response.json()["detail"]
        response = client.post("/v1/search", json={"image": image, "adapter": "v1", "index": "gone"})
        assert response.status_code == 400 and "<index gone> does not exist" in response.json()["detail"]
        assert client.post("/v1/search", json={"image": image, "adapter": "v1", "index": "live"}).status_code == 200
        assert client.post("/v1/search", json={"image": image, "adapter": "v2", "index": "live"}).status_code == 409
        build_index(runs["images"], runs["classifier_v2"], served["live"])  # rebuilt in place while serving
        response = client.post("/v1/search", json={"image": image, "adapter": "v2", "index": "live"})
        assert response.status_code == 200 and response.json()["hits"][0]["path"] == str(images(runs)[5])
        assert client.post("/v1/search", json={"image": image, "adapter": "v1", "index": "live"}).status_code == 409


def test_a_dual_encoder_server_answers_text_searches(runs, indexes):
    with client_for({"d1": runs["dual"], "d2": runs["dual_v2"]}, {"colours": indexes["dual"]}) as client:
        for text in ("a photo of a red picture", "blue"):
            response = client.post("/v1/search", json={"text": text, "adapter": "d1", "k": 4})  # the only index
            assert response.status_code == 200, response.text
            expected = query(indexes["dual"], text=text, k=4)
            assert [h["row"] for h in response.json()["hits"]] == [h.row for h in expected]
            assert [h["score"] for h in response.json()["hits"]] == pytest.approx([h.score for h in expected],
                                                                                 abs=1e-5)
        response = client.post("/v1/search", data={"text": "red", "adapter": "d1", "k": "2"})  # a form, no file
        assert response.status_code == 200 and len(response.json()["hits"]) == 2
        response = client.post("/v1/search", json={"text": "red", "adapter": "d2"})
        assert response.status_code == 409


def test_registry_adapters_are_checked_by_their_recorded_hashes(runs, indexes, tmp_path):
    root = tmp_path / "registry"
    registry = Registry(root)
    registry.add("colours", runs["classifier"], promote=True)
    registry.add("colours", runs["classifier_v2"])
    built = build_index(runs["images"], "registry:colours@1", tmp_path / "reg1", registry=root).path
    with client_for({"c1": "registry:colours@1", "c2": "registry:colours"}, {"reg1": built, "v2": indexes["v2"]},
                    registry=str(root)) as client:
        image = b64(images(runs)[1])
        response = client.post("/v1/search", json={"image": image, "adapter": "c1", "index": "reg1"})
        assert response.status_code == 200 and response.json()["adapter_sha256"] == \
            AdapterIdentity.of_files(registry.get("colours", 1).files, "x").sha256
        response = client.post("/v1/search", json={"image": image, "adapter": "c2", "index": "reg1"})
        assert response.status_code == 200  # the promoted version is version 1
        registry.promote("colours", 2)
        response = client.post("/v1/search", json={"image": image, "adapter": "c1", "index": "v2"})
        assert response.status_code == 409 and "registry:colours@1" in response.json()["detail"]


def test_rollouts_are_checked_on_the_adapter_that_answered(runs, indexes):
    rollouts = {"split": {"weights": {"v1": 1.0, "v2": 1.0}}}
    with client_for({"v1": runs["classifier"], "v2": runs["classifier_v2"]}, {"v1": indexes["v1"]},
                    rollouts=rollouts) as client:
        image = b64(images(runs)[0])
        codes = {client.post("/v1/search", json={"image": image, "adapter": "split"}).status_code for _ in range(16)}
        assert codes == {200, 409}


def test_search_is_counted_in_the_request_metrics(client, runs):
    client.post("/v1/search", json={"image": b64(images(runs)[0]), "adapter": "v1", "index": "v1"})
    assert 'vislora_request_seconds_count{endpoint="search"}' in client.get("/metrics").text


def test_clients_read_search_errors_without_server_paths_and_the_admin_reads_them_whole(runs, indexes, tmp_path):
    broken = shutil.copytree(indexes["v1"], tmp_path / "broken")
    (broken / "vectors.f32").write_bytes((broken / "vectors.f32").read_bytes()[:-8])
    admin = {"Authorization": "Bearer admin-secret"}
    image = b64(images(runs)[0])
    private = [str(tmp_path), str(indexes["v1"].parent), str(runs["classifier"]), str(runs["images"])]
    details = []
    with client_for({"v1": runs["classifier"], "v2": runs["classifier_v2"]}, {"v1": indexes["v1"], "broken": broken},
                    auth={"admin_token": "admin-secret"}) as client:
        for body in ({"image": image, "adapter": "v2", "index": "v1"}, {"image": image, "adapter": "v1",
                                                                         "index": "broken"}):
            seen = client.post("/v1/search", json=body)
            whole = client.post("/v1/search", json=body, headers=admin)
            assert seen.status_code == whole.status_code and seen.status_code in (400, 409)
            assert not [p for p in private if p in seen.json()["detail"]], seen.json()["detail"]
            assert [p for p in private if p in whole.json()["detail"]], whole.json()["detail"]
            details.append((seen.json()["detail"], whole.json()["detail"]))
    (stale, stale_admin), (corrupt, corrupt_admin) = details
    assert stale.startswith("index 'v1': the index <index v1> was built with adapter <the adapter it was built with> "
                            "(sha256 ")
    assert stale.endswith("rebuild the index with the adapter in use: vislora index build <the images it was built "
                          "from> --adapter <adapter v2> --out <index v1>")
    assert stale_admin.endswith(f"--adapter {runs['classifier_v2']} --out {indexes['v1']}")
    assert corrupt == ("<index broken>/vectors.f32 does not match the sha256 its index.json records: the index is "
                       "corrupt or was modified; rebuild it with `vislora index build`")
    assert corrupt_admin == corrupt.replace("<index broken>", str(broken))
