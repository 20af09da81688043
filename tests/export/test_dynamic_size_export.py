"""ONNX with dynamic height and width (`vislora export onnx --dynamic-size`): one file answers at several sides as the
adapted model opened at each side does; backbones fixed to one side are refused with the reason."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from export_helpers import TIMM, data_dirs, dinov2_run, session_root, train
from typer.testing import CliRunner

from vislora.cli import app
from vislora.errors import ExportError
from vislora.export import ONNX_ATOL, export_onnx_dir
from vislora.export.onnx import size_axes
from vislora.runs import load_trained
from vislora.tasks.classification import build_classifier

runner = CliRunner()


def assert_answers_at(model_file, adapter, sides):
    """onnxruntime on the file equals the adapter opened with load_trained at each side (a warning names it)."""
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    for side in sides:
        with pytest.warns(match=f"runs at {side} px"):
            model, _ = load_trained(adapter, image_size=side)
        x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(side))
        with torch.inference_mode():
            expected = model(x).numpy()
        np.testing.assert_allclose(session.run(["logits"], {"input": x.numpy()})[0], expected, rtol=1e-3,
                                   atol=ONNX_ATOL)


@pytest.mark.slow
def test_a_timm_vit_exports_dynamic_sides_that_match_the_model_at_each_side(tmp_path):
    adapter = train(session_root() / "runs" / "timm-dynamic", data_dirs(), TIMM, steps=2)
    result = runner.invoke(app, ["export", "onnx", "--adapter", str(adapter), "--out", str(tmp_path / "onnx"),
                                 "--dynamic-size"])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert meta["input"]["shape"] == ["batch", 3, "height", "width"]
    assert meta["input"]["sides"] == {"multiple_of": 8, "min": 16, "max": 4096}
    assert set(meta["onnx_max_abs_diff_by_side"]) == {"64"} and "64 px" in result.output
    assert_answers_at(tmp_path / "onnx" / "model.onnx", adapter, (48, 80))


@pytest.mark.slow
def test_dinov2_exports_dynamic_sides_that_match_the_model_at_each_side(tmp_path):
    result = export_onnx_dir(dinov2_run(), tmp_path / "onnx", dynamic_size=True)
    assert result.axes.multiple == 8 and result.axes.trace == 40  # not the stored 32-px grid: it would be fixed
    assert set(result.check.sides) == {64} and result.check.worst <= ONNX_ATOL
    assert_answers_at(result.model, dinov2_run(), (24, 56))


def test_a_backbone_fixed_to_one_side_is_refused():
    static, _ = build_classifier("timm:vit_tiny_patch16_224", 3, pretrained=False, image_size=32, patch_size=8,
                                 embed_dim=32, depth=2, num_heads=2)
    with pytest.raises(ExportError, match=r"VisionTransformer \(native position embeddings\) cannot be exported with "
                                          r"dynamic height and width.*at its trained size \(32 px\)"):
        size_axes(static, 32)
    with pytest.raises(ExportError, match="dual-encoder run"):
        export_onnx_dir(_dual_task_folder(), session_root() / "never", dynamic_size=True)


def _dual_task_folder():
    folder = session_root() / "dual-task"
    folder.mkdir(exist_ok=True)
    (folder / "task.json").write_text(json.dumps({"task": "contrastive"}))
    return folder
