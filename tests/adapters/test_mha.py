import copy

import pytest
import torch
from torch import nn

from conftest import tiny_open_clip_tower
from vislora.adapters import LoRA, LoraLinear
from vislora.adapters.mha import LoraMultiheadAttention
from vislora.errors import TargetError

E, H, N, L, S = 16, 4, 2, 5, 7
TOL = {"atol": 1e-5, "rtol": 1e-5}
CAUSAL = nn.Transformer.generate_square_subsequent_mask(L)  # float: -inf above the diagonal


def make_mha(batch_first: bool = True, **kwargs) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first, **kwargs).eval()
    with torch.no_grad():  # torch zero-inits the biases; non-zero ones are checked too
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    return mha


def tokens(length: int, batch_first: bool = True, batched: bool = True, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if not batched:
        return torch.randn(length, E, generator=gen)
    return torch.randn(*((N, length) if batch_first else (length, N)), E, generator=gen)


def bool_mask(*shape: int) -> torch.Tensor:
    mask = torch.rand(*shape, generator=torch.Generator().manual_seed(2)) < 0.3
    mask[..., 0] = False  # no row fully masked: both implementations would return NaN there
    return mask


def float_mask(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(3))


def padding(n: int, s: int) -> torch.Tensor:
    mask = torch.zeros(n, s, dtype=torch.bool)
    mask[-1, -2:] = True  # the last sequence is two tokens shorter
    return mask


def assert_same(got: tuple, expected: tuple) -> None:
    torch.testing.assert_close(got[0], expected[0], **TOL)
    if expected[1] is None:
        assert got[1] is None
    else:
        torch.testing.assert_close(got[1], expected[1], **TOL)


PAD, FLOAT_PAD = padding(N, L), float_mask(N, L)
CAUSAL_BOOL = torch.ones(L, L, dtype=torch.bool).triu(1)

# (id, batch_first, batched, source length or None for self-attention, forward kwargs)
CASES = [
    ("batch_first", True, True, None, {}),
    ("seq_first", False, True, None, {}),
    ("unbatched", True, False, None, {}),
    ("unbatched_seq_first", False, False, None, {}),
    ("bool_mask_2d", True, True, None, {"attn_mask": bool_mask(L, L)}),
    ("float_mask_2d", False, True, None, {"attn_mask": float_mask(L, L)}),
    ("bool_mask_3d", True, True, None, {"attn_mask": bool_mask(N * H, L, L)}),
    ("float_mask_3d", False, True, None, {"attn_mask": float_mask(N * H, L, L)}),
    ("unbatched_mask_3d", True, False, None, {"attn_mask": float_mask(H, L, L)}),
    ("padding", True, True, None, {"key_padding_mask": PAD}),
    ("float_padding", True, True, None, {"key_padding_mask": FLOAT_PAD}),
    ("padding_and_mask", False, True, None, {"attn_mask": bool_mask(L, L), "key_padding_mask": PAD}),
    ("unbatched_padding", True, False, None, {"key_padding_mask": padding(1, L)[0]}),
    ("per_head", True, True, None, {"average_attn_weights": False}),
    ("unbatched_per_head", True, False, None, {"average_attn_weights": False}),
    ("causal", True, True, None, {"attn_mask": CAUSAL, "is_causal": True}),
    ("causal_bool", False, True, None, {"attn_mask": CAUSAL_BOOL, "is_causal": True}),
    ("causal_padding", True, True, None, {"attn_mask": CAUSAL, "is_causal": True,
                                          "key_padding_mask": FLOAT_PAD}),
    ("cross", True, True, S, {}),
    ("cross_seq_first", False, True, S, {}),
    ("cross_unbatched", True, False, S, {}),
    ("cross_masks", True, True, S, {"attn_mask": bool_mask(N * H, L, S), "key_padding_mask": padding(N, S)}),
]


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize(("batch_first", "batched", "source", "kwargs"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_without_adapters_matches_torch(batch_first, batched, source, kwargs, need_weights):
    base = make_mha(batch_first)
    layer = LoraMultiheadAttention(copy.deepcopy(base)).eval()
    query = tokens(L, batch_first, batched)
    key = query if source is None else tokens(source, batch_first, batched, seed=4)
    kwargs = {**kwargs, "need_weights": need_weights}
    assert_same(layer(query, key, key, **kwargs), base(query, key, key, **kwargs))


def test_cross_attention_with_distinct_key_and_value():
    base = make_mha()
    layer = LoraMultiheadAttention(copy.deepcopy(base)).eval()
    query, key, value = tokens(L), tokens(S, seed=4), tokens(S, seed=5)
    for need_weights in (True, False):
        assert_same(layer(query, key, value, need_weights=need_weights),
                    base(query, key, value, need_weights=need_weights))


@pytest.mark.parametrize("need_weights", [True, False])
def test_is_causal_without_mask_means_the_causal_mask(need_weights):
    base = make_mha()
    layer = LoraMultiheadAttention(copy.deepcopy(base)).eval()
    x = tokens(L)
    expected = base(x, x, x, attn_mask=CAUSAL, is_causal=True, need_weights=need_weights)
    assert_same(layer(x, x, x, is_causal=True, need_weights=need_weights), expected)


@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_only_in_training_and_as_torch_draws_it(need_weights):
    base = make_mha(dropout=0.5)
    layer = LoraMultiheadAttention(copy.deepcopy(base))
    x = tokens(L)
    base.eval()
    layer.eval()
    assert_same(layer(x, x, x, need_weights=need_weights), base(x, x, x, need_weights=need_weights))
    base.train()
    layer.train()
    torch.manual_seed(7)
    expected = base(x, x, x, need_weights=need_weights)
    torch.manual_seed(7)
    assert_same(layer(x, x, x, need_weights=need_weights), expected)
    assert not torch.allclose(expected[0], base.eval()(x, x, x)[0])


@pytest.mark.parametrize("slices", [(), (0, 2)], ids=["whole", "q_and_v"])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_adapter_equals_the_merged_in_proj_weight(slices, cross):
    base = make_mha()
    layer = LoraMultiheadAttention(copy.deepcopy(base)).eval()
    layer.add_adapter("a", LoRA(rank=4, scale=2.0, dropout=0.0, blocks=slices))
    layer.adapters["a"].lora_B.data.normal_()
    layer.active = ("a",)
    reference = copy.deepcopy(base)
    with torch.no_grad():
        reference.in_proj_weight += layer.delta_weight("a")
    query = tokens(L)
    key, value = (tokens(S, seed=4), tokens(S, seed=5)) if cross else (query, query)
    for need_weights in (True, False):
        got = layer(query, key, value, need_weights=need_weights)
        assert_same(got, reference(query, key, value, need_weights=need_weights))
    assert not torch.allclose(got[0], base(query, key, value)[0])
    if slices:  # k is untouched: its rows of the delta are zero
        assert layer.delta_weight("a")[E : 2 * E].abs().sum() == 0


def test_two_active_adapters_add_up():
    base = make_mha(batch_first=False)
    layer = LoraMultiheadAttention(copy.deepcopy(base)).eval()
    layer.add_adapter("a", LoRA(rank=4, scale=2.0, dropout=0.0))
    layer.add_adapter("b", LoRA(rank=2, scale=0.5, dropout=0.0, blocks=(1,)))
    for name in ("a", "b"):
        layer.adapters[name].lora_B.data.normal_()
    layer.active = ("a", "b")
    reference = copy.deepcopy(base)
    with torch.no_grad():
        reference.in_proj_weight += layer.delta_weight("a") + layer.delta_weight("b")
    query, key = tokens(L, batch_first=False), tokens(S, batch_first=False, seed=4)
    assert_same(layer(query, query, query), reference(query, query, query))
    assert_same(layer(query, key, key), reference(query, key, key))


@pytest.mark.parametrize("with_in_proj_adapter", [False, True])
def test_lora_linear_on_out_proj_is_applied(with_in_proj_adapter):
    base = make_mha()
    layer = LoraMultiheadAttention(copy.deepcopy(base)).eval()
    out_proj = LoraLinear(layer.base_layer.out_proj)
    out_proj.add_adapter("o", LoRA(rank=4, scale=2.0, dropout=0.0))
    out_proj.adapters["o"].lora_B.data.normal_()
    out_proj.active = ("o",)
    layer.base_layer.out_proj = out_proj
    reference = copy.deepcopy(base)
    with torch.no_grad():
        reference.out_proj.weight += out_proj.delta_weight("o")
    if with_in_proj_adapter:
        layer.add_adapter("a", LoRA(rank=4, scale=2.0, dropout=0.0, blocks=(0, 2)))
        layer.adapters["a"].lora_B.data.normal_()
        layer.active = ("a",)
        with torch.no_grad():
            reference.in_proj_weight += layer.delta_weight("a")
    x = tokens(L)
    for need_weights in (True, False):
        got = layer(x, x, x, need_weights=need_weights)
        assert_same(got, reference(x, x, x, need_weights=need_weights))
    assert not torch.allclose(got[0], base(x, x, x)[0])


@pytest.mark.parametrize("slices", [(), (0, 2)], ids=["whole", "q_and_v"])
def test_merge_and_unmerge(slices):
    layer = LoraMultiheadAttention(make_mha()).eval()
    original = layer.base_layer.in_proj_weight.detach().clone()
    layer.add_adapter("a", LoRA(rank=4, scale=2.0, dropout=0.0, blocks=slices))
    layer.adapters["a"].lora_B.data.normal_()
    layer.active = ("a",)
    query, key = tokens(L), tokens(S, seed=4)
    unmerged = layer(query, query, query), layer(query, key, key)
    layer.merge(("a",))
    assert layer.active == () and layer.merged_adapters == ("a",)
    assert_same(layer(query, query, query), unmerged[0])
    assert_same(layer(query, key, key), unmerged[1])
    assert layer.unmerge() == ("a",)
    torch.testing.assert_close(layer.base_layer.in_proj_weight.detach(), original, atol=1e-6, rtol=0)


@pytest.mark.parametrize("slices", [(), (0, 2)], ids=["whole", "q_and_v"])
def test_gradients_reach_only_the_adapter(slices):
    layer = LoraMultiheadAttention(make_mha())
    layer.base_layer.requires_grad_(False)
    layer.add_adapter("a", LoRA(rank=4, scale=2.0, dropout=0.0, blocks=slices))
    layer.active = ("a",)
    x = tokens(L)
    layer(x, x, x, need_weights=False)[0].square().sum().backward()
    a, b = layer.adapters["a"].lora_A, layer.adapters["a"].lora_B
    assert b.grad.abs().sum() > 0
    assert a.grad.abs().sum() == 0  # B = 0 at init blocks A's gradient
    assert all(p.grad is None for p in layer.base_layer.parameters())
    b.data.normal_()
    a.grad = b.grad = None
    layer(x, tokens(S, seed=4), tokens(S, seed=5))[0].square().sum().backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"kdim": 8, "vdim": 8}, "kdim=8/vdim=8 differ from embed_dim=16"),
        ({"add_bias_kv": True}, "add_bias_kv=True"),
        ({"add_zero_attn": True}, "add_zero_attn=True"),
    ],
)
def test_rejects_attention_it_cannot_adapt(kwargs, problem):
    with pytest.raises(TargetError, match=problem):
        LoraMultiheadAttention(nn.MultiheadAttention(E, H, **kwargs))


def test_forwards_the_attributes_callers_read():
    base = make_mha(batch_first=False)
    layer = LoraMultiheadAttention(base)
    forwarded = (layer.embed_dim, layer.num_heads, layer.batch_first, layer._qkv_same_embed_dim)
    assert forwarded == (E, H, False, True)
    assert layer.base_weight is base.in_proj_weight
    assert (layer.in_features, layer.out_features) == (E, 3 * E)


def test_rejects_masks_of_the_wrong_shape():
    layer = LoraMultiheadAttention(make_mha()).eval()
    x = tokens(L)
    with pytest.raises(RuntimeError, match=r"attn_mask has shape \(4, 5, 5\)"):
        layer(x, x, x, attn_mask=bool_mask(H, L, L))  # one batch entry's heads only, batch is 2
    with pytest.raises(RuntimeError, match="key_padding_mask"):
        layer(x, x, x, key_padding_mask=padding(N, L + 1))
    with pytest.raises(RuntimeError, match="bool or floating point"):
        layer(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.long))


def test_open_clip_tower_runs_through_the_wrapper():
    tower = tiny_open_clip_tower()
    reference = copy.deepcopy(tower)
    for block in tower.resblocks:
        block.attn = LoraMultiheadAttention(block.attn)
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.full((6, 6), float("-inf")).triu(1)
    torch.testing.assert_close(tower(x, attn_mask=mask), reference(x, attn_mask=mask), **TOL)
