"""combine(): exact concatenation equals the weighted sum of deltas; svd reports the true truncation error."""

import copy

import peft
import pytest
import torch

import vislora
from conftest import randomize_adapters, tiny_timm
from vislora import AdapterConfig, AdapterError, ConfigError

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def three_adapters() -> vislora.AdaptedModel:
    model = vislora.inject(tiny_timm(), AdapterConfig(rank=4, alpha=8, targets=["q", "v", "o"],
                                                      modules_to_save=["head"]), name="a")
    model.add_adapter("b", AdapterConfig(rank=2, alpha=2, targets=["q", "v", "fc1"], use_rslora=True))
    model.add_adapter("c", AdapterConfig(rank=3, alpha=6, targets=["qkv"], init="pissa"))
    randomize_adapters(model)
    with torch.no_grad():
        model.base_model.head.copies["a"].weight.add_(0.5)
    return model


WEIGHTS = {"a": 0.7, "b": -0.4, "c": 1.3}


def test_exact_combination_equals_the_weighted_sum_of_deltas():
    model = three_adapters()
    report = vislora.combine(model, WEIGHTS, name="abc")
    assert report.max_relative_error == 0.0 and model.active_adapters == ("a",)
    for layer in model.layers().values():
        expected = sum(w * layer.change(n) for n, w in WEIGHTS.items() if n in layer.adapters)
        torch.testing.assert_close(layer.change("abc"), expected, rtol=1e-5, atol=1e-6)
    qkv = model.layers()["blocks.0.attn.qkv"]
    assert qkv.adapters["abc"].layout.blocks == ()  # a and b share q/v slices, c is whole: the sum is whole
    assert model.layers()["blocks.0.attn.proj"].adapters["abc"].rank == 4
    assert model.layers()["blocks.0.mlp.fc1"].adapters["abc"].rank == 2


def test_exact_combination_keeps_shared_slices_and_combines_heads():
    model = three_adapters()
    vislora.combine(model, {"a": 0.5, "b": 0.5}, name="ab")
    assert model.layers()["blocks.1.attn.qkv"].adapters["ab"].layout.blocks == (0, 2)
    assert model.layers()["blocks.1.attn.qkv"].adapters["ab"].rank == 4 + 2
    head = model.base_model.head
    expected = head.original_module.weight + 0.5 * (head.copies["a"].weight - head.original_module.weight)
    torch.testing.assert_close(head.copies["ab"].weight, expected)


def test_combined_adapter_output_equals_merging_the_parts():
    model = three_adapters()
    vislora.combine(model, {"a": 1.0, "b": 1.0}, name="ab")
    model.set_active("ab")
    combined = model(X)
    model.set_active(["a", "b"])  # summing two active adapters = weights of 1 each (a's head, as ab's)
    torch.testing.assert_close(combined, model(X), rtol=1e-5, atol=1e-5)


def test_combined_adapter_round_trips_through_peft(tmp_path):
    model = three_adapters()
    vislora.combine(model, WEIGHTS, name="abc")
    model.set_active("abc")
    expected = model(X)
    vislora.save_adapter(model, tmp_path, name="abc")
    reference = peft.PeftModel.from_pretrained(tiny_timm(), tmp_path).eval()
    torch.testing.assert_close(reference(X), expected, rtol=1e-5, atol=1e-5)
    again = vislora.load_adapter(tiny_timm(), tmp_path)
    torch.testing.assert_close(again(X), expected, rtol=1e-5, atol=1e-5)


def test_svd_truncation_reports_the_error_the_singular_values_predict():
    model = three_adapters()
    model.delete_adapter("c")  # its PiSSA residual and a DoRA adapter cannot share qkv
    model.add_adapter("d", AdapterConfig(rank=2, alpha=2, targets=["qkv"], method="dora"))
    randomize_adapters(model, seed=3)
    weights = {"a": 0.7, "b": -0.4, "d": 1.0}
    report = vislora.combine(model, weights, name="svd2", how="svd", rank=2)
    by_path = {layer.path: layer for layer in report.layers}
    qkv = model.layers()["blocks.0.attn.qkv"]
    total = sum(w * qkv.change(n) for n, w in weights.items())
    s = torch.linalg.svdvals(total)
    predicted = (s[2:].square().sum() / s.square().sum()).sqrt().item()
    assert by_path["blocks.0.attn.qkv"].rank == 2
    assert by_path["blocks.0.attn.qkv"].relative_error == pytest.approx(predicted, rel=1e-4)
    approx = qkv.change("svd2")
    assert ((total - approx).norm() / total.norm()).item() == pytest.approx(predicted, rel=1e-4)
    full = vislora.combine(model, weights, name="svd_full", how="svd", rank=64)
    assert full.max_relative_error < 1e-5
    assert "svd2" in str(report) and "rel. error" in str(report)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"weights": {"a": 1.0}, "name": "x", "how": "mean"}, ConfigError, "how='mean' is not a way"),
    ({"weights": {"a": 1.0}, "name": "x", "rank": 2}, ConfigError, "rank=2 applies to how='svd' only"),
    ({"weights": {"a": 1.0, "zz": 1.0}, "name": "x"}, AdapterError, r"unknown adapter\(s\) \['zz'\]"),
    ({"weights": {"a": float("nan")}, "name": "x"}, ConfigError, "finite numbers"),
    ({"weights": {}, "name": "x"}, ConfigError, "must map adapter names"),
    ({"weights": {"a": 1.0}, "name": "b"}, AdapterError, "already exists"),
    ({"weights": {"a": 1.0}, "name": "x", "how": "svd", "rank": 0}, ConfigError, "positive integer"),
])
def test_bad_combinations_are_refused_and_leave_the_model_alone(kwargs, error, message):
    model = three_adapters()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message):
        vislora.combine(model, **kwargs)
    assert model.adapters == ("a", "b", "c")
    assert model.state_dict().keys() == before.keys()


def test_dora_needs_svd():
    model = vislora.inject(tiny_timm(), AdapterConfig(rank=2, alpha=4, targets=["qkv"], method="dora"), name="d")
    with pytest.raises(AdapterError, match=r"DoRA adapter\(s\) \['d'\].*use how='svd'"):
        vislora.combine(model, {"d": 0.5}, name="half")
