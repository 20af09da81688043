"""Serving tiled adapters: images of any size up to limits.max_image_pixels, each tiled, the tiles of a micro-batch
run in routed chunks of tiles_per_step and pooled per request; answers equal each adapter's offline model."""

import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from serving import derive, png

from synthetic_images import class_image, image_folder, tiny_train_config
from vislora.data.transforms import build_transform
from vislora.errors import AdapterFileError, BadImage, ConfigError
from vislora.run_config import TrainConfig
from vislora.runs import load_trained
from vislora.serve import ServeConfig, build_engine, create_app
from vislora.train.trainer import Trainer

TILING = {"size": 24, "overlap": 4, "aggregate": "attention", "tiles_per_step": 3}  # image_size null: any size
SIZES = [(40, 70), (96, 64), (32, 32), (20, 50)]  # (width, height) of the requests' images


@pytest.fixture(scope="module")
def tiled_runs(tmp_path_factory):
    """Two tiled adapters on one base (trained, and derived from it with other weights) and one untiled adapter."""
    root = tmp_path_factory.mktemp("tiled-serve")
    folder = image_folder(root / "images", per_class=2, size=48)
    config = tiny_train_config(root / "run", folder, data={"tiling": TILING}, optim={"max_steps": 1})
    trained = Trainer(TrainConfig.parse(config)).fit().adapter_dir
    plain = Trainer(TrainConfig.parse(tiny_train_config(root / "plain", folder, optim={"max_steps": 1}))).fit()
    rng = np.random.default_rng(3)
    images = [png(class_image(i % 3, rng, size=96).resize(size)) for i, size in enumerate(SIZES)]
    return {"a": trained, "b": derive(trained, root / "run" / "b", seed=11), "plain": plain.adapter_dir,
            "images": images}


@torch.no_grad()
def offline(adapter_dir, image: bytes) -> torch.Tensor:
    """The logits of one image by the adapter's own freshly loaded model (no engine)."""
    torch.manual_seed(0)
    model, task = load_trained(adapter_dir)
    pixels = build_transform(task["input_spec"], train=False)(Image.open(io.BytesIO(image)).convert("RGB"))
    return model(pixels[None])[0]


def engine_for(runs, **fields):
    torch.manual_seed(0)
    return build_engine(ServeConfig.parse({"adapters": {"a": str(runs["a"]), "b": str(runs["b"])},
                                           "batching": {"max_wait_ms": 200}, **fields}))


def test_a_micro_batch_of_any_sizes_equals_each_adapter_offline(tiled_runs):
    names = ["a", "b", "b", "a"]
    with engine_for(tiled_runs) as engine:
        assert engine.input_spec.size is None and engine.base.tiling.size == 24
        seen = []
        engine.model.base_model.backbone.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
        pixels = [engine.preprocess(image) for image in tiled_runs["images"]]
        assert [tuple(p.shape[1:]) for p in pixels] == [(h, w) for w, h in SIZES]
        futures = [engine.submit(p, name) for p, name in zip(pixels, names, strict=True)]
        outputs = [f.result() for f in futures]
        batches = engine.metrics.batch_size.collect()[0].samples
    assert max(seen) <= TILING["tiles_per_step"]
    assert any(s.name.endswith("_sum") and s.value == 4 for s in batches)  # all four requests in one forward
    for output, name, image in zip(outputs, names, tiled_runs["images"], strict=True):
        torch.testing.assert_close(output.logits, offline(tiled_runs[name], image), rtol=0, atol=1e-5)
    assert not torch.allclose(outputs[0].logits, offline(tiled_runs["b"], tiled_runs["images"][0]), atol=1e-3)


def test_predict_over_http_takes_a_large_image_and_refuses_one_above_the_limit(tiled_runs):
    large = png(Image.new("RGB", (160, 120), (200, 40, 40)))  # 48 tiles
    config = {"limits": {"max_image_pixels": 20_000}}
    with engine_for(tiled_runs, **config) as engine, TestClient(create_app(engine, ServeConfig.parse(
            {"adapters": {"a": str(tiled_runs["a"])}, **config}))) as client:
        response = client.post("/v1/predict", files={"image": ("big.png", large, "image/png")}, data={"adapter": "a"})
        assert response.status_code == 200, response.text
        expected = torch.softmax(offline(tiled_runs["a"], large).double(), dim=-1)
        top = response.json()["labels"][0]
        assert top["index"] == int(expected.argmax()) and top["score"] == pytest.approx(float(expected.max()), 1e-5)
        too_big = {"image": ("huge.png", png(Image.new("RGB", (200, 150))), "image/png")}
        response = client.post("/v1/predict", files=too_big, data={"adapter": "a"})
        assert response.status_code in (400, 413) and "20,000" in response.json()["detail"]
        with pytest.raises(BadImage, match=r"expected \(3, H, W\)"):
            engine.submit(torch.zeros(1, 3, 32, 32), "a")


def test_tiled_and_untiled_adapters_do_not_share_a_base(tiled_runs):
    with engine_for(tiled_runs) as engine, pytest.raises(AdapterFileError, match="tiling"):
        engine.load("plain", str(tiled_runs["plain"]))
    with pytest.raises(ConfigError, match=r"drop base\.tiling"):
        ServeConfig.parse({"base": {"kind": "dual_encoder", "spec": "hf:x", "tiling": {}}})
