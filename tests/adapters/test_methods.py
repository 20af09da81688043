"""Every method's one list of tensors: freezing, counting, files and deletion all read it, and merge refuses before
it writes anything."""

import copy

import pytest
import torch

import vislora
from conftest import tiny_timm
from vislora import AdapterConfig, AdapterError

METHODS = {
    "lora": {"method": "lora"},
    "dora": {"method": "dora"},
    "adalora": {"method": "adalora", "adalora": {"target_rank": 1}},
    "molora": {"method": "molora", "molora": {"experts": 3, "top_k": 2}},
    "pissa": {"init": "pissa"},
}
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def config(method: str, **overrides) -> AdapterConfig:
    return AdapterConfig(**{"rank": 2, "alpha": 4, "targets": ["qkv", "fc1"], **METHODS[method], **overrides})


def fill(model: vislora.AdaptedModel, name: str, seed: int = 1) -> None:
    """Every tensor of adapter `name` set to values no initialisation gives."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter_parameters(name):
            param.copy_(torch.rand(param.shape, generator=gen) + 0.5)


@pytest.mark.parametrize("method", METHODS)
def test_every_tensor_of_the_list_survives_save_and_load(tmp_path, method):
    model = vislora.inject(tiny_timm(), config(method, modules_to_save=["head"]))
    fill(model, "default")
    saved = {key: value.detach().clone() for key, value in model.adapter_state("default").items()}
    assert any(key.endswith(("lora_E", "lora_gate", "lora_magnitude")) for key in saved) or method in ("lora", "pissa")
    vislora.save_adapter(model, tmp_path)
    fresh = vislora.inject(tiny_timm(), config(method, modules_to_save=["head"]))
    vislora.load_adapter_weights(fresh, tmp_path)
    loaded = fresh.adapter_state("default")
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("method", METHODS)
def test_delete_adapter_leaves_no_tensor_of_it_behind(method):
    model = vislora.inject(tiny_timm(), AdapterConfig(rank=2, alpha=4, targets=["qkv"]), name="keep")
    weights = {k: v.clone() for k, v in model.base_model.state_dict().items() if "adapters" not in k}
    before = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    model.add_adapter("gone", config(method, modules_to_save=["head"]))
    ids = {id(p) for p in model.adapter_parameters("gone")}
    assert any("gone" in n for n, _ in model.named_parameters())
    model.delete_adapter("gone")
    after = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    assert after == before
    assert not ids & {id(p) for p in model.parameters()}
    assert "gone" not in model.hooks and "gone" not in model.configs
    for key, value in model.base_model.state_dict().items():  # a PiSSA residual went back into W
        if key in weights:
            torch.testing.assert_close(value, weights[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize(("method", "per_layer"), [
    ("adalora", 6 * 32 + 96 * 6 + 6),  # A [6, 32], B [96, 6], E [6] on each fused qkv
    ("molora", 3 * 2 * 32 + 3 * 96 * 2 + 3 * 32),  # experts A [6, 32], B [3, 96, 2], gate [3, 32]
])
def test_parameter_report_counts_every_tensor_of_the_method(method, per_layer):
    extra = {"rank": 6, "adalora": {"target_rank": 2}} if method == "adalora" else {}
    base_count = sum(p.numel() for p in tiny_timm().parameters())
    model = vislora.inject(tiny_timm(), config(method, targets=["qkv"], **extra))
    report = vislora.parameter_report(model)
    assert report.adapter == 2 * per_layer  # two blocks
    assert report.base == base_count
    assert report.trainable == report.adapter and report.per_adapter == {"default": 2 * per_layer}


@pytest.mark.parametrize("method", ["adalora", "molora"])
def test_a_frozen_adapter_keeps_every_tensor_frozen(method):
    model = vislora.inject(tiny_timm(), config(method), name="a")
    model.add_adapter("b", AdapterConfig(rank=2, alpha=4, targets=["qkv"]))
    model.set_active("b")
    assert not any(p.requires_grad for p in model.adapter_parameters("a"))
    model.set_trainable(["a"])
    assert all(p.requires_grad for p in model.adapter_parameters("a"))


@pytest.mark.parametrize("safe", [True, False])
def test_merge_refuses_before_writing_when_one_layer_holds_lora_and_dora(safe):
    model = vislora.inject(tiny_timm(), AdapterConfig(rank=2, alpha=4, targets=["qkv", "o"]), name="a")
    model.add_adapter("d", AdapterConfig(rank=2, alpha=4, targets=["qkv"], method="dora"))
    fill(model, "a")
    fill(model, "d", seed=2)
    model.set_active(["a", "d"])
    before = copy.deepcopy(model.state_dict())
    out = model(X)
    with pytest.raises(AdapterError, match="DoRA adapter 'd' rescales the whole weight; merge it on its own"):
        model.merge(safe=safe)
    assert not model.merged
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    torch.testing.assert_close(model(X), out, rtol=0, atol=0)


def test_unsafe_merge_of_lora_adapters_equals_the_unmerged_forward():
    model = vislora.inject(tiny_timm(), AdapterConfig(rank=2, alpha=4, targets=["qkv", "o"]), name="a")
    model.add_adapter("b", AdapterConfig(rank=3, alpha=3, targets=["q", "v", "fc1"]))
    fill(model, "a")
    fill(model, "b", seed=2)
    model.set_active(["a", "b"])
    out = model(X)
    model.merge(safe=False)
    torch.testing.assert_close(model(X), out, rtol=1e-5, atol=1e-5)
