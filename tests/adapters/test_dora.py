"""DoRA: PEFT's outputs and gradients for the same weights, low-rank row norms, merge, dropout on one matmul."""

import copy

import peft
import pytest
import torch
from torch import nn

import vislora
from conftest import randomize_adapters, tiny_hf_vit, tiny_open_clip_tower, tiny_timm
from vislora import AdapterConfig, AdapterError
from vislora.adapters import DoRA, LoraLinear
from vislora.adapters.dora import row_norms, squared_row_norms

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def trained_like(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-zero B and magnitudes away from ||W||, so DoRA's every term is exercised."""
    randomize_adapters(model, seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "magnitude" in name:
                param.mul_(torch.linspace(0.7, 1.3, param.numel()))
    return model


def test_row_norms_equal_the_norm_of_the_materialised_weight():
    gen = torch.Generator().manual_seed(0)
    weight, a = torch.randn(48, 16, generator=gen), torch.randn(4, 16, generator=gen)
    b = torch.randn(48, 4, generator=gen)
    expected = torch.linalg.norm(weight + b @ a, dim=1)
    torch.testing.assert_close(row_norms(weight, squared_row_norms(weight, torch.float32), a, b), expected)


@pytest.mark.parametrize("targets", [["qkv", "o"], ["q", "v", "fc1"]])
def test_peft_loads_our_dora_with_identical_outputs(tmp_path, targets):
    model = trained_like(vislora.inject(tiny_timm(), AdapterConfig(rank=4, alpha=8, targets=targets, method="dora")))
    ours = model(X)
    assert (ours - tiny_timm()(X)).abs().max() > 1e-2
    vislora.save_adapter(model, tmp_path)
    reference = peft.PeftModel.from_pretrained(tiny_timm(), tmp_path).eval()
    torch.testing.assert_close(reference(X), ours, rtol=1e-5, atol=1e-6)
    again = vislora.load_adapter(tiny_timm(), tmp_path)
    torch.testing.assert_close(again(X), ours, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("factory", "targets", "inputs"), [
    (tiny_timm, ["qkv", "mlp.fc2"], {"x": X}),
    (tiny_hf_vit, ["q_proj", "v_proj", "fc1"], {"pixel_values": X}),
])
def test_we_load_peft_dora_with_identical_outputs(tmp_path, factory, targets, inputs):
    reference = trained_like(peft.get_peft_model(factory(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, use_dora=True, use_rslora=True))).eval()
    reference.save_pretrained(tmp_path)
    ours = vislora.load_adapter(factory(), tmp_path)
    assert ours.configs["default"].method == "dora"
    torch.testing.assert_close(_logits(ours(**inputs)), _logits(reference(**inputs)), rtol=1e-5, atol=1e-6)


def _logits(out):
    return out if torch.is_tensor(out) else out.logits


def test_gradients_equal_peft_with_the_norm_detached():
    config = AdapterConfig(rank=4, alpha=8, targets=["qkv", "fc1"], method="dora")
    ours = trained_like(vislora.inject(tiny_timm(), config))
    reference = peft.get_peft_model(tiny_timm(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1"],
                                                                  use_dora=True))
    peft_modules = dict(reference.base_model.model.named_modules())
    with torch.no_grad():
        for path, layer in ours.layers().items():
            peft_modules[path].lora_A["default"].weight.copy_(layer.adapters["default"].lora_A)
            peft_modules[path].lora_B["default"].weight.copy_(layer.adapters["default"].lora_B)
            peft_modules[path].lora_magnitude_vector["default"].weight.copy_(layer.adapters["default"].lora_magnitude)
    ours.train()
    reference.train()
    ours(X).square().sum().backward()
    reference(X).square().sum().backward()
    for path, layer in ours.layers().items():
        module = peft_modules[path]
        torch.testing.assert_close(layer.adapters["default"].lora_A.grad, module.lora_A["default"].weight.grad,
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.adapters["default"].lora_B.grad, module.lora_B["default"].weight.grad,
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.adapters["default"].lora_magnitude.grad,
                                   module.lora_magnitude_vector["default"].weight.grad, rtol=1e-4, atol=1e-6)


class FixedMask(nn.Module):
    """A dropout whose mask is known, so the expected output can be written down."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


def test_dropout_reaches_only_the_adapter_branch_with_one_base_matmul():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoraLinear(base)
    layer.add_adapter("d", DoRA(rank=2, scale=1.5, dropout=0.5))
    layer.active = ("d",)
    trained_like(layer)
    x = torch.randn(3, 6)
    mask = (torch.rand(3, 6) > 0.5).float() * 2
    layer.adapters["d"].dropout = FixedMask(mask)
    calls = []
    base.register_forward_hook(lambda *_: calls.append(1))
    got = layer(x)
    d = layer.adapters["d"]
    weight, a, b, m = base.weight, d.lora_A, d.lora_B, d.lora_magnitude
    g = m / torch.linalg.norm(weight + 1.5 * b @ a, dim=1)
    expected = x @ weight.T + base.bias + (g - 1) * (x @ weight.T) + g * (1.5 * (x * mask) @ a.T @ b.T)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert len(calls) == 1  # PEFT runs the base layer a second time on the dropped-out input


def test_merge_unmerge_and_unload_are_exact():
    model = trained_like(vislora.inject(tiny_timm(), AdapterConfig(rank=4, alpha=8, targets=["q", "v", "o"],
                                                                   method="dora")))
    original = {p: layer.base_weight.detach().clone() for p, layer in model.layers().items()}
    adapted = model(X)
    model.merge()
    torch.testing.assert_close(model(X), adapted, rtol=1e-5, atol=1e-5)
    model.unmerge()
    for path, layer in model.layers().items():
        torch.testing.assert_close(layer.base_weight, original[path], rtol=0, atol=1e-6)
    plain = model.unload(merge=True)
    torch.testing.assert_close(plain(X), adapted, rtol=1e-5, atol=1e-5)


def test_two_active_dora_adapters_are_summed_but_merge_one_at_a_time():
    model = vislora.inject(tiny_timm(), AdapterConfig(rank=2, alpha=4, targets=["qkv"], method="dora"), name="a")
    model.add_adapter("b", AdapterConfig(rank=2, alpha=4, targets=["qkv"]))
    trained_like(model)
    model.set_active(["a", "b"])
    qkv = model.layers()["blocks.0.attn.qkv"]
    with torch.no_grad():  # each adapter's change of W, added up
        w = qkv.base_weight
        summed = w + qkv.change("a") + qkv.change("b")
        x = torch.randn(3, 32)
        torch.testing.assert_close(qkv(x), x @ summed.T + qkv.base_bias, rtol=1e-5, atol=1e-5)
    with pytest.raises(AdapterError, match="DoRA adapter 'a' rescales the whole weight; merge it on its own"):
        model.merge()
    assert not model.merged and qkv.merge_record is None


def test_dora_on_multihead_attention_merges_exactly_and_peft_refuses_it(tmp_path):
    model = trained_like(vislora.inject(tiny_open_clip_tower(), AdapterConfig(rank=2, alpha=4, targets=["q", "v", "o"],
                                                                             method="dora")))
    x = torch.randn(2, 5, 32)
    adapted = model(x)
    model.merge()
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
    model.unmerge()
    vislora.save_adapter(model, tmp_path)
    again = vislora.load_adapter(tiny_open_clip_tower(), tmp_path)
    torch.testing.assert_close(again(x), adapted, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="does not support DoRA"):
        peft.PeftModel.from_pretrained(tiny_open_clip_tower(), tmp_path)


def test_dora_magnitudes_train_and_start_at_the_weight_norm():
    model = vislora.inject(tiny_timm(), AdapterConfig(rank=2, alpha=4, targets=["qkv"], method="dora"))
    layer = model.layers()["blocks.1.attn.qkv"]
    torch.testing.assert_close(layer.adapters["default"].lora_magnitude, torch.linalg.norm(layer.base_weight, dim=1))
    torch.testing.assert_close(model(X), tiny_timm()(X), rtol=1e-5, atol=1e-6)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("default.lora_magnitude" in n for n in names)
    report = vislora.parameter_report(model)
    assert report.trainable == sum(model.parameter_counts("default").values())


def test_dora_cannot_share_a_layer_with_pissa():
    model = vislora.inject(tiny_timm(), AdapterConfig(rank=2, alpha=4, targets=["qkv"], init="pissa"), name="p")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(AdapterError, match="DoRA and PiSSA adapters cannot share a layer"):
        model.add_adapter("d", AdapterConfig(rank=2, alpha=4, targets=["qkv", "fc1"], method="dora"))
    assert model.adapters == ("p",)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="init='pissa' with method='dora' is not supported"):
        AdapterConfig(init="pissa", method="dora")
