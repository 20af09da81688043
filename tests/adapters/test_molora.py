"""MoLoRA: the gated mixture against a hand-written reference, the balance loss, expert use, files, refusals."""

import peft
import pytest
import torch
from torch import nn

import vislora
from conftest import randomize_adapters, tiny_timm
from vislora import AdapterConfig, AdapterError
from vislora.adapters import LoraLinear, MoLoRA
from vislora.adapters.molora import GateBalance
from vislora.config import MoLoraOptions

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def expert_layer(gate: str = "token", top_k: int = 2) -> LoraLinear:
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(6, 5))
    options = MoLoraOptions(experts=3, top_k=top_k, gate=gate)
    layer.add_adapter("m", MoLoRA(rank=2, scale=1.5, options=options, dropout=0.0))
    layer.active = ("m",)
    randomize_adapters(layer)
    return layer


def reference(layer: LoraLinear, x: torch.Tensor, top_k: int, per_image: bool) -> torch.Tensor:
    """The mixture written out token by token."""
    a, b, gate = layer.adapters["m"].lora_A, layer.adapters["m"].lora_B, layer.adapters["m"].lora_gate
    out = layer.base_layer(x)
    for n in range(x.shape[0]):
        image_logits = (x[n] @ gate.T).mean(0)
        for t in range(x.shape[1]):
            logits = image_logits if per_image else x[n, t] @ gate.T
            top = logits.topk(top_k)
            weights = top.values.softmax(0)
            for w, e in zip(weights, top.indices.tolist(), strict=True):
                out[n, t] = out[n, t] + w * 1.5 * (b[e] @ (a[e * 2:(e + 1) * 2] @ x[n, t]))
    return out


@pytest.mark.parametrize(("gate", "top_k"), [("token", 2), ("token", 1), ("image", 2)])
def test_mixture_equals_the_written_out_reference(gate, top_k):
    layer = expert_layer(gate, top_k)
    x = torch.randn(3, 4, 6)
    torch.testing.assert_close(layer(x), reference(layer, x, top_k, gate == "image"), rtol=1e-5, atol=1e-6)


def test_balance_loss_and_expert_use():
    layer = expert_layer()
    layer.train()
    x = torch.randn(8, 4, 6)
    layer(x)
    logits = x @ layer.adapters["m"].lora_gate.T  # (8, 4, 3)
    chosen = torch.zeros_like(logits).scatter(-1, logits.topk(2).indices, 1.0).flatten(0, 1)
    expected = 3 * ((chosen.sum(0) / chosen.sum()) * logits.flatten(0, 1).softmax(-1).mean(0)).sum()
    stats = layer.adapters["m"]
    torch.testing.assert_close(stats.balance, expected)
    stats.balance.backward()
    assert layer.adapters["m"].lora_gate.grad.abs().sum() > 0  # the balance loss trains the gate
    hooks = GateBalance({"layer": layer.adapters["m"]}, "m", weight=1.0)  # what the model reports over its layers
    shares = hooks.metrics()
    assert shares.keys() == {"molora.m.expert_0", "molora.m.expert_1", "molora.m.expert_2"}
    assert sum(shares.values()) == pytest.approx(1.0)
    torch.testing.assert_close(torch.tensor(list(shares.values())), chosen.sum(0) / chosen.sum())
    assert hooks.metrics() == {}  # read once, then counted afresh


def test_model_level_loss_metrics_and_training():
    model = vislora.inject(tiny_timm(), AdapterConfig(rank=2, alpha=4, targets=["qkv", "fc1"], method="molora",
                                                      molora={"experts": 4, "top_k": 2, "balance_weight": 0.1}))
    model.train()
    y = torch.tensor([0, 1, 2, 3])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        task = nn.functional.cross_entropy(model(X), y)
        aux = model.auxiliary_loss()
        assert aux is not None and aux > 0
        (task + aux).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(task.item())
    assert losses[-1] < losses[0]
    metrics = model.adapter_metrics()
    assert sum(metrics[f"molora.default.expert_{e}"] for e in range(4)) == pytest.approx(1.0)


def test_files_round_trip_and_peft_refuses_them(tmp_path):
    model = vislora.inject(tiny_timm(), AdapterConfig(rank=2, alpha=4, targets=["qkv", "o"], method="molora",
                                                      modules_to_save=["head"]))
    randomize_adapters(model)
    expected = model(X)
    vislora.save_adapter(model, tmp_path)
    again = vislora.load_adapter(tiny_timm(), tmp_path)
    torch.testing.assert_close(again(X), expected, rtol=0, atol=0)
    with pytest.raises(KeyError, match="VISLORA_MOLORA"):
        peft.PeftModel.from_pretrained(tiny_timm(), tmp_path)
    with torch.no_grad():
        for param in again.adapter_parameters("default"):
            param.add_(1.0)
    vislora.load_adapter_weights(again, tmp_path)
    torch.testing.assert_close(again(X), expected, rtol=0, atol=0)


def test_what_needs_a_fixed_delta_is_refused():
    model = vislora.inject(tiny_timm(), AdapterConfig(rank=2, alpha=4, targets=["qkv"], method="molora"), name="m")
    model.add_adapter("plain", AdapterConfig(rank=2, alpha=4, targets=["qkv"]))
    with pytest.raises(AdapterError, match=r"mixture of experts.*no single delta_W"):
        model.merge()
    assert not model.merged
    with pytest.raises(AdapterError, match=r"MoLoRA adapter\(s\) \['m'\] cannot be routed per sample"):
        model(X, adapters=["m", "plain", None, None])
    with pytest.raises(AdapterError, match=r"MoLoRA adapter\(s\) \['m'\].*no single delta to combine"):
        vislora.combine(model, {"m": 0.5, "plain": 0.5}, name="mix")
    with pytest.raises(AdapterError, match="MoLoRA experts adapt whole weights"):
        model.add_adapter("sliced", AdapterConfig(rank=2, alpha=4, targets=["q", "v"], method="molora"))
    with pytest.raises(ValueError, match=r"top_k=5 exceeds molora\.experts=4"):
        AdapterConfig(method="molora", molora={"experts": 4, "top_k": 5})
