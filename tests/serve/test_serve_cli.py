"""`vislora serve`: flags become a ServeConfig; the command starts a server that answers."""

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from serving import build_served
from typer.testing import CliRunner

from vislora.cli import app
from vislora.cli.serve import build_config
from vislora.errors import ConfigError


@pytest.fixture
def served(tmp_path_factory):
    return build_served(tmp_path_factory)


def test_help_teaches_with_an_example():
    result = CliRunner().invoke(app, ["serve", "--help"])
    assert result.exit_code == 0
    assert "Example: VISLORA_ADMIN_TOKEN=secret vislora serve -a cats=runs/cats/adapter" in " ".join(
        result.output.split())


def test_flags_and_config_file_combine(tmp_path, served):
    (tmp_path / "conf").mkdir()
    config = tmp_path / "conf" / "serve.yaml"  # its relative adapter paths are read from its folder
    config.write_text("adapters:\n  a0: ../run/a0\nbatching:\n  max_batch_size: 8\n"
                      "rollouts:\n  r:\n    weights: {a0: 1}\n")
    (tmp_path / "run").symlink_to(served["dirs"]["a0"].parent)
    cfg = build_config(config, [f"a1={served['dirs']['a1']}"], None, None, None, False, "127.0.0.1", 9000,
                       ["batching.max_wait_ms=7"])
    assert cfg.adapters == {"a0": str(tmp_path / "conf" / "../run/a0"), "a1": str(served["dirs"]["a1"].resolve())}
    assert (cfg.batching.max_batch_size, cfg.batching.max_wait_ms, cfg.port) == (8, 7.0, 9000)
    assert set(cfg.rollouts) == {"r"}
    base = build_config(None, [], "timm:vit_tiny_patch16_224", 10, 64, True, None, None, [])
    assert (base.base.spec, base.base.num_classes, base.base.image_size, base.base.pretrained) == (
        "timm:vit_tiny_patch16_224", 10, 64, False)
    dual = build_config(None, [], "asset:dinov2-small", None, 112, False, None, None, [],
                        text="asset:all-minilm-l6-v2")
    assert (dual.base.kind, dual.base.text, dual.base.num_classes) == ("dual_encoder", "asset:all-minilm-l6-v2", None)
    clip = build_config(None, [], "open_clip:ViT-B-32", None, None, False, None, None, [], dual_encoder=True)
    assert (clip.base.kind, clip.base.text) == ("dual_encoder", None)
    with pytest.raises(ConfigError, match="give --base too"):
        build_config(None, [], None, None, None, False, None, None, [], text="asset:all-minilm-l6-v2")


def test_the_old_routes_key_is_refused_naming_its_new_name(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("base: {spec: 'timm:vit_tiny_patch16_224', num_classes: 3}\n"
                      "routes:\n  r:\n    weights: {a0: 1}\n")
    with pytest.raises(ConfigError, match=r"`routes` was renamed `rollouts`.*got routes: \{'r': \{'weights'"):
        build_config(config, [], None, None, None, False, None, None, [])


@pytest.mark.parametrize(("args", "message"), [
    ((None, ["a0"], None, None, None, False), "is not NAME=DIR"),
    ((None, [], "timm:vit_tiny_patch16_224", None, None, False), "--base needs --num-classes"),
    ((None, [], None, 10, None, False), "give --base too"),
    ((None, [], None, None, None, False), "give a base model"),
])
def test_bad_flags_name_the_fix(args, message):
    with pytest.raises(ConfigError, match=message):
        build_config(*args, None, None, [])


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_command_serves_until_stopped(served):
    port = free_port()
    env = {**os.environ, "VISLORA_ADMIN_TOKEN": "s3cret"}
    process = subprocess.Popen([sys.executable, "-m", "vislora.cli", "serve", "-a", f"a0={served['dirs']['a0']}",
                                "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            deadline = time.monotonic() + 120
            while True:  # waiting for the process to listen (bounded)
                try:
                    if http.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert process.poll() is None, process.stdout.read()
                assert time.monotonic() < deadline, "the server did not become ready in 120 s"
                time.sleep(0.2)
            response = http.post("/v1/predict", files={"image": ("x.png", served["images"][0])}, data={"adapter": "a0"})
            assert response.status_code == 200 and response.json()["adapter"] == "a0"
            assert [a["name"] for a in http.get("/v1/adapters").json()] == ["a0"]
            assert http.delete("/v1/adapters/a0", headers={"Authorization": "Bearer s3cret"}).status_code == 204
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert "serving 1 adapters" in output and f"http://127.0.0.1:{port}/dashboard" in output
