"""A short real run: pretrained DINOv2 ViT-S/14 (the bundled asset) on real Fashion-MNIST images."""

import pytest

from conftest import real_assets_or_skip
from vislora.evaluate import evaluate_adapter
from vislora.run_config import TrainConfig
from vislora.train.trainer import Trainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets_or_skip():
    real_assets_or_skip("onnx")


def test_short_dinov2_run_beats_the_untrained_head_on_held_out_images(tmp_path, assets_or_skip):
    cfg = TrainConfig.parse({
        "model": {"spec": "asset:dinov2-small"},
        "adapter": {"targets": ["q", "v"], "rank": 4, "alpha": 8, "layers": [-2, -1]},
        "data": {"train": "fashion-mnist:train", "train_limit": 320, "val": "fashion-mnist:test",
                 "val_limit": 150, "image_size": 56},
        "optim": {"batch_size": 16, "max_steps": 20, "lr_head": 1e-2, "warmup_steps": 2},
        "run": {"output_dir": str(tmp_path / "run"), "progress": False},
    })
    trainer = Trainer(cfg)
    untrained = trainer.evaluate().accuracy
    result = trainer.fit()
    assert untrained < 0.3  # ten classes, a random head
    assert result.final["accuracy"] > untrained + 0.3, (untrained, result.final)
    again = evaluate_adapter(result.adapter_dir, "fashion-mnist:test", limit=150)  # rebuilt from task.json
    assert again.accuracy == pytest.approx(result.final["accuracy"], abs=1e-9) and again.n == 150
