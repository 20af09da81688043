import json

import pytest

from vislora import PRESETS, AdapterConfig, ConfigError, VisloraWarning


def test_defaults_are_kaiming_lora_on_attention():
    cfg = AdapterConfig()
    assert (cfg.rank, cfg.alpha, cfg.init, cfg.train_norms) == (8, 16.0, "kaiming", False)
    assert cfg.scale_for(8, 16) == 2.0


def test_rslora_scale_uses_sqrt_rank():
    assert AdapterConfig(rank=16, alpha=8, use_rslora=True).scale_for(16, 8) == 2.0


@pytest.mark.parametrize(
    ("name", "rank", "alpha", "targets"),
    [
        ("image_classification", 8, 16, ["qkv", "o"]),
        ("image_captioning", 32, 32, ["q", "v", "o"]),
        ("visual_question_answering", 16, 16, ["q", "k", "v"]),
        ("medical", 32, 32, ["q", "v", "fc1", "fc2"]),
        ("satellite", 16, 16, ["qkv", "o"]),
        ("driving", 24, 24, ["q", "k", "v", "o"]),
        ("few_shot", 8, 16, ["q", "v"]),
    ],
)
def test_task_presets(name, rank, alpha, targets):
    cfg = AdapterConfig.from_preset(name)
    assert (cfg.rank, cfg.alpha, cfg.targets) == (rank, alpha, targets)
    assert name in PRESETS


def test_preset_overrides_and_unknown_preset():
    assert AdapterConfig.from_preset("few_shot", rank=4).rank == 4
    assert AdapterConfig.from_preset("few_shot").dropout == 0.0
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'.*few_shot"):
        AdapterConfig.from_preset("nope")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"rank": 0}, "rank"),
        ({"alpha": -1}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"targets": []}, "targets"),
        ({"ranks": 4}, "ranks"),
        ({"rank_pattern": {"qkv": 0}}, "rank_pattern"),
        ({"alpha_pattern": {"qkv": 0}}, "alpha_pattern"),
        ({"init": "orthogonal"}, "init"),
    ],
)
def test_invalid_fields_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        AdapterConfig.parse(data)
    with pytest.raises(ConfigError, match=message):  # built in Python: the same error, not pydantic's
        AdapterConfig(**data)


def test_advice_warnings():
    with pytest.warns(VisloraWarning, match="rank=128 is very high"):
        AdapterConfig(rank=128, alpha=256)
    with pytest.warns(VisloraWarning, match="alpha/rank = 4.0/16 = 0.25"):
        AdapterConfig(rank=16, alpha=4)


def test_a_string_target_becomes_a_list():
    assert AdapterConfig(targets="attn.qkv").targets == ["attn.qkv"]


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_save_load_round_trip(tmp_path, suffix):
    cfg = AdapterConfig(rank=4, alpha=8, targets=["q", "v"], layers=[-1], rank_pattern={"attn.qkv": 2})
    cfg.save(tmp_path / f"cfg{suffix}")
    assert AdapterConfig.load(tmp_path / f"cfg{suffix}") == cfg
    assert list(tmp_path.iterdir()) == [tmp_path / f"cfg{suffix}"]  # no temp file left behind


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        AdapterConfig.load(tmp_path / "missing.yaml")
    (tmp_path / "bad.json").write_text("{rank: ")
    with pytest.raises(ConfigError, match="not valid JSON"):
        AdapterConfig.load(tmp_path / "bad.json")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        AdapterConfig.load(tmp_path / "list.yaml")
    (tmp_path / "typo.json").write_text(json.dumps({"rnak": 4}))
    with pytest.raises(ConfigError, match="rnak"):
        AdapterConfig.load(tmp_path / "typo.json")
