from pathlib import Path

import pytest
import yaml

from synthetic_images import tiny_train_config
from vislora import ConfigError
from vislora.io import apply_overrides
from vislora.run_config import TrainConfig
from vislora.train.rundir import RESUME_FREE_KEYS, changed_keys

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def test_typo_names_the_key_and_the_closest_valid_one(tmp_path):
    config = tiny_train_config(tmp_path, tmp_path)
    config["optim"]["lr_adaptr"] = 1e-3
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lr_adaptr': did you mean 'optim\.lr_adapter'"):
        TrainConfig.parse(config)
    config = tiny_train_config(tmp_path, tmp_path)
    config["optimm"] = config.pop("optim")
    with pytest.raises(ConfigError, match=r"'optimm': did you mean 'optim'"):
        TrainConfig.parse(config)
    config = tiny_train_config(tmp_path, tmp_path, data={"augment": {"mixupp": 0.2}})
    with pytest.raises(ConfigError, match=r"'data\.augment\.mixupp': did you mean 'data\.augment\.mixup'"):
        TrainConfig.parse(config)


def test_bad_value_and_missing_field_are_named(tmp_path):
    config = tiny_train_config(tmp_path, tmp_path, optim={"max_steps": 0})
    with pytest.raises(ConfigError, match=r"optim\.max_steps: Input should be greater than or equal to 1 \(got 0\)"):
        TrainConfig.parse(config)
    config = tiny_train_config(tmp_path, tmp_path)
    del config["model"]["spec"]
    with pytest.raises(ConfigError, match=r"model\.spec: Field required"):
        TrainConfig.parse(config)


def test_eval_section_is_validated_and_free_to_change_on_resume(tmp_path):
    config = TrainConfig.parse(tiny_train_config(tmp_path, tmp_path))
    assert (config.eval.specificity, config.eval.bootstrap, config.eval.stratified) == (0.95, 1000, True)
    with pytest.raises(ConfigError, match=r"eval\.specificity: Input should be less than 1 \(got 1\.5\)"):
        TrainConfig.parse(tiny_train_config(tmp_path, tmp_path, eval={"specificity": 1.5}))
    with pytest.raises(ConfigError, match=r"'eval\.bootstrapp': did you mean 'eval\.bootstrap'"):
        TrainConfig.parse(tiny_train_config(tmp_path, tmp_path, eval={"bootstrapp": 10}))
    changed = TrainConfig.parse(tiny_train_config(tmp_path, tmp_path, eval={"specificity": 0.9, "bootstrap": 0},
                                                  optim={"max_steps": 7}))
    assert changed_keys(config.model_dump(mode="json"), changed.model_dump(mode="json"), RESUME_FREE_KEYS) == [
        "optim.max_steps"]  # what is measured after training never blocks a resume


def test_what_only_trades_memory_for_time_may_change_on_resume(tmp_path):
    tiling = {"size": 32, "tiles_per_step": 8, "image_size": 64}
    before = TrainConfig.parse(tiny_train_config(tmp_path, tmp_path, data={"tiling": tiling}))
    after = TrainConfig.parse(tiny_train_config(
        tmp_path, tmp_path, data={"tiling": {**tiling, "tiles_per_step": 4}}, optim={"batch_size": 2, "grad_accum": 2},
        run={"gradient_checkpointing": True, "mixed_precision": "bf16"}))
    assert changed_keys(before.model_dump(mode="json"), after.model_dump(mode="json"), RESUME_FREE_KEYS) == [
        "optim.batch_size", "optim.grad_accum"]  # free together while batch_size x grad_accum stays (rundir)


def test_eval_every_needs_validation_data(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.val is empty"):
        TrainConfig.parse(tiny_train_config(tmp_path, tmp_path, run={"eval_every": 2}))


def test_overrides_are_parsed_as_yaml_and_typos_caught(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_train_config(tmp_path / "out", tmp_path)))
    cfg = TrainConfig.load(path, ["optim.max_steps=9", "adapter.targets=[q, k]", "run.seed=3"])
    assert cfg.optim.max_steps == 9 and cfg.adapter.targets == ["q", "k"] and cfg.run.seed == 3
    with pytest.raises(ConfigError, match=r"did you mean 'run\.seed'"):
        TrainConfig.load(path, ["run.sed=3"])
    with pytest.raises(ConfigError, match="is not key=value"):
        apply_overrides({}, ["optim.max_steps"])


def test_saved_config_round_trips(tmp_path):
    cfg = TrainConfig.parse(tiny_train_config(tmp_path, tmp_path))
    cfg.save(tmp_path / "config.yaml")
    assert TrainConfig.load(tmp_path / "config.yaml") == cfg


def test_adapter_section_starts_from_a_preset_and_always_saves_the_head(tmp_path):
    cfg = TrainConfig.parse(tiny_train_config(tmp_path, tmp_path, adapter={"preset": "few_shot", "rank": 4}))
    built = cfg.adapter.build("head")
    assert built.targets == ["q", "v"] and built.rank == 4 and built.modules_to_save == ["head"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid(path):
    assert TrainConfig.load(path).optim.max_steps >= 1
