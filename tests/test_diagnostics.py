import json
import math
import re

import pytest
import torch
import transformers
from torch import nn
from typer.testing import CliRunner

import vislora
from conftest import randomize_adapters, require_module, tiny_timm
from vislora.cli import app
from vislora.diagnostics import (
    diagnose,
    effective_rank,
    energy_rank,
    inspect_adapter,
    low_rank_singular_values,
)

runner = CliRunner()


def pair_with_spectrum(s, n_in=48, n_out=64, seed=0):
    """(A [r, in], B [out, r]) with B @ A = U diag(s) V^T exactly: orthonormal U, V."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n_out, len(s), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n_in, len(s), generator=gen, dtype=torch.float64))
    return v.T.float().contiguous(), (u * torch.tensor(s, dtype=torch.float64)).float()


def set_pair(layer, a, b, name="default"):
    with torch.no_grad():
        layer.adapters[name].lora_A.copy_(a)
        layer.adapters[name].lora_B.copy_(b)


def test_known_spectra_give_the_known_effective_ranks():
    a, b = pair_with_spectrum([3.0, 2.0, 1.0, 0.5, 0.0, 0.0])
    s = low_rank_singular_values(a, b, scale=2.0)
    assert s.tolist() == pytest.approx([6.0, 4.0, 2.0, 1.0, 0.0, 0.0], abs=1e-5)
    p = torch.tensor([3.0, 2.0, 1.0, 0.5]) / 6.5
    assert effective_rank(s) == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-5)  # 3.336
    assert effective_rank(torch.tensor([5.0] * 4 + [0.0] * 4)) == pytest.approx(4.0)  # 4 equal directions
    assert effective_rank(torch.zeros(8)) == 0.0
    # energies 9, 4, 1, 0.25 of 14.25: two hold 91%, three hold 98%
    assert energy_rank(s, 0.9) == 2 and energy_rank(s, 0.95) == 3 and energy_rank(s, 1.0) == 4
    random_a, random_b = torch.randn(8, 40), torch.randn(30, 8)
    assert low_rank_singular_values(random_a, random_b, 0.5).float() == pytest.approx(
        torch.linalg.svdvals(0.5 * random_b @ random_a)[:8], rel=1e-4)  # the dense SVD as reference


def test_diagnose_reads_norms_spectrum_and_utilisation_of_a_live_layer():
    base = nn.Sequential(nn.Linear(48, 64))
    model = vislora.inject(base, vislora.AdapterConfig(rank=8, alpha=16, targets=["0"]))
    a, b = pair_with_spectrum([4.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    set_pair(model.layers()["0"], a, b)
    (layer,) = diagnose(model).layers
    assert layer.path == "0" and layer.rank == 8 and layer.scale == 2.0 and layer.method == "lora"
    assert layer.singular_values[:3] == pytest.approx([8.0, 8.0, 0.0], abs=1e-5)
    assert layer.effective_rank == pytest.approx(2.0) and layer.energy_rank == 2
    assert layer.utilisation == pytest.approx(2 / 8)
    assert layer.norm_a == pytest.approx(float(a.norm())) and layer.norm_b == pytest.approx(float(b.norm()))
    delta = 2.0 * b.double() @ a.double()
    assert layer.delta_norm == pytest.approx(float(delta.norm()), rel=1e-6)
    assert layer.relative_norm == pytest.approx(float(delta.norm() / base[0].base_layer.weight.double().norm()))


def test_untrained_adapter_is_reported_untrained_and_nan_as_broken():
    model = vislora.inject(tiny_timm(), vislora.AdapterConfig(rank=4, alpha=8, targets=["q", "v"]))
    report = diagnose(model)
    assert report.verdict.status == "untrained" and "B = 0 in all 4 layers" in report.verdict.reasons[0]
    assert all(layer.untrained and layer.effective_rank == 0 for layer in report.layers)
    randomize_adapters(model)
    with torch.no_grad():
        model.layers()["blocks.1.attn.qkv"].adapters["default"].lora_B[0, 0, 0] = float("nan")
    report = diagnose(model)
    assert report.verdict.status == "broken" and "blocks.1.attn.qkv[q]" in report.verdict.reasons[0]
    assert json.loads(json.dumps(report.to_dict(), allow_nan=False))["verdict"]["status"] == "broken"


def test_low_use_suggests_a_lower_rank_and_uneven_use_a_rank_pattern():
    model = vislora.inject(tiny_timm(), vislora.AdapterConfig(rank=8, alpha=8, targets=["qkv", "fc1"]))
    for layer in model.layers().values():
        n_out, n_in = layer.out_features, layer.in_features
        set_pair(layer, *pair_with_spectrum([1.0] + [0.0] * 7, n_in, n_out))  # rank 1 of 8 everywhere
    report = diagnose(model)
    assert [layer.utilisation for layer in report.layers] == pytest.approx([1 / 8] * 4)
    assert report.verdict.status == "attention"
    assert "mean rank utilisation 0.12 < 0.3" in report.verdict.reasons[0]
    assert "lower the rank to 1" in report.verdict.recommendations[0]

    for path, layer in model.layers().items():
        if path.endswith("fc1"):  # fc1 uses all 8 directions, qkv one
            set_pair(layer, *pair_with_spectrum([1.0] * 8, layer.in_features, layer.out_features))
    report = diagnose(model)
    assert report.by_module["fc1"].utilisation.mean == pytest.approx(1.0)
    assert report.by_module["qkv"].utilisation.mean == pytest.approx(1 / 8)
    assert report.by_depth["0"].layers == 2
    assert any("differs across module types: fc1 1.00 vs qkv 0.12" in r for r in report.verdict.reasons)
    assert any("rank_pattern {'qkv': 1, 'fc1': 8}" in r for r in report.verdict.recommendations)


@pytest.mark.parametrize(("options", "saved_as"), [
    ({"targets": ["q", "v", "fc2"]}, "lora"), ({"targets": ["qkv"], "init": "pissa"}, "lora"),
    ({"targets": ["qkv", "fc1"], "method": "dora"}, "dora"), ({"targets": ["qkv"], "method": "adalora"}, "lora"),
    ({"targets": ["fc1"], "method": "molora"}, "molora"),
], ids=["slices", "pissa", "dora", "adalora", "molora"])
def test_saved_directory_reads_as_the_live_model_with_and_without_base(tmp_path, options, saved_as):
    model = vislora.inject(tiny_timm(), vislora.AdapterConfig(rank=4, alpha=8, **options))
    randomize_adapters(model)
    live = diagnose(model)
    vislora.save_adapter(model, tmp_path / "adapter")
    alone = inspect_adapter(tmp_path / "adapter")
    with_base = inspect_adapter(tmp_path / "adapter", base=tiny_timm())
    assert [layer.path for layer in alone.layers] == [layer.path for layer in live.layers]
    for mine, file, based in zip(live.layers, alone.layers, with_base.layers, strict=True):
        assert file.singular_values == pytest.approx(mine.singular_values, rel=1e-5, abs=1e-6)
        assert file.utilisation == pytest.approx(mine.utilisation, rel=1e-6)
        assert file.relative_norm is None and based.relative_norm == pytest.approx(mine.relative_norm, rel=1e-5)
        assert mine.method == options.get("method", "lora") and file.method == saved_as


def test_peft_saved_adapter_scales_by_its_rank_and_alpha_patterns(tmp_path):
    peft = require_module("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1"], use_rslora=True,
                             rank_pattern={"fc1": 2}, alpha_pattern={"blocks.1.attn.qkv": 3})
    model = peft.get_peft_model(tiny_timm(), config)
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "peft")
    report = inspect_adapter(tmp_path / "peft")
    assert [layer.rank for layer in report.layers] == [4, 2, 4, 2]
    modules = dict(model.base_model.model.named_modules())
    for layer in report.layers:
        reference = torch.linalg.svdvals(modules[layer.path].get_delta_weight("default").double())
        assert layer.singular_values == pytest.approx(reference[:layer.rank].tolist(), rel=1e-4)
    assert report.layers[2].scale == pytest.approx(3 / 2)  # alpha 3 / sqrt(4)


def test_inspect_command_prints_tables_and_json_with_base_norms(tmp_path):
    torch.manual_seed(0)
    vit_config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, image_size=32, patch_size=8)
    transformers.ViTModel(vit_config).save_pretrained(tmp_path / "base")
    model = vislora.inject(transformers.ViTModel.from_pretrained(tmp_path / "base"),
                           vislora.AdapterConfig(rank=4, alpha=8, targets=["q", "v"]))
    randomize_adapters(model)
    vislora.save_adapter(model, tmp_path / "adapter")

    result = runner.invoke(app, ["inspect", str(tmp_path / "adapter")])
    assert result.exit_code == 0, result.output
    assert "q_proj" in result.output and "v_proj" in result.output
    assert "per module type" in result.output and "verdict:" in result.output

    result = runner.invoke(app, ["inspect", str(tmp_path / "adapter"), "--base", f"hf:{tmp_path / 'base'}",
                                 "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    live = diagnose(model)
    assert [layer["relative_norm"] for layer in data["layers"]] == pytest.approx(
        [layer.relative_norm for layer in live.layers], rel=1e-5)
    assert data["verdict"]["status"] == live.verdict.status

    result = runner.invoke(app, ["inspect", str(tmp_path / "adapter"), "--threshold", "1.5"])
    assert result.exit_code != 0 and "energy threshold must be in (0, 1], got 1.5" in str(result.exception)


def test_inspect_table_fits_80_columns_with_whole_names_in_natural_order(tmp_path, monkeypatch):
    from vislora.cli.app import console

    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=12, num_attention_heads=2, mlp_ratio=2,
                                       image_size=28, patch_size=14)
    transformers.Dinov2Model(config).save_pretrained(tmp_path / "base")
    model = vislora.inject(transformers.Dinov2Model.from_pretrained(tmp_path / "base"),
                           vislora.AdapterConfig(rank=8, alpha=16, targets=["q", "v"]))
    randomize_adapters(model)
    vislora.save_adapter(model, tmp_path / "adapter")
    monkeypatch.setattr(console, "width", 80)
    monkeypatch.chdir(tmp_path)  # a short relative path: the table, not the tmp path's length, is under test

    for base in ([], ["--base", "hf:base"]):  # with the base: one more column
        result = runner.invoke(app, ["inspect", "adapter", *base])
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()  # stderr has the base model's loading bar
        assert max(len(line) for line in lines) <= 80
        assert lines[0].startswith("adapter: 24") and "low-rank pairs" in result.stdout
        assert "adapter adapter" not in result.stdout
        assert sum("encoder.layer.N" in line for line in lines) == 1  # the stack, named once above its rows
        rows = [line.split() for line in lines if re.match(r"^\s*\d+\s+attention\.[qv]_proj\s", line)]
        assert [(row[0], row[1]) for row in rows] == [(str(depth), f"attention.{m}_proj") for depth in range(12)
                                                      for m in "qv"]  # whole names, blocks 0, 1, 2, ..., 10, 11
        depths = [line.split()[0] for line in lines[lines.index(next(x for x in lines if "per depth" in x)):]
                  if re.match(r"^\s*\d+\s+2\s", line)]
        assert depths == [str(depth) for depth in range(12)]
