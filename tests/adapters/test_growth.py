"""Progressive rank growth: the model's output is unchanged at the moment of growth, the optimizer keeps the old
entries' state, and adapters that cannot grow say so."""

import copy

import pytest
import torch
from torch import nn

import vislora
from conftest import randomize_adapters, tiny_open_clip_tower, tiny_timm
from vislora import AdapterConfig, ConfigError
from vislora.train.growth import replace_grown

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("cfg", [
    AdapterConfig(rank=2, alpha=4, targets=["qkv", "o"]),
    AdapterConfig(rank=2, alpha=4, targets=["q", "v", "fc1"], use_rslora=True, alpha_pattern={"fc1": 3}),
    AdapterConfig(rank=2, alpha=4, targets=["q", "v"], method="dora"),
])
def test_growth_keeps_the_output_and_each_layers_scale(cfg):
    model = vislora.inject(tiny_timm(), cfg)
    randomize_adapters(model)
    model.eval()
    before = model(X)
    scales = {t.path: t.scale for t in model.plans["default"].targets}
    model.grow_rank("default", 8)
    torch.testing.assert_close(model(X), before, rtol=1e-5, atol=1e-6)
    assert {t.path: t.scale for t in model.plans["default"].targets} == pytest.approx(scales)
    assert all(layer.adapters["default"].rank == 8 for layer in model.layers().values())
    assert model.configs["default"].rank == 8


def test_growth_through_multihead_attention():
    model = vislora.inject(tiny_open_clip_tower(), AdapterConfig(rank=2, alpha=4, targets=["q", "v", "o"]))
    randomize_adapters(model)
    x = torch.randn(2, 5, 32)
    before = model(x)
    model.grow_rank("default", 6)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def test_optimizer_keeps_the_old_entries_state_and_trains_the_new_ones():
    model = vislora.inject(tiny_timm(), AdapterConfig(rank=2, alpha=4, targets=["q", "v", "o"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        nn.functional.cross_entropy(model(X), Y).backward()
        optimizer.step()
        optimizer.zero_grad()
    qkv = model.layers()["blocks.0.attn.qkv"]
    old_a, old_b = qkv.adapters["default"].lora_A, qkv.adapters["default"].lora_B
    old_state = copy.deepcopy({k: optimizer.state[p] for k, p in (("a", old_a), ("b", old_b))})
    grown = model.grow_rank("default", 4)
    replace_grown(optimizer, grown)
    new_a, new_b = qkv.adapters["default"].lora_A, qkv.adapters["default"].lora_B
    assert old_a not in optimizer.state and new_a in optimizer.state
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad}
    for moment in ("exp_avg", "exp_avg_sq"):
        a_state = optimizer.state[new_a][moment].view(2, 4, -1)  # pairs q, v; rank 2 -> 4
        torch.testing.assert_close(a_state[:, :2], old_state["a"][moment].view(2, 2, -1), rtol=0, atol=0)
        assert a_state[:, 2:].abs().max() == 0
        b_state = optimizer.state[new_b][moment]  # (S, d, r)
        torch.testing.assert_close(b_state[..., :2], old_state["b"][moment], rtol=0, atol=0)
        assert b_state[..., 2:].abs().max() == 0
    assert optimizer.state[new_a]["step"] == old_state["a"]["step"]
    before = new_b.detach().clone()
    nn.functional.cross_entropy(model(X), Y).backward()
    optimizer.step()
    assert (new_b[..., 2:] - before[..., 2:]).abs().max() > 0  # the new columns train


def test_what_cannot_grow_says_why():
    model = vislora.inject(tiny_timm(), AdapterConfig(rank=2, alpha=4, targets=["qkv"], rank_pattern={"qkv": 4}))
    with pytest.raises(ConfigError, match="has a rank_pattern"):
        model.grow_rank("default", 8)
    model.add_adapter("p", AdapterConfig(rank=2, alpha=2, targets=["o"], init="pissa"))
    with pytest.raises(vislora.AdapterError, match="cannot grow its rank"):
        model.grow_rank("p", 4)
    with pytest.raises(ConfigError, match="must go up"):
        model.grow_rank("p", 2)
