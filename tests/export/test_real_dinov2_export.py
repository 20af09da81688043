"""The real path end to end: DINOv2 ViT-S/14 (the bundled asset) + LoRA on Fashion-MNIST, merged into a plain
transformers folder and exported to fp32 + INT8 ONNX calibrated on real training images."""

import pytest
import torch
from export_helpers import run_without_vislora, save_array

from conftest import real_assets_or_skip
from vislora.export import MERGE_ATOL, export_onnx_dir, load_exportable, merge_adapter
from vislora.run_config import TrainConfig
from vislora.train.trainer import Trainer

pytestmark = pytest.mark.slow

LOAD = """
import numpy as np, torch
from transformers import AutoModelForImageClassification
args = dict(a.split("=", 1) for a in sys.argv[1:])
model = AutoModelForImageClassification.from_pretrained(args["out"]).eval()
with torch.no_grad():
    logits = model(pixel_values=torch.from_numpy(np.load(args["x"]))).logits.numpy()
print(json.dumps({"diff": float(np.abs(logits - np.load(args["ref"])).max())}))
"""


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    real_assets_or_skip()
    out = tmp_path_factory.mktemp("real") / "run"
    cfg = TrainConfig.parse({
        "model": {"spec": "asset:dinov2-small"},
        "adapter": {"targets": ["q", "v"], "rank": 4, "alpha": 8},
        "data": {"train": "fashion-mnist:train", "train_limit": 64, "val": "fashion-mnist:test", "val_limit": 64,
                 "image_size": 56},
        "optim": {"batch_size": 16, "max_steps": 3, "lr_head": 1e-2, "warmup_steps": 1},
        "run": {"output_dir": str(out), "progress": False},
    })
    return Trainer(cfg).fit().adapter_dir


def test_real_dinov2_merges_into_a_plain_classifier_and_exports_int8(adapter, tmp_path):
    item = load_exportable(adapter)
    x = item.example(2, seed=4)
    with torch.inference_mode():
        reference = item.adapted(x)
    merged = merge_adapter(adapter, tmp_path / "merged")
    assert merged.layout == "transformers:Dinov2ForImageClassification"
    loaded = run_without_vislora(LOAD, out=merged.out, x=save_array(tmp_path / "x.npy", x),
                                 ref=save_array(tmp_path / "ref.npy", reference))
    assert loaded["diff"] <= MERGE_ATOL

    result = export_onnx_dir(adapter, tmp_path / "onnx", int8=True, calibration="fashion-mnist:train",
                             calibration_limit=32, latency_batch=2)
    assert result.check.worst <= 1e-3 and result.report.eval_images == 60  # 64 stratified over 10 classes
    assert result.report.agreement >= 0.8  # INT8 predicts what fp32 predicts on real held-out images
