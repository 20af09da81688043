"""PiSSA: PEFT's initialisation, an unchanged model at start, exact save/merge/unload, other adapters unaffected."""

import copy
import json

import peft
import pytest
import torch

import vislora
from conftest import randomize_adapters, tiny_open_clip_tower, tiny_timm
from vislora import AdapterConfig, AdapterFileError
from vislora.formats import CONFIG_FILE

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
CFG = AdapterConfig(rank=4, alpha=8, targets=["qkv", "fc1"], init="pissa")


def test_initialisation_equals_peft_and_leaves_the_output_unchanged():
    base = tiny_timm()
    ours = vislora.inject(copy.deepcopy(base), CFG)
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["qkv", "fc1"], init_lora_weights="pissa"))
    peft_modules = dict(reference.base_model.model.named_modules())
    for path, layer in ours.layers().items():
        torch.testing.assert_close(layer.adapters["default"].lora_A, peft_modules[path].lora_A["default"].weight)
        torch.testing.assert_close(layer.adapters["default"].lora_B, peft_modules[path].lora_B["default"].weight)
        torch.testing.assert_close(layer.base_weight, peft_modules[path].base_layer.weight)
        assert (layer.base_weight - base.get_submodule(path).weight).abs().max() > 1e-2  # W was rewritten
    torch.testing.assert_close(ours(X), base(X), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets", [["qkv", "fc1"], ["q", "v"]])
def test_saved_file_is_the_plain_lora_peft_writes_and_loads_on_the_original_model(tmp_path, targets):
    base = tiny_timm()
    model = vislora.inject(copy.deepcopy(base), AdapterConfig(rank=4, alpha=8, targets=targets, init="pissa",
                                                              use_rslora=True))
    randomize_adapters(model)
    trained = model(X)
    vislora.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["r"] == 8 and config["lora_alpha"] == pytest.approx(8 * 2 ** 0.5)
    assert config["init_lora_weights"] is True
    torch.testing.assert_close(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()(X), trained,
                               rtol=1e-5, atol=1e-5)
    again = vislora.load_adapter(copy.deepcopy(base), tmp_path)
    assert again.configs["default"].init == "kaiming" and again.configs["default"].rank == 8
    torch.testing.assert_close(again(X), trained, rtol=1e-5, atol=1e-5)


def test_disabled_merge_unload_and_delete_restore_the_original_weight():
    base = tiny_timm()
    model = vislora.inject(copy.deepcopy(base), CFG)
    randomize_adapters(model)
    trained = model(X)
    with model.disabled():
        torch.testing.assert_close(model(X), base(X), rtol=1e-5, atol=1e-5)
    model.merge()
    torch.testing.assert_close(model(X), trained, rtol=1e-5, atol=1e-5)
    model.unmerge()
    plain = copy.deepcopy(model).unload(merge=True)
    torch.testing.assert_close(plain(X), trained, rtol=1e-5, atol=1e-5)
    restored = copy.deepcopy(model).unload(merge=False)
    for name, param in base.named_parameters():
        torch.testing.assert_close(restored.get_parameter(name), param, rtol=0, atol=1e-6)
    model.delete_adapter("default")
    for name, param in base.named_parameters():
        torch.testing.assert_close(model.base_model.get_parameter(name), param, rtol=0, atol=1e-6)


def test_another_adapter_on_the_same_layers_still_sees_the_original_weight():
    base = tiny_timm()
    model = vislora.inject(copy.deepcopy(base), CFG, name="p")
    other = AdapterConfig(rank=2, alpha=4, targets=["qkv"])
    model.add_adapter("k", other)
    randomize_adapters(model)
    alone = vislora.inject(copy.deepcopy(base), other, name="k")
    with torch.no_grad():
        for path, layer in alone.layers().items():
            layer.adapters["k"].lora_A.copy_(model.layers()[path].adapters["k"].lora_A)
            layer.adapters["k"].lora_B.copy_(model.layers()[path].adapters["k"].lora_B)
    model.set_active("k")
    torch.testing.assert_close(model(X), alone(X), rtol=1e-5, atol=1e-5)
    model.merge()
    torch.testing.assert_close(model(X), alone(X), rtol=1e-5, atol=1e-5)
    model.unmerge()
    with pytest.raises(vislora.AdapterError, match="already holds a PiSSA residual"):
        model.add_adapter("p2", CFG)


def test_pissa_on_multihead_attention_slices():
    base = tiny_open_clip_tower()
    model = vislora.inject(copy.deepcopy(base), AdapterConfig(rank=2, alpha=4, targets=["q", "v"], init="pissa"))
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(model(x), base(x), rtol=1e-5, atol=1e-5)
    randomize_adapters(model)
    trained = model(x)
    plain = model.unload(merge=True)
    torch.testing.assert_close(plain(x), trained, rtol=1e-5, atol=1e-5)


def test_unconverted_peft_pissa_files_are_refused(tmp_path, vit):
    reference = peft.get_peft_model(tiny_timm(), peft.LoraConfig(r=2, target_modules=["qkv"],
                                                                  init_lora_weights="pissa"))
    reference.save_pretrained(tmp_path)
    with pytest.raises(AdapterFileError, match=r"relative to the residual base model.*path_initial_model"):
        vislora.load_adapter(vit, tmp_path)
