import copy
import math

import pytest
import torch
from torch import nn

import vislora
from conftest import randomize_adapters
from vislora.adapters import LoRA, LoraLinear


def test_zero_init_keeps_output_and_kaiming_a():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoraLinear(copy.deepcopy(base))
    layer.add_adapter("a", LoRA(rank=4, scale=2.0, dropout=0.0))
    layer.active = ("a",)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    assert layer.adapters["a"].lora_B.abs().sum() == 0
    bound = math.sqrt(6 / ((1 + 5) * 16))  # kaiming_uniform_(a=sqrt(5)) bound for fan_in 16
    a = layer.adapters["a"].lora_A
    assert a.abs().max() <= bound and a.std() > bound / 4


def test_forward_is_base_plus_scaled_low_rank_product():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 8))
    layer.add_adapter("a", LoRA(rank=4, scale=0.5, dropout=0.0))
    layer.adapters["a"].lora_B.data.normal_()
    layer.active = ("a",)
    x = torch.randn(3, 16)
    adapter = layer.adapters["a"]
    w, b, a_, b_ = layer.base_layer.weight, layer.base_layer.bias, adapter.lora_A, adapter.lora_B
    expected = x @ w.T + b + 0.5 * (x @ a_.T @ b_.T)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.delta_weight("a"), 0.5 * b_ @ a_)


def test_gaussian_init():
    layer = LoraLinear(nn.Linear(64, 8))
    layer.add_adapter("g", LoRA(rank=4, scale=1.0, dropout=0.0, init="gaussian"))
    assert abs(layer.adapters["g"].lora_A.std().item() - 0.25) < 0.05


def test_dropout_only_touches_the_adapter_branch():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 8))
    layer.add_adapter("a", LoRA(rank=4, scale=1.0, dropout=0.5))
    layer.adapters["a"].lora_B.data.normal_()
    layer.active = ("a",)
    x = torch.randn(64, 16)
    layer.eval()
    clean = layer(x)
    layer.train()
    noisy = layer(x)
    assert not torch.allclose(clean, noisy)
    layer.active = ()
    torch.testing.assert_close(layer(x), layer.base_layer(x))  # base path never dropped


class FusedAttention(nn.Module):
    """timm-style attention projection: one qkv Linear."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v


class SplitAttention(nn.Module):
    """The same attention with separate q/k/v Linears (Hugging Face style)."""

    def __init__(self, fused: FusedAttention) -> None:
        super().__init__()
        dim = fused.qkv.in_features
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        with torch.no_grad():
            for i, proj in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                proj.weight.copy_(fused.qkv.weight[i * dim:(i + 1) * dim])
                proj.bias.copy_(fused.qkv.bias[i * dim:(i + 1) * dim])

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v


@pytest.mark.parametrize("roles", [["q", "v"], ["q", "k", "v"], ["k"]])
def test_fused_qkv_slices_equal_separate_projections_with_lora(roles):
    torch.manual_seed(0)
    fused = FusedAttention(16)
    split = SplitAttention(fused)
    cfg = vislora.AdapterConfig(rank=4, alpha=8, targets=roles)
    fused_model, split_model = vislora.inject(fused, cfg), vislora.inject(split, cfg)
    randomize_adapters(fused_model)
    layer = fused_model.layers()["qkv"]
    with torch.no_grad():  # copy each slice's pair into the separate projection's adapter
        for j, role in enumerate(roles):
            target = split_model.layers()[f"{role}_proj"]
            target.adapters["default"].lora_A.copy_(layer.adapters["default"].lora_A[j * 4:(j + 1) * 4])
            target.adapters["default"].lora_B.copy_(layer.adapters["default"].lora_B[j])
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(fused_model(x), split_model(x))
    # the separate model against PEFT as an independent reference
    import peft

    reference = peft.get_peft_model(copy.deepcopy(split_model.unload(merge=False)),
                                    peft.LoraConfig(r=4, lora_alpha=8, target_modules=[f"{r}_proj" for r in roles]))
    with torch.no_grad():
        for role in roles:
            module = getattr(reference.base_model.model, f"{role}_proj")
            j = roles.index(role)
            module.lora_A["default"].weight.copy_(layer.adapters["default"].lora_A[j * 4:(j + 1) * 4])
            module.lora_B["default"].weight.copy_(layer.adapters["default"].lora_B[j])
    torch.testing.assert_close(fused_model(x), reference(x))


def test_slice_merge_and_unmerge_are_exact():
    torch.manual_seed(0)
    model = vislora.inject(FusedAttention(16), vislora.AdapterConfig(rank=4, alpha=8, targets=["q", "v"]))
    randomize_adapters(model)
    original = model.layers()["qkv"].base_weight.detach().clone()
    x = torch.randn(2, 7, 16)
    expected = model(x)
    delta = model.layers()["qkv"].delta_weight("default")
    assert delta[16:32].abs().max() == 0  # k rows untouched
    model.merge()
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    model.unmerge()
    torch.testing.assert_close(model.layers()["qkv"].base_weight, original, rtol=0, atol=1e-6)


def test_half_precision_base_keeps_fp32_adapter():
    layer = LoraLinear(nn.Linear(8, 8).to(torch.bfloat16))
    layer.add_adapter("a", LoRA(rank=2, scale=1.0, dropout=0.0))
    layer.active = ("a",)
    assert layer.adapters["a"].lora_A.dtype == torch.float32
    assert layer(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
