import pytest
import torch
from dual_fixtures import tiny_dual, word_tokenizer

import vislora
from conftest import randomize_adapters, tiny_hf_clip
from vislora import ConfigError
from vislora.dual_encoder import HFDualEncoder
from vislora.tasks.clip import clip_lora_config
from vislora.tokenize import HFCaptionTokenizer
from vislora.towers import tower_adapter_config, tower_of


def plan_of(model):
    return {t.path: (t.rank, t.alpha, t.slices) for t in model.plans["default"].targets}


def test_per_tower_targets_rank_and_alpha_in_one_config(tmp_path):
    config = tower_adapter_config(tiny_dual(), ["q", "v"], ["q", "k", "v", "fc1"], rank=8, alpha=16,
                                  vision_rank=4, vision_alpha=8, text_rank=2, text_alpha=1, use_rslora=True)
    model = vislora.inject(tiny_dual(), config)
    plan = plan_of(model)
    vision = {p: v for p, v in plan.items() if p.startswith("vision.")}
    text = {p: v for p, v in plan.items() if p.startswith("text.")}
    assert sorted(vision) == [f"vision.encoder.layer.{i}.attention.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
    assert sorted(text) == sorted(f"text.encoder.layer.{i}.{m}" for i in (0, 1) for m in (
        "attention.self.query", "attention.self.key", "attention.self.value", "intermediate.dense"))
    assert set(vision.values()) == {(4, 8.0, ())} and set(text.values()) == {(2, 1.0, ())}
    assert model.plans["default"].modules_to_save == ["logit_scale", "text_proj", "vision_proj"]
    # the saved file is an ordinary adapter directory: loading it rebuilds the same plan
    randomize_adapters(model)
    vislora.save_adapter(model, tmp_path / "towers")
    again = vislora.load_adapter(tiny_dual(), tmp_path / "towers")
    assert plan_of(again) == plan
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(images=images)[0], model(images=images)[0])


def test_text_only_adapter_leaves_the_image_tower_untouched(images):
    base = tiny_dual()
    with torch.no_grad():
        before = base(images=images)[0]
    model = vislora.inject(base, tower_adapter_config(base, None, ["q", "v"], train_heads=False))
    assert all(p.startswith("text.") for p in plan_of(model))
    randomize_adapters(model)
    tokens = model.tokenize(["a photo of a red picture"])
    with torch.no_grad():
        torch.testing.assert_close(model(images=images)[0], before, rtol=0, atol=0)
        with model.disabled():
            plain = model(**tokens)[1]
        assert not torch.allclose(model(**tokens)[1], plain)


def test_clip_lora_recipe_on_hf_clip_scopes_each_tower():
    base = HFDualEncoder(tiny_hf_clip(), HFCaptionTokenizer(word_tokenizer(), 16))
    model = vislora.inject(base, clip_lora_config(base))
    targets = model.plans["default"].targets
    assert {t.path.rsplit(".", 1)[-1] for t in targets} == {"q_proj", "k_proj", "v_proj"}
    assert sum(t.path.startswith("model.vision_model.") for t in targets) == 6
    assert sum(t.path.startswith("model.text_model.") for t in targets) == 6
    assert {(t.rank, t.alpha) for t in targets} == {(2, 1.0)}
    assert [t.scale for t in targets] == pytest.approx([1 / 2 ** 0.5] * 12)  # alpha / sqrt(r)
    assert model.configs["default"].dropout == 0.25 and model.plans["default"].modules_to_save == []


def test_tower_of_names_encoder_and_projection_parameters():
    model = vislora.inject(tiny_dual(), tower_adapter_config(tiny_dual(), ["q"], ["q"]))
    owners = {name: tower_of(model, name) for name, p in model.named_parameters() if p.requires_grad}
    assert owners["base_model.vision.encoder.layer.0.attention.q_proj.adapters.default.lora_A"] == "vision"
    assert owners["base_model.text.encoder.layer.1.attention.self.query.adapters.default.lora_B"] == "text"
    assert owners["base_model.text_proj.copies.default.weight"] == "text"
    assert owners["base_model.logit_scale.copies.default.log_scale"] is None


def test_no_tower_or_no_towers_is_an_error(vit):
    with pytest.raises(ConfigError, match=r"no tower is adapted"):
        tower_adapter_config(tiny_dual(), None, [])
    with pytest.raises(ConfigError, match=r"has no towers"):
        tower_adapter_config(vit, ["q"], None)
