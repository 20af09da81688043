import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import real_assets_or_skip
from synthetic_images import class_image, corrupt_png, csv_manifest, image_folder, tiny_train_config
from vislora.cli import app

runner = CliRunner()
TINY = "timm:vit_tiny_patch16_224"


def test_presets_lists_every_preset():
    result = runner.invoke(app, ["presets"])
    assert result.exit_code == 0
    for name in ("image_classification", "medical", "few_shot", "driving"):
        assert name in result.output


def test_targets_prints_resolved_list_and_report():
    result = runner.invoke(app, ["targets", TINY, "--preset", "few_shot", "--layer", "-1"])
    assert result.exit_code == 0, result.output
    assert "blocks.11.attn.qkv" in result.output and "q,v" in result.output
    assert "blocks.10." not in result.output
    assert "1 x blocks.N.attn.qkv[q,v]" in result.output
    assert "trainable parameters" in result.output


def test_targets_with_a_bad_pattern_fails_with_the_message():
    result = runner.invoke(app, ["targets", TINY, "-t", "proj"])
    assert result.exit_code != 0
    assert "patch_embed.proj" in str(result.exception)


def test_unknown_model_spec_is_explained():
    result = runner.invoke(app, ["targets", "timm:vit_nonexistent_9000"])
    assert "timm has no model 'vit_nonexistent_9000'" in str(result.exception)
    result = runner.invoke(app, ["targets", "keras:resnet"])
    assert "timm:<name>" in str(result.exception)


def test_train_then_eval_from_the_shell(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        class_image(i % 3, rng).save(tmp_path / f"{i}.png")
        rows.append({"path": f"{i}.png", "label": f"c{i % 3}", "group": "indoor" if i < 12 else "outdoor"})
    manifest = csv_manifest(tmp_path, rows)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_train_config(tmp_path / "run", manifest, manifest)))
    result = runner.invoke(app, ["train", str(config), "--set", "optim.max_steps=4", "--set", "run.save_every=2"])
    assert result.exit_code == 0, result.output
    assert "blocks.0.attn.qkv" in result.output and "trained 4 steps" in result.output
    assert (tmp_path / "run" / "checkpoints" / "step-000004").is_dir()

    predictions = tmp_path / "preds.csv"
    result = runner.invoke(app, ["eval", "--adapter", str(tmp_path / "run" / "adapter"), "--data", str(manifest),
                                 "--predictions", str(predictions)])
    assert result.exit_code == 0, result.output
    assert "on 24 images" in result.output and "per group" in result.output and "outdoor" in result.output
    lines = predictions.read_text().splitlines()
    assert lines[0] == "index,image,label,prediction,correct,loss,group" and len(lines) == 25


def test_train_config_typo_is_named(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_train_config(tmp_path / "run", tmp_path)))
    result = runner.invoke(app, ["train", str(config), "--set", "optim.batchsize=8"])
    assert result.exit_code != 0
    assert "unknown config key 'optim.batchsize': did you mean 'optim.batch_size'?" in str(result.exception)


def test_data_check_lists_a_corrupt_file_and_writes_the_audit(tmp_path):
    root = image_folder(tmp_path / "images", per_class=4)
    corrupt_png(root / "class1" / "broken.png")
    result = runner.invoke(app, ["data", "check", str(root), "--out", str(tmp_path / "audit")])
    assert result.exit_code == 0, result.output
    assert "corrupt/unreadable: 1" in result.output and "broken.png" in result.output
    assert (tmp_path / "audit" / "audit.csv").is_file() and (tmp_path / "audit" / "contact_sheet.png").is_file()


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_small_budget(tmp_path):
    real_assets_or_skip()
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--steps", "3", "--train-images", "96",
                                 "--test-images", "60", "--image-size", "28", "--batch-size", "16"])
    assert result.exit_code == 0, result.output
    assert "frozen backbone + linear probe" in result.output and "LoRA (r=8 on q, v) + head" in result.output
    assert "trainable parameters" in result.output and "wall time" in result.output
    assert (tmp_path / "demo" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("command", [["index", "build", "data", "--adapter", "run", "--out", "index"],
                                     ["clip", "eval", "--adapter", "run", "--data", "data"]])
def test_device_options_refuse_unknown_devices_before_any_work(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, [*command, "--device", "tpu"])
    assert "unknown device 'tpu': use auto, cpu, cuda, cuda:N or mps" in str(result.exception)
    assert list(tmp_path.iterdir()) == []


def test_error_messages_print_square_brackets_as_text_not_rich_markup(tmp_path, monkeypatch):
    from vislora.cli.app import console, run

    missing = tmp_path / "[bold]run" / "[red]adapter"
    monkeypatch.setattr("sys.argv", ["vislora", "inspect", str(missing)])
    monkeypatch.setattr(console, "width", 400)
    with console.capture() as captured, pytest.raises(SystemExit) as exit_:
        run()
    assert exit_.value.code == 2
    assert captured.get().strip() == f"error: adapter directory {missing} does not exist"
