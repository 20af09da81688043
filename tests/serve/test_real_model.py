"""The engine over real pretrained DINOv2-S (a Hugging Face model under a linear head): mixed-adapter batches equal
each adapter's own model, logits and pooled features."""

import numpy as np
import pytest
import torch
from PIL import Image

import vislora
from conftest import missing_asset
from vislora import assets
from vislora.serve import ServeConfig, build_engine
from vislora.tasks.classification import build_classifier

pytestmark = pytest.mark.slow
SIZE, CLASSES = 112, 4


@pytest.fixture(scope="module")
def dinov2():
    try:
        assets.dinov2_onnx_path()
        return assets.dinov2_small()
    except (assets.AssetError, ImportError) as err:
        missing_asset(f"DINOv2 asset unavailable ({err}); `make test` installs it")


def classifier():
    torch.manual_seed(0)  # the linear head starts random: the same draw for every build
    model, head = build_classifier("asset:dinov2-small", CLASSES, image_size=SIZE)
    return model, head


def test_mixed_batches_over_dinov2_equal_each_adapters_own_model(dinov2, tmp_path):
    model, head = classifier()
    adapted = vislora.inject(model, vislora.AdapterConfig(rank=8, alpha=16, targets=["q", "v"],
                                                          modules_to_save=[head]))
    for name, seed in (("a", 1), ("b", 2)):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in adapted.adapter_parameters("default"):
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)
        vislora.save_adapter(adapted, tmp_path / name)
    config = ServeConfig.parse({"base": {"spec": "asset:dinov2-small", "num_classes": CLASSES, "image_size": SIZE},
                                "adapters": {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")},
                                "batching": {"max_wait_ms": 100}})
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (140, 120, 3), dtype=np.uint8)) for _ in range(4)]
    images.append(images[0])
    names = ["a", "b", None, "a", None]
    torch.manual_seed(0)
    with build_engine(config) as engine:
        assert engine.input_spec.size == SIZE
        pixels = torch.stack([engine.preprocess(image) for image in images])
        outputs = [f.result() for f in [engine.submit(p, n) for p, n in zip(pixels, names, strict=True)]]
    for name in ("a", "b", None):
        own, _ = classifier()
        if name is not None:
            own = vislora.load_adapter(own, tmp_path / name)
        own.eval()
        rows = [i for i, n in enumerate(names) if n == name]
        with torch.inference_mode():
            logits, features = own(pixels[rows]), own.features(pixels[rows])
        for k, i in enumerate(rows):
            assert torch.allclose(outputs[i].logits, logits[k], atol=1e-4, rtol=0), name
            assert torch.allclose(outputs[i].features, features[k], atol=1e-4, rtol=0), name
    assert (outputs[0].features - outputs[4].features).abs().max() > 1e-2  # same image: the adapter matters
