import json

from export_helpers import dinov2_run
from typer.testing import CliRunner

from vislora.cli import app
from vislora.errors import ExportError, RegistryError

runner = CliRunner()


def test_merge_and_export_onnx_commands(tmp_path):
    result = runner.invoke(app, ["merge", "--adapter", str(dinov2_run()), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert "Dinov2ForImageClassification" in result.output and "from_pretrained" in result.output
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["architectures"] == [
        "Dinov2ForImageClassification"]

    result = runner.invoke(app, ["export", "onnx", "--adapter", str(dinov2_run()), "--out", str(tmp_path / "onnx")])
    assert result.exit_code == 0, result.output
    assert "onnxruntime vs PyTorch max |diff| batch 1" in result.output and (tmp_path / "onnx/model.onnx").is_file()

    result = runner.invoke(app, ["export", "onnx", "--adapter", str(dinov2_run()), "--out", str(tmp_path / "onnx")])
    assert isinstance(result.exception, ExportError) and "--overwrite" in str(result.exception)


def test_export_int8_without_calibration_is_refused(tmp_path):
    result = runner.invoke(app, ["export", "triton", "--adapter", str(dinov2_run()), "--repo", str(tmp_path),
                                 "--name", "m", "--int8"])
    assert isinstance(result.exception, ExportError) and "--calibration" in str(result.exception)
    assert list(tmp_path.iterdir()) == []


def test_registry_commands(tmp_path, monkeypatch):
    monkeypatch.setenv("VISLORA_REGISTRY", str(tmp_path / "reg"))
    for _ in range(2):
        result = runner.invoke(app, ["registry", "add", "fmnist", str(dinov2_run())])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["registry", "add", "fmnist", str(dinov2_run()), "--metric", "accuracy=high"])
    assert isinstance(result.exception, RegistryError) and "key=number" in str(result.exception)

    assert runner.invoke(app, ["registry", "promote", "fmnist", "1"]).exit_code == 0
    assert "fmnist v2 promoted" in runner.invoke(app, ["registry", "promote", "fmnist"]).output
    listing = runner.invoke(app, ["registry", "list"])
    assert listing.exit_code == 0 and "promoted" in listing.output and "accuracy" in listing.output
    result = runner.invoke(app, ["registry", "resolve", "fmnist"])
    assert result.output.strip() == str(tmp_path / "reg" / "fmnist" / "2")
    assert "rolled back to v1" in runner.invoke(app, ["registry", "rollback", "fmnist"]).output
    result = runner.invoke(app, ["registry", "prune", "--keep-last", "0", "--dry-run"])
    assert "would delete: nothing" in result.output  # both are younger than 30 days
    result = runner.invoke(app, ["registry", "rollback", "fmnist"])
    assert isinstance(result.exception, RegistryError)
