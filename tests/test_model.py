import copy

import pytest
import torch
from torch import nn

import vislora
from conftest import randomize_adapters, tiny_hf_clip, tiny_hf_vit, tiny_open_clip_tower, tiny_timm
from vislora import AdaptedModel, AdapterConfig, AdapterError
from vislora.adapters import LoraLayer, ModulesToSave

CFG = AdapterConfig(rank=4, alpha=8, targets=["qkv", "o"])


def vislora_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (LoraLayer, ModulesToSave))]


def test_inject_freezes_base_and_trains_only_the_adapter(vit, vit_copy, images):
    model = vislora.inject(vit, CFG)
    assert isinstance(model, AdaptedModel) and model.adapters == ("default",)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    torch.testing.assert_close(model(images), vit_copy(images), rtol=0, atol=0)  # B = 0 at init
    assert model.num_classes == 5  # attributes fall through to the base model


def test_gradients_reach_only_the_active_adapter(vit, images):
    model = vislora.inject(vit, CFG)
    model.add_adapter("other", CFG)
    randomize_adapters(model)
    model(images).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".default" in n for n in grads)
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_several_active_adapters_are_summed(vit, images):
    model = vislora.inject(vit, CFG, name="a")
    model.add_adapter("b", AdapterConfig(rank=2, alpha=2, targets=["qkv", "fc1"]))
    randomize_adapters(model)
    qkv = model.layers()["blocks.0.attn.qkv"]
    base_w = qkv.base_weight.detach().clone()
    model.set_active(["a", "b"])
    assert model.active_adapters == ("a", "b")
    expected = model(images)
    model.merge()
    torch.testing.assert_close(qkv.base_weight, base_w + qkv.delta_weight("a") + qkv.delta_weight("b"))
    torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)
    model.unmerge()
    model.set_active("b")
    only_b = model(images)
    assert not torch.allclose(only_b, expected)


def test_disabled_gives_the_base_model_even_when_merged(vit, vit_copy, images):
    model = vislora.inject(vit, CFG)
    randomize_adapters(model)
    adapted = model(images)
    with model.disabled():
        torch.testing.assert_close(model(images), vit_copy(images), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(images), adapted)
    model.merge()
    with model.disabled():
        assert not model.merged
        torch.testing.assert_close(model(images), vit_copy(images), rtol=1e-5, atol=1e-5)
    assert model.merged
    torch.testing.assert_close(model(images), adapted, rtol=1e-5, atol=1e-5)


def test_merge_unmerge_unload_are_exact(vit, vit_copy, images):
    model = vislora.inject(vit, CFG)
    randomize_adapters(model)
    adapted = model(images)
    model.merge()
    torch.testing.assert_close(model(images), adapted, rtol=1e-5, atol=1e-5)
    with pytest.raises(AdapterError, match="already merged"):
        model.merge()
    with pytest.raises(AdapterError, match="unmerge"):
        model.set_active("default")
    model.unmerge()
    for name, param in vit_copy.named_parameters():
        torch.testing.assert_close(model.base_model.get_parameter(_logical(model, name)), param,
                                   rtol=0, atol=1e-6)
    plain = model.unload(merge=True)
    assert vislora_modules(plain) == [] and not isinstance(plain, AdaptedModel)
    torch.testing.assert_close(plain(images), adapted, rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for p in plain.parameters())  # flags as before injection


def _logical(model: AdaptedModel, name: str) -> str:
    module, _, param = name.rpartition(".")
    return f"{module}.base_layer.{param}" if module in model.layers() else name


def test_unload_without_merge_restores_the_base(vit, vit_copy, images):
    model = vislora.inject(vit, CFG)
    randomize_adapters(model)
    model.merge()
    plain = model.unload(merge=False)
    assert vislora_modules(plain) == []
    torch.testing.assert_close(plain(images), vit_copy(images), rtol=1e-5, atol=1e-5)


def test_safe_merge_refuses_nan_and_leaves_weights(vit):
    model = vislora.inject(vit, CFG)
    layer = model.layers()["blocks.1.attn.proj"]
    with torch.no_grad():
        layer.adapters["default"].lora_B.fill_(float("nan"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError, match=r"blocks\.1\.attn\.proj"):
        model.merge()
    assert not model.merged
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], equal_nan=True)


def test_delete_adapter_unwraps_layers_it_leaves_empty(vit, images):
    model = vislora.inject(vit, AdapterConfig(rank=2, alpha=4, targets=["qkv"]), name="a")
    model.add_adapter("b", AdapterConfig(rank=2, alpha=4, targets=["fc1"]))
    model.delete_adapter("a")
    assert model.adapters == ("b",) and model.active_adapters == ()
    assert not any(p.endswith("qkv") for p in model.layers())
    assert isinstance(model.base_model.blocks[0].attn.qkv, nn.Linear)
    with pytest.raises(AdapterError, match=r"unknown adapter\(s\) \['a'\]; loaded: \['b'\]"):
        model.set_active("a")


@pytest.mark.parametrize("bad", ["", "../evil", "a.b", "x/y", "1st", "a" * 65])
def test_adapter_names_are_validated(vit, bad):
    model = vislora.inject(vit, CFG)
    with pytest.raises(AdapterError, match="invalid adapter name"):
        model.add_adapter(bad, CFG)


def test_duplicate_name_and_double_inject(vit):
    model = vislora.inject(vit, CFG)
    with pytest.raises(AdapterError, match="already exists"):
        model.add_adapter("default", CFG)
    with pytest.raises(AdapterError, match="already carries adapters"):
        vislora.inject(model, CFG)


def test_failed_inject_leaves_the_model_untouched(vit):
    before = copy.deepcopy(vit.state_dict())
    with pytest.raises(vislora.TargetError):
        vislora.inject(vit, AdapterConfig(targets=["qkv", "nothing_here"]))
    assert vislora_modules(vit) == [] and vit.state_dict().keys() == before.keys()
    assert all(p.requires_grad for p in vit.parameters())


def test_modules_to_save_keeps_a_head_per_adapter(vit, images):
    cfg = AdapterConfig(rank=2, alpha=4, targets=["qkv"], modules_to_save=["head"])
    model = vislora.inject(vit, cfg, name="a")
    model.add_adapter("b", cfg)
    with torch.no_grad():
        model.base_model.head.copies["b"].weight.add_(1.0)
    out_a = model(images)
    model.set_active("b")
    assert not torch.allclose(model(images), out_a)
    assert model.base_model.head.copies["b"].weight.requires_grad
    assert not model.base_model.head.copies["a"].weight.requires_grad
    with pytest.raises(AdapterError, match="each carry their own copy of 'head'"):
        model.set_active(["a", "b"])
    plain = model.unload(merge=True)
    assert isinstance(plain.head, nn.Linear)
    torch.testing.assert_close(plain.head.weight, model_head_b_weight(plain))


def model_head_b_weight(plain: nn.Module) -> torch.Tensor:
    return plain.head.weight  # unload keeps the active adapter's head ("b")


def test_train_norms_trains_layernorm_copies(vit):
    model = vislora.inject(vit, AdapterConfig(rank=2, alpha=4, targets=["qkv"], train_norms=True))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("norm1.copies.default.weight" in n for n in trainable)
    assert not any("original_module" in n for n in trainable)


@pytest.mark.parametrize("name", ["beit_base_patch16_224", "eva02_tiny_patch14_224"])
def test_beit_and_eva_fold_q_bias_yet_see_the_adapter(name, images):
    base = tiny_timm(name)
    reference = copy.deepcopy(base)
    assert base.blocks[0].attn.q_bias is not None
    model = vislora.inject(base, AdapterConfig(rank=4, alpha=8, targets=["q", "v"]))
    randomize_adapters(model)
    adapted = model.forward_features(images)  # logits of a random BEiT head are ~1e-4
    assert (adapted - reference.forward_features(images)).abs().max() > 1e-2  # the adapter is not bypassed
    model.merge()
    torch.testing.assert_close(model.forward_features(images), adapted, rtol=1e-4, atol=1e-5)
    plain = model.unload(merge=False)
    assert plain.blocks[0].attn.qkv_bias_separate is False
    torch.testing.assert_close(plain.forward_features(images), reference.forward_features(images), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("factory", "inputs"),
    [
        (tiny_hf_vit, lambda: {"pixel_values": torch.randn(2, 3, 32, 32)}),
        (tiny_hf_clip, lambda: {"pixel_values": torch.randn(2, 3, 32, 32),
                                "input_ids": torch.randint(2, 100, (2, 6))}),
        (tiny_open_clip_tower, lambda: {"x": torch.randn(2, 5, 32)}),
    ],
)
def test_merge_matches_unmerged_on_other_families(factory, inputs):
    base = factory()
    reference = copy.deepcopy(base)
    model = vislora.inject(base, AdapterConfig(rank=4, alpha=8, targets=["q", "v", "o", "fc1", "fc2"]))
    randomize_adapters(model)
    kwargs = inputs()
    adapted = _main_output(model(**kwargs))
    assert (adapted - _main_output(reference(**kwargs))).abs().max() > 1e-4
    model.merge()
    torch.testing.assert_close(_main_output(model(**kwargs)), adapted, rtol=1e-4, atol=1e-5)
    plain = model.unload(merge=True)
    assert vislora_modules(plain) == []
    torch.testing.assert_close(_main_output(plain(**kwargs)), adapted, rtol=1e-4, atol=1e-5)


def _main_output(out):
    if torch.is_tensor(out):
        return out
    return out.logits_per_image if hasattr(out, "logits_per_image") else out.logits


def test_adding_or_deleting_an_adapter_leaves_the_others_trainability_as_it_was():
    model = vislora.inject(tiny_timm(), AdapterConfig(rank=2, alpha=4, targets=["qkv"]), name="a")
    model.add_adapter("b", AdapterConfig(rank=2, alpha=4, targets=["qkv"]), activate=True)
    model.set_trainable(["a"])  # train a while b is active (multi-task routing)
    model.add_adapter("c", AdapterConfig(rank=2, alpha=4, targets=["qkv", "fc1"]))
    trainable = {n: {p.requires_grad for p in model.adapter_parameters(n)} for n in model.adapters}
    assert trainable == {"a": {True}, "b": {False}, "c": {False}}  # the newcomer is frozen, a still trains
    model.delete_adapter("c")
    assert {n: {p.requires_grad for p in model.adapter_parameters(n)} for n in model.adapters} == \
        {"a": {True}, "b": {False}}
    model.set_active("b")  # set_active resets trainability to the active set
    assert [n for n in model.adapters if model.is_training(n)] == ["b"]
