"""Least exposure: clients see no server paths (adapters, stats, error messages), the admin token sees them, the
serve config's `expose` section sets what else clients see, and loading a folder that is not an adapter names the
files an adapter needs without listing the folder."""

import pytest
from fastapi.testclient import TestClient
from serving import build_served, make_engine, serve_config

from vislora.errors import ConfigError
from vislora.serve import ServeConfig, create_app

ADMIN = {"Authorization": "Bearer admin-secret"}
CLIENT = {"Authorization": "Bearer client-secret"}
NEEDS = ("an adapter directory holds adapter_config.json and adapter_model.safetensors, as vislora's save_adapter and "
         "PEFT's save_pretrained write them")


@pytest.fixture
def served(tmp_path_factory):
    return build_served(tmp_path_factory)


def app_client(served, **fields) -> TestClient:
    fields = {"auth": {"admin_token": "admin-secret"}, "batching": {"max_wait_ms": 2}, **fields}
    return TestClient(create_app(make_engine(served, **fields), serve_config(served, **fields)))


def test_clients_see_no_server_paths_and_the_admin_sees_them(served):
    folders = [str(served["dirs"][n]) for n in ("a0", "a1", "a2")]
    with app_client(served) as client:
        listed = client.get("/v1/adapters")
        stats = client.get("/v1/stats")
        admin = client.get("/v1/adapters", headers=ADMIN).json()
        admin_stats = client.get("/v1/stats", headers=ADMIN).json()
    for response in (listed, stats):
        assert response.status_code == 200
        assert not [f for f in folders if f in response.text]
        assert str(served["trained"].parent) not in response.text  # nor the run folder above them
    assert [set(a) for a in listed.json()] == [{"name", "digest", "classes", "bytes", "loaded_at"}] * 3
    assert [set(a) for a in stats.json()["loaded"]] == [{"name", "digest", "classes", "bytes", "loaded_at"}] * 3
    assert [a["name"] for a in listed.json()] == ["a0", "a1", "a2"] and listed.json()[0]["bytes"] > 0
    assert [(a["path"], a["source"]) for a in admin] == list(zip(folders, folders, strict=True))
    assert [a["path"] for a in admin_stats["loaded"]] == folders


def test_expose_names_the_adapter_fields_clients_see(served):
    with app_client(served, expose={"adapter_fields": ["name", "source"]}) as client:
        listed = client.get("/v1/adapters").json()
        loaded = client.get("/v1/stats").json()["loaded"]
    assert listed == loaded == [{"name": n, "source": str(served["dirs"][n])} for n in ("a0", "a1", "a2")]
    with pytest.raises(ConfigError, match=r"expose.adapter_fields: Value error, adapter_fields must include name"):
        ServeConfig.parse({"base": {"spec": "timm:x", "num_classes": 2}, "expose": {"adapter_fields": ["bytes"]}})
    with pytest.raises(ConfigError, match=r"expose.adapter_fields.0: Input should be 'name', 'source', 'path'"):
        ServeConfig.parse({"base": {"spec": "timm:x", "num_classes": 2}, "expose": {"adapter_fields": ["owner"]}})


@pytest.mark.parametrize(("expose", "anyone", "client", "admin"), [
    ({}, {"/v1/stats": 200, "/metrics": 401}, {"/v1/stats": 200, "/metrics": 200}, {"/v1/stats": 200, "/metrics": 200}),
    ({"stats": "client", "metrics": "open"}, {"/v1/stats": 401, "/metrics": 200}, {"/v1/stats": 200, "/metrics": 200},
     {"/v1/stats": 200, "/metrics": 200}),
    ({"stats": "admin", "metrics": "admin"}, {"/v1/stats": 401, "/metrics": 401}, {"/v1/stats": 401, "/metrics": 401},
     {"/v1/stats": 200, "/metrics": 200}),
])
def test_expose_sets_who_reads_stats_and_metrics(served, monkeypatch, expose, anyone, client, admin):
    monkeypatch.setenv("VISLORA_CLIENT_TOKEN", "client-secret")
    with app_client(served, expose=expose) as http:
        for headers, expected in (({}, anyone), (CLIENT, client), (ADMIN, admin)):
            assert {path: http.get(path, headers=headers).status_code for path in expected} == expected, headers
        assert http.get("/dashboard").status_code == 200 and http.get("/healthz").status_code == 200


def test_without_a_client_token_client_endpoints_stay_open(served, monkeypatch):
    monkeypatch.delenv("VISLORA_CLIENT_TOKEN", raising=False)
    with app_client(served) as client:
        assert client.get("/metrics").status_code == 200 and client.get("/v1/stats").status_code == 200


def test_a_folder_that_is_not_an_adapter_is_named_not_listed(served, tmp_path):
    (tmp_path / "someone-elses-notes.txt").write_text("private")
    (tmp_path / "adapter_config.json").write_text("{}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with app_client(served) as client:
        answers = {path: client.post("/v1/adapters", json={"name": "x", "path": str(path)}, headers=ADMIN)
                   for path in (tmp_path, empty, "/etc")}
    assert answers[tmp_path].json() == {"kind": "AdapterFileError", "detail": (
        f"{tmp_path} is not an adapter directory: adapter_model.safetensors is missing ({NEEDS})")}
    assert answers[empty].json()["detail"] == (
        f"{empty} is not an adapter directory: adapter_model.safetensors is missing ({NEEDS})")
    assert answers["/etc"].status_code == 400
    assert answers["/etc"].json()["detail"] == (
        f"/etc is not an adapter directory: adapter_model.safetensors is missing ({NEEDS})")


def test_the_adapter_file_check_names_both_missing_files(tmp_path):
    from vislora.formats import find_adapter_files

    (tmp_path / "README.md").write_text("x")
    with pytest.raises(Exception) as caught:
        find_adapter_files(tmp_path)
    assert str(caught.value) == (f"{tmp_path} is not an adapter directory: adapter_config.json and "
                                 f"adapter_model.safetensors are missing ({NEEDS})")


def test_client_error_messages_name_server_folders_by_what_they_are(served, monkeypatch):
    """Redaction of the paths the server knows, as every 4xx handler applies it (the search errors that reach
    clients are checked end to end in tests/search/test_search_api.py)."""
    from starlette.requests import Request

    from vislora.serve.exposure import detail_for, server_paths

    with app_client(served, adapter_root=str(served["trained"].parent)) as client:
        app = client.app
    folder = str(served["dirs"]["a1"])
    message = f"{folder}/adapter_model.safetensors is not readable; root {served['trained'].parent}"

    def request(headers):
        scope = {"type": "http", "app": app, "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
                 "method": "GET", "path": "/", "query_string": b""}
        return Request(scope)

    assert detail_for(request({}), message) == ("<adapter a1>/adapter_model.safetensors is not readable; root "
                                                 "<adapter_root>")
    assert detail_for(request(CLIENT), message) == detail_for(request({}), message)
    assert detail_for(request(ADMIN), message) == message
    assert server_paths(request({}))[folder] == "<adapter a1>"
