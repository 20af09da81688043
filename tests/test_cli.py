from typer.testing import CliRunner

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


def test_demo_runs_end_to_end(tmp_path):
    result = runner.invoke(app, ["demo", "--model", TINY, "--out", str(tmp_path / "adapter")])
    assert result.exit_code == 0, result.output
    assert "merged vs unmerged" in result.output and "reloaded max |diff| = 0.00e+00" in result.output
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size > 0
