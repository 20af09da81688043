import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from export_helpers import data_dirs, dinov2_run, int8_export

from synthetic_images import image_folder
from vislora.evaluate import evaluate_adapter
from vislora.export import ONNX_ATOL, ExportError, export_onnx_dir, load_exportable
from vislora.export import pipeline as pipeline_module
from vislora.export.onnx import check_onnx, export_onnx


def test_onnx_matches_pytorch_at_any_batch_size(tmp_path):
    result = export_onnx_dir(dinov2_run(), tmp_path / "onnx")
    assert result.check.worst <= ONNX_ATOL and set(result.check.max_abs_diff) == {1, 3}
    assert {p.name for p in result.out.iterdir()} == {"model.onnx", "export.json", "labels.txt"}
    item = load_exportable(dinov2_run())  # a fresh, independently loaded adapted model
    session = ort.InferenceSession(str(result.model), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = item.example(batch, seed=batch)
        with torch.inference_mode():
            expected = item.adapted(x).numpy()
        got = session.run(["logits"], {"input": x.numpy()})[0]
        assert got.shape == (batch, 3)
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=ONNX_ATOL)
    meta = json.loads((result.out / "export.json").read_text())
    assert meta["input"]["shape"] == ["batch", 3, 32, 32] and meta["output"]["classes"] == ["class0", "class1",
                                                                                             "class2"]


def test_check_onnx_catches_an_export_that_disagrees(tmp_path):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4)).eval()
    export_onnx(model, 8, tmp_path / "m.onnx")
    assert check_onnx(model, tmp_path / "m.onnx", 8).worst < 1e-5
    with torch.no_grad():
        model[1].bias.add_(0.01)  # the file no longer matches the model
    with pytest.raises(ExportError, match="differ from PyTorch's"):
        check_onnx(model, tmp_path / "m.onnx", 8)


def test_int8_is_quantized_per_channel_and_the_report_is_measured():
    result = int8_export()
    graph = onnx.load(str(result.int8)).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "MatMul"} <= ops
    weights = {i.name: i for i in graph.initializer}
    int8_weights = [i for i in weights.values() if i.data_type == onnx.TensorProto.INT8]
    assert int8_weights, "no INT8 weight initializers"
    dequant = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights
               and weights[n.input[0]].data_type == onnx.TensorProto.INT8]
    scales = [weights[n.input[1]] for n in dequant]
    assert all(len(s.dims) == 1 and s.dims[0] > 1 for s in scales)  # one scale per output channel

    report = result.report
    fp32_pytorch = evaluate_adapter(dinov2_run(), data_dirs()["val"]).accuracy
    assert 0 < fp32_pytorch < 1 and report.fp32_accuracy == pytest.approx(fp32_pytorch)  # ONNX == PyTorch
    assert report.eval_images == 12 and report.calibration_images == 24
    assert 0 <= report.int8_accuracy <= 1 and 0 <= report.agreement <= 1
    for rows in report.latency.values():
        assert [r.batch for r in rows] == [1, 4]
        assert all(0 < r.p50_ms <= r.p95_ms for r in rows)
    saved = json.loads((result.out / "int8_report.json").read_text())
    assert saved["fp32_accuracy"] == report.fp32_accuracy and set(saved["speedup_p50"]) == {"1", "4"}
    assert saved["settings"]["per_channel"] is True and saved["settings"]["format"] == "QDQ"


def test_int8_and_fp32_agree_on_real_inputs():
    result = int8_export()
    fp32 = ort.InferenceSession(str(result.model), providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(str(result.int8), providers=["CPUExecutionProvider"])
    item = load_exportable(dinov2_run())
    x = item.example(4, seed=3).numpy()
    a, b = fp32.run(["logits"], {"input": x})[0], int8.run(["logits"], {"input": x})[0]
    assert not np.array_equal(a, b)  # it is really quantized
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max() + 0.05


def test_bad_calibration_data_fails_before_any_work(tmp_path, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the calibration data was checked")

    monkeypatch.setattr(pipeline_module, "load_exportable", must_not_load)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="holds no images"):
        export_onnx_dir(dinov2_run(), tmp_path / "out", int8=True, calibration=tmp_path / "empty")
    big = image_folder(tmp_path / "big", per_class=2, size=64)
    with pytest.raises(ExportError, match=r"other resolutions than the training images \(32x32\): 64x64: 6"):
        export_onnx_dir(dinov2_run(), tmp_path / "out", int8=True, calibration=big)
    with pytest.raises(ExportError, match="calibration and evaluation data are the same"):
        export_onnx_dir(dinov2_run(), tmp_path / "out", int8=True, calibration=data_dirs()["val"])
    with pytest.raises(ExportError, match="needs calibration images"):
        export_onnx_dir(dinov2_run(), tmp_path / "out", int8=True)
    assert not (tmp_path / "out").exists()


def test_held_out_data_must_be_labelled_with_the_training_classes(tmp_path):
    other = image_folder(tmp_path / "other", per_class=1)
    shutil.move(other / "class0", other / "cat")
    with pytest.raises(ExportError, match=r"evaluation data .* cannot be opened: .*\['cat'\]"):
        export_onnx_dir(dinov2_run(), tmp_path / "out", int8=True, calibration=data_dirs()["train"], eval_data=other)
