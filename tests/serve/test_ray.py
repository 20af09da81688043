"""vislora.serve.ray on a real local Ray cluster (2 replicas, started here): answers equal the direct engine's,
requests land on a replica that holds their adapter, replicas batch, and evicted adapters leave the engine."""

import base64
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from serving import build_served, make_engine, serve_config
from typer.testing import CliRunner

from vislora.cli import app as cli
from vislora.errors import ConfigError
from vislora.registry import Registry
from vislora.serve import create_app
from vislora.serve.ray import app_builder, build_app, run
from vislora.serve.sources import base_from_task

pytestmark = pytest.mark.slow
IN_CONFIG = ("a0", "a1", "a2", "a4")  # a3 is served from the registry by its name alone
ADAPTERS = ("a0", "a1", "a2", "a3")  # the working set: 2 replicas x 2 adapters each


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fields(served, registry) -> dict:
    # the tiny base is random init and the registry copy leaves its run seed behind: name the base, seed it
    return {"base": base_from_task(served["task"]).model_dump(), "registry": str(registry),
            "batching": {"max_batch_size": 8, "max_wait_ms": 100}}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    import ray
    from ray import serve

    served = build_served(tmp_path_factory)
    registry = tmp_path_factory.mktemp("registry")
    Registry(registry).add("a3", served["dirs"]["a3"], metrics={}, promote=True)
    config = serve_config(served, IN_CONFIG, port=free_port(), **fields(served, registry))
    for attempt in range(3):  # on a loaded machine the node's agents may start too late for the raylet
        try:
            ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False,
                     _temp_dir=str(tmp_path_factory.mktemp("ray")))
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    try:
        run(config, replicas=2, max_adapters=2, base_seed=0)
        engine = make_engine(served, (*IN_CONFIG, "a3"), adapters={
            **{n: str(served["dirs"][n]) for n in IN_CONFIG}, "a3": "registry:a3"}, **fields(served, registry))
        with TestClient(create_app(engine)) as direct, httpx.Client(base_url=f"http://127.0.0.1:{config.port}",
                                                                   timeout=120) as http:
            yield {"served": served, "http": http, "direct": direct}
    finally:
        serve.shutdown()
        ray.shutdown()


def predict(client, served, adapter, image, top_k=3):
    body = {"image": base64.b64encode(served["images"][image]).decode(), "top_k": top_k}
    return client.post("/v1/predict", json={**body, **({"adapter": adapter} if adapter else {})})


def assert_same(ray_answer: dict, direct_answer: dict) -> None:
    """The same adapter, file and labels, scores to 1e-5; no request id on Ray (POST /v1/feedback is not there)."""
    assert ray_answer["request_id"] is None and direct_answer["request_id"]
    assert {k: v for k, v in ray_answer.items() if k not in ("labels", "request_id")} == {
        k: v for k, v in direct_answer.items() if k not in ("labels", "request_id")}
    assert [(x["label"], x["index"]) for x in ray_answer["labels"]] == [
        (x["label"], x["index"]) for x in direct_answer["labels"]]
    assert max(abs(x["score"] - y["score"]) for x, y in zip(ray_answer["labels"], direct_answer["labels"],
                                                            strict=True)) <= 1e-5


def warm(http, served) -> None:
    """Send each adapter of the working set one request in turn until a whole pass finds every adapter already on
    its replica (bounded): Ray learns where adapters are from the replicas, a little after they load."""
    for _ in range(8):
        if all(predict(http, served, name, 0).headers["x-vislora-cold"] == "0" for name in ADAPTERS):
            return
    raise AssertionError(f"the adapters never settled on the replicas: {http.get('/v1/replicas').json()}")


def test_mixed_adapters_answer_as_the_direct_engine_on_the_replica_holding_them(deployment):
    http, direct, served = deployment["http"], deployment["direct"], deployment["served"]
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").status_code == 200
    warm(http, served)
    before = http.get("/v1/replicas").json()
    assert len(before) == 2 and all(len(r["adapters"]) == 2 for r in before.values())
    holder = {name: replica for replica, r in before.items() for name in r["adapters"]}
    assert sorted(holder) == list(ADAPTERS)  # the replicas split the working set: neither holds it all

    jobs = [(ADAPTERS[i % 4], i % len(served["images"])) for i in range(24)]
    with ThreadPoolExecutor(12) as pool:  # concurrent, mixed adapters
        answers = list(pool.map(lambda job: predict(http, served, *job), jobs))
    for (name, image), answer in zip(jobs, answers, strict=True):
        assert answer.status_code == 200, answer.text
        assert_same(answer.json(), predict(direct, served, name, image).json())
        assert answer.headers["x-vislora-replica"] == holder[name]  # placed by adapter: never a cold load
        assert answer.headers["x-vislora-cold"] == "0"
    after = http.get("/v1/replicas").json()
    for replica, note in after.items():
        assert note["loads"] == before[replica]["loads"]
        batches, samples = (note[k] - before[replica][k] for k in ("batches", "samples"))
        assert samples == 12 and batches < samples  # concurrent requests shared forward passes in the replica

    image = base64.b64encode(served["images"][2]).decode()
    for name in ("a1", "a3"):
        ray_embed = http.post("/v1/embed", json={"image": image, "adapter": name}).json()
        direct_embed = direct.post("/v1/embed", json={"image": image, "adapter": name}).json()
        assert (ray_embed["adapter"], ray_embed["digest"], ray_embed["dim"]) == (
            direct_embed["adapter"], direct_embed["digest"], direct_embed["dim"])
        assert torch.allclose(torch.tensor(ray_embed["embedding"]), torch.tensor(direct_embed["embedding"]),
                              atol=1e-5, rtol=0)
    upload = http.post("/v1/predict", files={"image": ("x.png", served["images"][1])}, data={"adapter": "a2"})
    assert_same(upload.json(), predict(direct, served, "a2", 1).json())


def test_a_new_adapter_evicts_the_least_recently_used_one_from_its_replica(deployment):
    http, direct, served = deployment["http"], deployment["direct"], deployment["served"]
    warm(http, served)
    before = http.get("/v1/replicas").json()
    answer = predict(http, served, "a4", 3)
    assert answer.headers["x-vislora-cold"] == "1"
    assert_same(answer.json(), predict(direct, served, "a4", 3).json())
    replica = answer.headers["x-vislora-replica"]
    note = http.get("/v1/replicas").json()[replica]
    kept = [n for n in before[replica]["adapters"] if n in note["adapters"]]
    assert len(note["adapters"]) == 2 and "a4" in note["adapters"] and len(kept) == 1  # one left the engine
    assert note["loads"] == before[replica]["loads"] + 1
    evicted = next(n for n in before[replica]["adapters"] if n not in note["adapters"])
    again = predict(http, served, evicted, 4)  # loaded again wherever Ray places it, same answer
    assert_same(again.json(), predict(direct, served, evicted, 4).json())


def test_errors_answer_as_the_direct_server(deployment):
    http, direct, served = deployment["http"], deployment["direct"], deployment["served"]
    base = predict(http, served, None, 0)  # the base head names no classes: the replica refuses, as the engine
    expected = predict(direct, served, None, 0).json()  # it lists the adapters loaded: here, the replica's
    assert (base.status_code, base.json()["kind"]) == (400, expected["kind"])
    assert base.json()["detail"].partition(")")[2] == expected["detail"].partition(")")[2]
    unknown = predict(http, served, "zz", 0)
    assert unknown.status_code == 404
    assert unknown.json() == {"kind": "unknown_adapter", "detail": "no adapter 'zz' on this deployment (its "
                              "config's adapters: ['a0', 'a1', 'a2', 'a4']; in the registry: ['a3']); add it with "
                              "`vislora registry add zz RUN/adapter`"}
    bad = predict(http, served, "../a0", 0)
    assert (bad.status_code, bad.json()["detail"]) == (400, "invalid adapter name '../a0': use 1-64 letters, "
                                                            "digits, '_' or '-', starting with a letter")
    assert http.post("/v1/predict", content=b"x", headers={"content-type": "text/plain"}).json()["kind"] == (
        "unsupported_media")


def test_rollouts_and_bad_counts_are_refused_before_ray_starts(tmp_path_factory):
    served = build_served(tmp_path_factory)
    rollouts = serve_config(served, ("a0",), rollouts={"r": {"weights": {"a0": 1}}})
    with pytest.raises(ConfigError, match=r"rollouts \(\['r'\]\) are not served on Ray"):
        build_app(rollouts, 2)
    with pytest.raises(ConfigError, match="replicas must be at least 1, got 0"):
        build_app(serve_config(served, ("a0",)), 0)
    result = CliRunner().invoke(cli, ["serve", "-a", f"a0={served['dirs']['a0']}", "--replicas", "2"])
    assert result.exit_code != 0 and "--replicas and --max-adapters-per-replica need --ray" in str(result.exception)


def test_ray_tools_build_the_application_from_a_config_file(tmp_path_factory):
    from ray.serve import Application

    served = build_served(tmp_path_factory)
    config = tmp_path_factory.mktemp("conf") / "serve.yaml"
    config.write_text(f"adapters:\n  a0: {served['dirs']['a0']}\n")
    assert isinstance(app_builder({"config": str(config), "replicas": "2", "max_adapters": "4"}), Application)
    with pytest.raises(ConfigError, match=r"app_builder takes config=PATH .*got \['replica'\]"):
        app_builder({"replica": "2"})
