"""Adapters on raw weight parameters (parametrized): open_clip's custom Attention keeps its fused qkv as a bare
`in_proj_weight`, and any user module may. Same forward, merge, routing and files as on an nn.Linear."""

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vislora
from vislora import AdapterConfig, AdapterError
from vislora.adapters import LoraParameter

X = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))


def custom_tower() -> nn.Module:
    """open_clip's CustomTransformer: attention with a raw in_proj_weight (F.linear in its forward)."""
    from open_clip.transformer import CustomTransformer

    torch.manual_seed(0)
    return CustomTransformer(width=32, layers=2, heads=2).eval()


def fill(model: vislora.AdaptedModel, name: str, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter_parameters(name):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def hand_merged(model: vislora.AdaptedModel, name: str) -> nn.Module:
    """A fresh tower with every adapted weight's delta_W added by hand."""
    reference = custom_tower()
    with torch.no_grad():
        for path, layer in model.layers().items():
            owner, _, attribute = path.rpartition(".")
            weight = getattr(reference.get_submodule(owner), attribute) if attribute == "in_proj_weight" else \
                reference.get_submodule(path).weight
            weight += layer.delta_weight(name)
    return reference


def test_roles_find_the_raw_fused_qkv_and_the_output_is_unchanged_at_init():
    model = vislora.inject(custom_tower(), AdapterConfig(rank=2, alpha=4, targets=["q", "v", "o"]))
    plan = model.plans["default"]
    raw = [t for t in plan.targets if t.kind == "parameter"]
    assert [(t.path, t.slices, t.out_features, t.in_features) for t in raw] == [
        ("resblocks.0.attn.in_proj_weight", ("q", "v"), 96, 32),
        ("resblocks.1.attn.in_proj_weight", ("q", "v"), 96, 32),
    ]
    assert isinstance(model.layers()["resblocks.0.attn.in_proj_weight"], LoraParameter)
    torch.testing.assert_close(model(X), custom_tower()(X), rtol=0, atol=0)


def test_forward_merge_and_unload_equal_the_hand_merged_weights():
    model = vislora.inject(custom_tower(), AdapterConfig(rank=2, alpha=4, targets=["q", "v", "o"]))
    fill(model, "default")
    adapted = model(X)
    torch.testing.assert_close(adapted, hand_merged(model, "default")(X), rtol=1e-5, atol=1e-5)
    original = {p: layer.base_weight.detach().clone() for p, layer in model.layers().items()}
    model.merge()
    torch.testing.assert_close(model(X), adapted, rtol=1e-5, atol=1e-5)
    model.unmerge()
    for path, layer in model.layers().items():
        torch.testing.assert_close(layer.base_weight, original[path], rtol=0, atol=1e-6)
    plain = model.unload(merge=True)
    assert not any(hasattr(m, "parametrizations") for m in plain.modules())
    assert type(plain.resblocks[0].attn).__name__ == "Attention"
    torch.testing.assert_close(plain(X), adapted, rtol=1e-5, atol=1e-5)


def test_training_reaches_the_adapter_and_not_the_raw_weight():
    model = vislora.inject(custom_tower(), AdapterConfig(rank=2, alpha=4, targets=["qkv"]))
    fill(model, "default")
    model(X).square().sum().backward()
    layer = model.layers()["resblocks.0.attn.in_proj_weight"]
    assert layer.adapters["default"].lora_A.grad.abs().sum() > 0 and layer.adapters["default"].lora_B.grad is not None
    assert layer.base_weight.grad is None and not layer.base_weight.requires_grad


def test_per_sample_routing_equals_each_adapter_alone():
    model = vislora.inject(custom_tower(), AdapterConfig(rank=2, alpha=4, targets=["q", "v", "o"]), name="a")
    model.add_adapter("b", AdapterConfig(rank=3, alpha=3, targets=["qkv"], method="dora"))
    fill(model, "a")
    fill(model, "b", seed=2)
    names = ["b", None, "a"]
    with torch.no_grad():
        routed = model(X, adapters=names)
        alone = []
        for i, name in enumerate(names):
            if name is None:
                with model.disabled():
                    alone.append(model(X[i:i + 1]))
            else:
                model.set_active(name)
                alone.append(model(X[i:i + 1]))
    torch.testing.assert_close(routed, torch.cat(alone), rtol=1e-5, atol=1e-5)
    assert (alone[0] - alone[2]).abs().max() > 1e-3


@pytest.mark.parametrize("targets", [["qkv", "o"], ["q", "v", "o"]])
def test_files_load_back_and_peft_loads_them_with_identical_outputs(tmp_path, targets):
    model = vislora.inject(custom_tower(), AdapterConfig(rank=2, alpha=4, targets=targets))
    fill(model, "default")
    adapted = model(X)
    vislora.save_adapter(model, tmp_path)
    torch.testing.assert_close(vislora.load_adapter(custom_tower(), tmp_path)(X), adapted, rtol=0, atol=0)
    reference = peft.PeftModel.from_pretrained(custom_tower(), tmp_path)
    torch.testing.assert_close(reference(X), adapted, rtol=1e-5, atol=1e-5)


def test_pissa_on_a_raw_weight_keeps_the_output_and_gives_w_back():
    tower = custom_tower()
    weight = tower.resblocks[0].attn.in_proj_weight.detach().clone()
    model = vislora.inject(tower, AdapterConfig(rank=2, alpha=4, targets=["qkv"], init="pissa"))
    torch.testing.assert_close(model(X), custom_tower()(X), rtol=1e-4, atol=1e-5)
    plain = model.unload(merge=False)
    torch.testing.assert_close(plain.resblocks[0].attn.in_proj_weight, weight, rtol=0, atol=1e-5)


class Mixer(nn.Module):
    """A user module holding its weights as bare parameters: one used through F.linear, one through a matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(16, 8) * 0.3)
        self.w_out = nn.Parameter(torch.randn(8, 16) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.relu(F.linear(x, self.w_in)), self.w_out) if x.dim() == 2 else x @ self.w_in.T


def test_any_user_module_with_a_bare_weight_parameter():
    torch.manual_seed(0)
    mixer = nn.Sequential(Mixer())
    reference = copy.deepcopy(mixer)
    model = vislora.inject(mixer, AdapterConfig(rank=2, alpha=2, targets=["w_in", "w_out"]), name="a")
    assert sorted(model.layers()) == ["0.w_in", "0.w_out"]
    fill(model, "a")
    x = torch.randn(4, 8)
    with torch.no_grad():
        reference[0].w_in += model.layers()["0.w_in"].delta_weight("a")
        reference[0].w_out += model.layers()["0.w_out"].delta_weight("a")
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    model.add_adapter("b", AdapterConfig(rank=2, alpha=2, targets=["w_in", "w_out"]))
    routed = model(x, adapters=["a", "b", None, "a"])
    torch.testing.assert_close(routed[[0, 3]], model(x[[0, 3]], adapters=["a", "a"]), rtol=1e-5, atol=1e-6)
    with pytest.raises(AdapterError, match=r"0\.w_in: the module uses its raw weight in .*not through F\.linear"):
        model(torch.randn(2, 3, 8), adapters=["a", "b"])  # this path multiplies by w_in.T directly


def test_what_a_raw_weight_cannot_take_is_refused():
    with pytest.raises(AdapterError, match=r"adapter dropout acts on a layer's input.*set dropout: 0"):
        vislora.inject(custom_tower(), AdapterConfig(rank=2, alpha=4, targets=["qkv"], dropout=0.1))
    with pytest.raises(AdapterError, match="cannot sit on a raw parameter: it is a mixture of experts"):
        vislora.inject(custom_tower(), AdapterConfig(rank=2, alpha=4, targets=["qkv"], method="molora"))
    tower = custom_tower()
    vislora.inject(tower, AdapterConfig(rank=2, alpha=4, targets=["c_fc"], method="molora"))  # Linear layers: fine
