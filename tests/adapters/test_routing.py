"""Per-sample routing: model(x, adapters=[...]) equals running each sample alone with its adapter."""

import copy

import pytest
import torch
from torch import nn

import vislora
from conftest import randomize_adapters, tiny_hf_vit, tiny_open_clip_tower, tiny_timm
from vislora import AdapterConfig, AdapterError
from vislora.adapters import LoraLayer


def loaded_vit() -> vislora.AdaptedModel:
    """Four adapters of every kind on one ViT: whole qkv, q/v slices, DoRA, PiSSA; two carry their own head."""
    model = vislora.inject(tiny_timm(), AdapterConfig(rank=4, alpha=8, targets=["qkv", "o"], modules_to_save=["head"]),
                           name="whole")
    model.add_adapter("sliced", AdapterConfig(rank=2, alpha=4, targets=["q", "v", "fc1"], modules_to_save=["head"]))
    model.add_adapter("dora", AdapterConfig(rank=3, alpha=3, targets=["qkv", "fc2"], method="dora"))
    model.add_adapter("pissa", AdapterConfig(rank=2, alpha=2, targets=["o"], init="pissa"))
    randomize_adapters(model)
    perturb_magnitudes(model)
    return model


def perturb_magnitudes(model: vislora.AdaptedModel) -> None:
    with torch.no_grad():
        for layer in model.layers().values():
            for magnitude in [a.lora_magnitude for a in layer.adapters.values() if hasattr(a, "lora_magnitude")]:
                magnitude.mul_(torch.linspace(0.8, 1.2, magnitude.numel()))


def one_by_one(model: vislora.AdaptedModel, x: torch.Tensor, names: list, **kwargs) -> torch.Tensor:
    """The reference: each sample alone, with its adapter the only active one (or adapters disabled)."""
    rows = []
    for i, name in enumerate(names):
        sample = x[i:i + 1]
        if name is None:
            with model.disabled():
                rows.append(model(sample, **kwargs))
        else:
            model.set_active(name)
            rows.append(model(sample, **kwargs))
    return torch.cat(rows)


NAMES = ["whole", None, "dora", "sliced", "pissa", "whole", "dora", None]


def test_routing_equals_each_sample_with_its_own_adapter():
    model = loaded_vit()
    x = torch.randn(len(NAMES), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        routed = model(x, adapters=NAMES)
        expected = one_by_one(model, x, NAMES)
    torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-6)
    assert (expected[0] - expected[1]).abs().max() > 1e-3  # the adapters do change the output


def test_routing_ignores_the_active_set_and_leaves_it_alone():
    model = loaded_vit()
    model.set_active(["whole", "pissa"])
    x = torch.randn(3, 3, 32, 32)
    before = model(x)
    routed = model(x, adapters=["dora", "dora", None])
    assert model.active_adapters == ("whole", "pissa")
    torch.testing.assert_close(model(x), before)
    torch.testing.assert_close(routed, one_by_one(model, x, ["dora", "dora", None]), rtol=1e-5, atol=1e-6)


def test_cached_stacks_follow_changed_adapter_weights():
    model = loaded_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        first = model(x, adapters=["whole", "dora"])
    with torch.no_grad():
        for name in ("whole", "dora"):
            for param in model.adapter_parameters(name):
                param.mul_(1.5)
    with torch.inference_mode():
        second = model(x, adapters=["whole", "dora"])
        expected = one_by_one(model, x, ["whole", "dora"])
    assert (first - second).abs().max() > 1e-3
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-6)


def test_cached_stacks_follow_a_change_of_adalora_singular_values_alone():
    model = loaded_vit()
    model.add_adapter("ada", AdapterConfig(rank=3, alpha=3, targets=["qkv"], method="adalora",
                                           adalora={"target_rank": 2}))
    layer = model.layers()["blocks.0.attn.qkv"]
    with torch.no_grad():
        layer.adapters["ada"].lora_E.copy_(torch.tensor([1.0, -0.5, 2.0]))
        layer.adapters["ada"].lora_B.normal_(std=0.2)
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        model(x, adapters=["ada", "whole", "dora"])  # stacks built and cached
    with torch.no_grad():
        layer.adapters["ada"].lora_E[1] = 0.0  # what AdaLoRA's pruning does: E alone changes
    with torch.inference_mode():
        routed = model(x, adapters=["ada", "whole", "dora"])
        expected = one_by_one(model, x, ["ada", "whole", "dora"])
    torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_first", [True, False])
def test_routing_through_multihead_attention(batch_first):
    tower = tiny_open_clip_tower()
    for block in tower.resblocks:  # the same weights; the tower transposes to (L, N, E) for its attention
        block.attn.batch_first = batch_first
    tower.batch_first = batch_first
    model = vislora.inject(tower, AdapterConfig(rank=2, alpha=4, targets=["q", "v", "o", "c_fc"]), name="a")
    model.add_adapter("b", AdapterConfig(rank=3, alpha=3, targets=["qkv"], method="dora"))
    randomize_adapters(model)
    perturb_magnitudes(model)
    names = ["b", "a", None]
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        routed = model(x, adapters=names)
        expected = one_by_one(model, x, names)
    torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-6)
    assert (expected[0] - expected[2]).abs().max() > 1e-3


def test_routing_on_hugging_face_keyword_inputs():
    model = vislora.inject(tiny_hf_vit(), AdapterConfig(rank=2, alpha=4, targets=["q", "v"]), name="a")
    model.add_adapter("b", AdapterConfig(rank=4, alpha=4, targets=["o", "fc1"], modules_to_save=["classifier"]))
    randomize_adapters(model)
    pixels = torch.randn(3, 3, 32, 32)
    names = ["b", "a", "b"]
    routed = model(pixel_values=pixels, adapters=names).logits
    expected = torch.cat([_hf_one(model, pixels[i:i + 1], n) for i, n in enumerate(names)])
    torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-6)


def _hf_one(model, pixels, name):
    model.set_active(name)
    return model(pixel_values=pixels).logits


def test_training_gradients_equal_per_sample_runs_and_reach_only_used_adapters():
    model = loaded_vit()
    model.add_adapter("unused", AdapterConfig(rank=2, alpha=2, targets=["qkv"]))
    model.set_trainable(model.adapters)
    reference = copy.deepcopy(model)
    names = ["whole", "dora", None, "sliced", "pissa", "whole"]
    x = torch.randn(len(names), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(len(names)) % 5
    model.train()
    nn.functional.cross_entropy(model(x, adapters=names), labels, reduction="sum").backward()
    reference.train()
    for i, name in enumerate(names):  # the same loss, one sample at a time, each with its adapter
        if name is None:
            continue  # the base model's samples reach no adapter
        reference.set_active(name)
        reference.set_trainable(reference.adapters)
        nn.functional.cross_entropy(reference(x[i:i + 1]), labels[i:i + 1], reduction="sum").backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    want = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    used = {"whole", "dora", "sliced", "pissa"}
    assert {name for key in got for name in used | {"unused"} if f".{name}" in key} == used
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6)


def test_dropout_in_training_touches_only_the_adapter_branch():
    model = vislora.inject(tiny_timm(), AdapterConfig(rank=4, alpha=8, targets=["qkv", "fc1"], dropout=0.5), "a")
    randomize_adapters(model)
    base = tiny_timm().train()
    model.train()
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    routed = model(x, adapters=["a", None, "a", None])
    torch.testing.assert_close(routed[[1, 3]], base(x[[1, 3]]), rtol=1e-5, atol=1e-6)  # base samples: no dropout
    model.eval()
    assert (routed[[0, 2]] - model(x[[0, 2]], adapters=["a", "a"])).abs().max() > 1e-4  # adapter samples: dropout


def test_bad_adapter_lists_are_refused_clearly():
    model = loaded_vit()
    x = torch.randn(3, 3, 32, 32)
    with pytest.raises(AdapterError, match=r"unknown adapter\(s\) \['nope'\] in adapters=; loaded: \['whole'"):
        model(x, adapters=["whole", "nope", None])
    with pytest.raises(AdapterError, match="adapters= has 2 entries but the batch has 3 samples"):
        model(x, adapters=["whole", None])
    with pytest.raises(AdapterError, match="one adapter name \\(or None\\) per sample"):
        model(x, adapters="whole")
    model.set_active("whole")
    model.merge()
    with pytest.raises(AdapterError, match="call unmerge\\(\\) before routing"):
        model(x, adapters=["whole"] * 3)
    assert all(layer.route is None for layer in model.layers().values())


def test_a_layer_that_does_not_see_the_batch_first_names_itself():
    class Transposing(nn.Module):  # puts the tokens first before its Linear
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x.transpose(0, 1)).transpose(0, 1)

    model = vislora.inject(Transposing(), AdapterConfig(rank=2, alpha=2, targets=["fc"]))
    with pytest.raises(AdapterError, match=r"layer 'fc' sees a batch of 3"):
        model(torch.randn(2, 3, 4), adapters=["default", None])
    assert all(isinstance(layer, LoraLayer) and layer.route is None for layer in model.layers().values())


def test_a_layer_that_sees_the_tokens_folded_into_the_batch_routes_each_sample():
    """OPT flattens (samples, tokens, features) to (samples x tokens, features) before its MLP: each sample's rows
    take its adapter, as computing each sample alone does."""
    class Flattening(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x.reshape(-1, 4)).reshape(x.shape)

    model = vislora.inject(Flattening(), AdapterConfig(rank=2, alpha=2, targets=["fc"]))
    with torch.no_grad():
        model.layers_of("default")["fc"].lora_B.normal_()
        x = torch.randn(2, 3, 4)
        routed = model(x, adapters=["default", None])
        with model.disabled():
            base = model(x)
        assert torch.allclose(routed[0], model(x[:1])[0], atol=1e-6)
        assert torch.allclose(routed[1], base[1], atol=1e-6)
        assert not torch.allclose(routed[0], base[0], atol=1e-3)  # the adapter changes sample 0


def test_a_sequence_first_tower_does_not_change_how_another_tower_is_routed():
    class TwoTowers(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = tiny_timm()
            self.text = tiny_open_clip_tower()
            for block in self.text.resblocks:
                block.attn.batch_first = False
            self.text.batch_first = False

        def forward(self, images, tokens):
            return self.vision(images), self.text(tokens)

    model = vislora.inject(TwoTowers(), AdapterConfig(rank=2, alpha=4, targets=["qkv", "fc1", "c_fc"]), name="a")
    assert model.layers()["vision.blocks.0.mlp.fc1"].batch_dim == 0
    assert model.layers()["text.resblocks.0.mlp.c_fc"].batch_dim == 1
    randomize_adapters(model)
    images, tokens = torch.randn(3, 3, 32, 32), torch.randn(3, 5, 32)
    routed = model(images, tokens, adapters=["a", None, "a"])
    expected = [one_by_one_pair(model, images, tokens, i, name) for i, name in enumerate(["a", None, "a"])]
    for tower in (0, 1):
        torch.testing.assert_close(routed[tower], torch.cat([e[tower] for e in expected]), rtol=1e-5, atol=1e-6)


def one_by_one_pair(model, images, tokens, i, name):
    if name is None:
        with model.disabled():
            return model(images[i:i + 1], tokens[i:i + 1])
    model.set_active(name)
    return model(images[i:i + 1], tokens[i:i + 1])


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 2e-3), (torch.bfloat16, 0.02)])
def test_routing_and_merge_on_cuda_equal_the_cpu_float32_reference(dtype, atol):
    """Outputs ~0.26; the same steps on the CPU in bfloat16 differ from float32 by 2.2e-3. float32 on CUDA allows
    TF32 in the patch-embedding convolution (cuDNN's default), hence 2e-3 rather than float32 rounding."""
    model = loaded_vit()
    x = torch.randn(len(NAMES), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(x, adapters=NAMES)  # CPU float32
        model.to(device="cuda", dtype=dtype)
        routed = model(x.to("cuda", dtype), adapters=NAMES)
        torch.testing.assert_close(routed.float().cpu(), reference, rtol=0, atol=atol)
        model.set_active("whole")
        unmerged = model(x.to("cuda", dtype))
        model.merge()
        merged = model(x.to("cuda", dtype))
    assert merged.device.type == "cuda"
    torch.testing.assert_close(merged.float(), unmerged.float(), rtol=0, atol=atol)
    torch.testing.assert_close(unmerged.float().cpu()[0], reference[0], rtol=0, atol=atol)  # NAMES[0] is "whole"
