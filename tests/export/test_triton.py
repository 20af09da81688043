import functools
import sys

import numpy as np
import onnxruntime as ort
import pytest
from export_helpers import data_dirs, dinov2_run, session_root
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from vislora.export import ExportError, check_model_dir, config_pbtxt, export_triton
from vislora.export import triton as triton_module


@functools.cache
def int8_repository():
    """REPO/fmnist with fp32 as version 1 and INT8 as version 2, built once."""
    return export_triton(dinov2_run(), session_root() / "models", "fmnist", int8=True,
                         calibration=data_dirs()["train"], max_batch_size=4)


def parse(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_repository_layout_and_config_as_tritonserver_reads_them():
    result = int8_repository()
    model = result.model_dir
    assert result.validated_with_protobuf and result.versions == {1: "fp32", 2: "INT8"}
    assert sorted(p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file()) == [
        "1/model.onnx", "2/model.onnx", "config.pbtxt", "export.json", "int8_report.json", "labels.txt"]
    config = parse(model / "config.pbtxt")
    assert config.name == "fmnist" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 4
    assert config.version_policy.WhichOneof("policy_choice") == "all"  # both versions are served
    (inp,), (out,) = config.input, config.output
    assert (inp.name, list(inp.dims), inp.data_type) == ("input", [3, 32, 32], model_config_pb2.TYPE_FP32)
    assert (out.name, list(out.dims), out.label_filename) == ("logits", [3], "labels.txt")
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4]
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert (model / "labels.txt").read_text().split() == ["class0", "class1", "class2"]
    assert [p.name for p in model.parent.iterdir()] == ["fmnist"]
    assert {oct(p.stat().st_mode & 0o777) for p in [model, *model.rglob("*")]} == {"0o755", "0o644"}  # readable
    assert not list(model.parent.parent.glob(".fmnist.*"))  # no staging folder left beside the repository


def test_every_version_runs_at_batch_1_and_max_batch_size():
    model = int8_repository().model_dir
    outputs = {}
    for version in (1, 2):
        session = ort.InferenceSession(str(model / str(version) / "model.onnx"), providers=["CPUExecutionProvider"])
        for batch in (1, 4):
            x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
            (logits,) = session.run(["logits"], {"input": x})
            assert logits.shape == (batch, 3)
            outputs[version, batch] = logits
    assert np.abs(outputs[1, 4] - outputs[2, 4]).max() > 0  # version 2 is the quantized model


def test_a_failed_export_leaves_no_partial_model_in_the_repository(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ExportError("config rejected")

    repo = tmp_path / "models"
    monkeypatch.setattr(triton_module, "check_model_dir", broken)
    with pytest.raises(ExportError, match="config rejected"):
        export_triton(dinov2_run(), repo, "fmnist")
    assert list(repo.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_an_existing_model_is_kept_unless_overwrite(tmp_path):
    (tmp_path / "models" / "fmnist").mkdir(parents=True)
    (tmp_path / "models" / "fmnist" / "config.pbtxt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        export_triton(dinov2_run(), tmp_path / "models", "fmnist")
    assert (tmp_path / "models" / "fmnist" / "config.pbtxt").read_text() == "mine"
    result = export_triton(dinov2_run(), tmp_path / "models", "fmnist", overwrite=True)
    assert parse(result.model_dir / "config.pbtxt").name == "fmnist" and result.versions == {1: "fp32"}
    assert not parse(result.model_dir / "config.pbtxt").HasField("version_policy")


def test_bad_names_and_batch_sizes_are_refused_before_work(tmp_path):
    with pytest.raises(ExportError, match="model name 'a/b'"):
        export_triton(dinov2_run(), tmp_path, "a/b")
    with pytest.raises(ExportError, match="max_batch_size must be >= 1"):
        export_triton(dinov2_run(), tmp_path, "ok", max_batch_size=0)


def test_check_model_dir_rejects_configs_that_do_not_fit_the_onnx_file(tmp_path):
    import shutil

    model = tmp_path / "fmnist"
    shutil.copytree(int8_repository().model_dir, model)
    config = model / "config.pbtxt"
    config.write_text(config_pbtxt("fmnist", 32, [5], 4, [1, 2], labels=True))
    with pytest.raises(ExportError, match=r"output dims \[3\] differ from config.pbtxt's \[5\]"):
        check_model_dir(model)
    config.write_text(config_pbtxt("other", 32, [3], 4, [1, 2], labels=True))
    with pytest.raises(ExportError, match="needs name 'fmnist'"):
        check_model_dir(model)
    config.write_text("name: 'fmnist' platform: 'onnxruntime_onnx' max_batch_size: nope")
    with pytest.raises(ExportError, match="not a valid Triton ModelConfig"):
        check_model_dir(model)
    config.write_text(config_pbtxt("fmnist", 32, [3], 4, [1, 2], labels=True))
    (model / "2" / "model.onnx").unlink()
    with pytest.raises(ExportError, match=r"2/model.onnx is missing"):
        check_model_dir(model)


def test_without_tritonclient_the_config_is_checked_field_by_field(tmp_path, monkeypatch):
    import shutil

    model = tmp_path / "fmnist"
    shutil.copytree(int8_repository().model_dir, model)
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)
    assert check_model_dir(model) is False
    (model / "config.pbtxt").write_text(config_pbtxt("fmnist", 32, [3], 4, [1], False).replace(
        "onnxruntime_onnx", "tensorrt_plan"))
    with pytest.raises(ExportError, match="platform 'onnxruntime_onnx'"):
        check_model_dir(model)
