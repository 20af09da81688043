"""TiledClassifier: tiles -> features in chunks -> mean / max / attention-MIL pooling -> head, checked against the
untiled model and hand computations; gradients under checkpointing; per-image routing; save and reload."""

import pytest
import torch
import torch.nn.functional as F

from conftest import randomize_adapters, tiny_classifier, tiny_hf_vit
from vislora import AdapterConfig, AdapterError, ConfigError, inject
from vislora.data.tiling import TilingConfig, tile
from vislora.formats import load_adapter, save_adapter
from vislora.tasks.classification import LinearProbeClassifier
from vislora.tasks.tiled import TiledClassifier, build_tiled_classifier

AGGREGATES = ["mean", "max", "attention"]


def tiled(aggregate="mean", classifier=None, **tiling):
    torch.manual_seed(3)
    classifier = classifier if classifier is not None else tiny_classifier()[0]
    return TiledClassifier(classifier, 32, TilingConfig(aggregate=aggregate, **tiling)).eval()


def images(*shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=gen) for h, w in shapes]


def hf_classifier():
    torch.manual_seed(0)
    return LinearProbeClassifier(tiny_hf_vit().vit, 32, 3)


def tile_features(model, image):
    """Each tile's features computed by the untiled classifier, one tile at a time (the reference)."""
    tiles, _ = tile(image, model.tiling.size, model.tiling.overlap, model.input_size)
    return torch.cat([model.classifier.features(t[None]) for t in tiles])


def hand_attention(module, h):
    """a = softmax(w^T (tanh(V h) * sigmoid(U h))) with the module's matrices, and sum_k a_k h_k."""
    V, U, w = module.V.weight, module.U.weight, module.w.weight  # (L, D), (L, D), (1, L)
    scores = (torch.tanh(h @ V.T) * torch.sigmoid(h @ U.T)) @ w[0]  # (N, D) @ (D, L) -> (N, L) @ (L,) -> (N,)
    a = torch.exp(scores - scores.max()) / torch.exp(scores - scores.max()).sum()
    return a, (a[:, None] * h).sum(0)


@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("make", [lambda: tiny_classifier()[0], hf_classifier], ids=["timm", "hf"])
def test_one_tile_equals_the_untiled_forward_exactly(aggregate, make):
    classifier = make().eval()
    model = tiled(aggregate, classifier)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), classifier(x))


@pytest.mark.parametrize("aggregate", ["mean", "max"])
def test_mean_and_max_equal_a_hand_computation_over_tile_features(aggregate):
    model = tiled(aggregate, overlap=8, tiles_per_step=3)
    batch = images((70, 50), (32, 100))
    with torch.no_grad():
        pooled = model.features(batch)
        for image, row in zip(batch, pooled, strict=True):
            per_tile = tile_features(model, image)
            expected = per_tile.mean(0) if aggregate == "mean" else per_tile.amax(0)
            torch.testing.assert_close(row, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(batch), model.head(pooled))


def test_attention_weights_sum_to_one_and_pool_by_the_formula():
    model = tiled("attention", overlap=4)
    batch = images((64, 80), (40, 40))
    with torch.no_grad():
        weights = model.tile_weights(batch)
        pooled = model.features(batch)
        for image, row, a in zip(batch, pooled, weights, strict=True):
            h = tile_features(model, image)
            expected_a, expected = hand_attention(model.tile_attention, h)
            assert a.shape == (len(h),) and torch.isclose(a.sum(), torch.tensor(1.0))
            torch.testing.assert_close(a, expected_a, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(row, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_chunks_of_two_tiles_equal_one_call(aggregate):
    batch = images((70, 90), (45, 33))
    chunked = tiled(aggregate, overlap=8, tiles_per_step=2)
    whole = tiled(aggregate, overlap=8, tiles_per_step=64)
    with torch.no_grad():
        torch.testing.assert_close(chunked(batch), whole(batch), rtol=1e-5, atol=1e-6)


def test_images_of_their_own_sizes_equal_each_image_alone():
    model = tiled("attention", overlap=8, tiles_per_step=5)
    batch = images((70, 90), (20, 40), (32, 32))
    with torch.no_grad():
        together = model(batch)
        alone = torch.cat([model([image]) for image in batch])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_backbone_never_sees_more_than_tiles_per_step():
    model = tiled("attention", overlap=8, tiles_per_step=3)
    inject(model, AdapterConfig(targets=["qkv"], rank=2, modules_to_save=model.trained_modules()))
    seen = []
    model.backbone.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    model.train()
    F.cross_entropy(model(images((96, 96), (64, 40))), torch.tensor([0, 2])).backward()
    assert max(seen) <= 3 and sum(seen) == 2 * (16 + 6)  # each chunk again in the backward pass


def test_checkpointed_gradients_equal_the_plain_computation():
    model = tiled("attention", overlap=8, tiles_per_step=2)
    adapted = inject(model, AdapterConfig(targets=["qkv"], rank=2, modules_to_save=model.trained_modules()))
    randomize_adapters(adapted)
    adapted.train()
    batch, labels = images((70, 50), (40, 64)), torch.tensor([1, 2])
    F.cross_entropy(adapted(batch), labels).backward()
    trainable = {n: p for n, p in adapted.named_parameters() if p.requires_grad}
    checkpointed = {n: p.grad.clone() for n, p in trainable.items()}
    adapted.zero_grad()
    pooled = []  # the same loss without tiling code: each tile alone, pooled by the formula
    for image in batch:
        _, row = hand_attention(model.tile_attention, tile_features(model, image))
        pooled.append(row)
    F.cross_entropy(model.head(torch.stack(pooled)), labels).backward()
    assert any("lora_" in n for n in trainable) and any("tile_attention" in n for n in trainable)
    for name, param in trainable.items():
        assert checkpointed[name].abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def routed_model(aggregate):
    model = tiled(aggregate, overlap=8, tiles_per_step=4)
    adapted = inject(model, AdapterConfig(targets=["qkv"], rank=2, modules_to_save=model.trained_modules()), "a")
    adapted.add_adapter("b", AdapterConfig(targets=["qkv"], rank=4, modules_to_save=model.trained_modules()))
    randomize_adapters(adapted)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name in ("a", "b"):
            for module in adapted.saved_modules(name).values():
                for param in module.parameters():
                    param.add_(torch.randn(param.shape, generator=gen) * 0.3)
    return adapted.eval()


@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_routed_tiles_equal_each_image_alone_with_its_adapter(aggregate):
    adapted = routed_model(aggregate)
    batch, names = images((70, 50), (32, 96), (40, 40), (64, 64)), ["a", "b", None, "a"]
    with torch.no_grad():
        routed = adapted(batch, adapters=names)
        alone = []
        for image, name in zip(batch, names, strict=True):
            if name is None:
                with adapted.disabled():
                    alone.append(adapted([image]))
            else:
                adapted.set_active(name)
                alone.append(adapted([image]))
        with adapted.disabled():
            base = adapted([batch[0]])
    torch.testing.assert_close(routed, torch.cat(alone), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alone[0], base, atol=1e-3)  # the adapter changes the answer


def test_routing_needs_one_name_per_image():
    adapted = routed_model("mean")
    with pytest.raises(AdapterError, match=r"one adapter name .* per image: got \['a'\] for 2 images"):
        adapted(images((40, 40), (40, 40)), adapters=["a"])


@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_saved_adapter_reloads_with_its_pooling(aggregate, tmp_path):
    adapted = routed_model(aggregate)
    adapted.set_active("b")
    batch = images((70, 50), (32, 96))
    with torch.no_grad():
        expected = adapted(batch)
    save_adapter(adapted, tmp_path / "b", "b")
    fresh = load_adapter(tiled(aggregate, overlap=8, tiles_per_step=4), tmp_path / "b").eval()
    with torch.no_grad():
        assert torch.equal(fresh(batch), expected)
    if aggregate == "attention":
        assert any(k.startswith("tile_attention.") for k in fresh.adapter_state("default"))


def test_refusals_name_the_fix():
    with pytest.raises(ConfigError, match="head='linear'"):
        TiledClassifier(torch.nn.Linear(3, 3), 32, TilingConfig())
    with pytest.raises(ConfigError, match=r"set model\.head: linear"):
        build_tiled_classifier("timm:vit_tiny_patch16_224", 3, TilingConfig(), pretrained=False, head="own")
    with pytest.raises(ConfigError, match="aggregate: attention"):
        tiled("mean").tile_weights(images((32, 32)))


def test_build_uses_a_linear_head_for_timm_auto():
    model = build_tiled_classifier("timm:vit_tiny_patch16_224", 3, TilingConfig(overlap=4, aggregate="attention"),
                                   pretrained=False, image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    assert model.input_size == 32 and model.tiling.size == 32
    assert model.trained_modules() == ["classifier.head", "tile_attention"]
    assert model(images((50, 80))).shape == (1, 3)
