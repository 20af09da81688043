import pytest
from torch import nn

import vislora
from conftest import tiny_hf_clip, tiny_hf_vit, tiny_open_clip_tower, tiny_timm
from vislora import AdapterConfig, TargetError, resolve_targets


def plan_for(model, **cfg):
    return resolve_targets(model, AdapterConfig(**cfg))


def test_role_slices_on_timm_fused_qkv(vit):
    plan = plan_for(vit, targets=["q", "v"])
    assert [(t.path, t.slices, t.kind) for t in plan.targets] == [
        ("blocks.0.attn.qkv", ("q", "v"), "linear"),
        ("blocks.1.attn.qkv", ("q", "v"), "linear"),
    ]
    # two pairs per layer: A [r, 32] and B [32/... d=32, r] for q and for v
    model = vislora.inject(vit, AdapterConfig(targets=["q", "v"]))
    assert sum(model.parameter_counts("default").values()) == 2 * 2 * 8 * (32 + 32)


def test_qkv_role_is_one_pair_on_the_fused_layer(vit):
    plan = plan_for(vit, targets=["qkv", "o"])
    assert plan.counts() == {"blocks.N.attn.qkv": 2, "blocks.N.attn.proj": 2}
    assert all(t.slices == () for t in plan.targets)


def test_attn_proj_never_catches_patch_embed_conv(vit):
    plan = plan_for(vit, targets=["attn.proj"])
    assert [t.path for t in plan.targets] == ["blocks.0.attn.proj", "blocks.1.attn.proj"]
    with pytest.raises(TargetError, match=r"'proj' matches 'patch_embed.proj', a Conv2d"):
        plan_for(vit, targets=["proj"])


def test_pattern_matching_nothing_suggests_names(vit):
    with pytest.raises(TargetError, match=r"'attn.qvk' matches no module.*Did you mean: blocks.N.attn.qkv"):
        plan_for(vit, targets=["attn.qvk"])


def test_container_match_lists_adaptable_layers_inside(vit):
    with pytest.raises(TargetError, match=r"'blocks.0.attn', a Attention.*blocks.0.attn.qkv"):
        plan_for(vit, targets=["attn"])


def test_regex_targets_and_exclude(vit):
    plan = plan_for(vit, targets=[r"re:blocks\.\d+\.mlp\.fc\d"], exclude=["blocks.0.mlp.fc2"])
    assert [t.path for t in plan.targets] == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]


def test_layer_selection_counts_from_the_end(vit):
    assert [t.path for t in plan_for(vit, targets=["qkv"], layers=[-1]).targets] == ["blocks.1.attn.qkv"]
    assert [t.path for t in plan_for(vit, targets=["qkv"], layers=[0]).targets] == ["blocks.0.attn.qkv"]
    with pytest.raises(TargetError, match=r"block 2, but 'blocks.' has 2 blocks"):
        plan_for(vit, targets=["qkv"], layers=[2])


def test_layers_filter_that_leaves_nothing_is_an_error(vit):
    with pytest.raises(TargetError, match="left nothing to adapt"):
        plan_for(vit, targets=["head"], layers=[0])


def test_rank_and_alpha_patterns_per_layer(vit):
    plan = plan_for(vit, rank=4, alpha=8, targets=["qkv", "o"], rank_pattern={"blocks.1.attn.qkv": 2},
                    alpha_pattern={"attn.proj": 1})
    by_path = {t.path: (t.rank, t.alpha, t.scale) for t in plan.targets}
    assert by_path["blocks.0.attn.qkv"] == (4, 8, 2.0)
    assert by_path["blocks.1.attn.qkv"] == (2, 8, 4.0)
    assert by_path["blocks.0.attn.proj"] == (4, 1, 0.25)


def test_whole_and_slice_of_one_layer_conflict(vit):
    with pytest.raises(TargetError, match="both as a whole fused layer and as slice"):
        plan_for(vit, targets=["attn.qkv", "q"])


def test_unknown_role_for_model_without_such_modules():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(TargetError, match=r"role 'q' found no module.*Linear layers here include: 0, 2"):
        plan_for(model, targets=["q"])


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        (lambda: tiny_timm("deit_tiny_patch16_224"), {"blocks.N.attn.qkv[q,v]": 2, "blocks.N.attn.proj": 2,
                                                     "blocks.N.mlp.fc1": 2, "blocks.N.mlp.fc2": 2}),
        (lambda: tiny_timm("beit_base_patch16_224"), {"blocks.N.attn.qkv[q,v]": 2, "blocks.N.attn.proj": 2,
                                                     "blocks.N.mlp.fc1": 2, "blocks.N.mlp.fc2": 2}),
        (lambda: tiny_timm("eva02_tiny_patch14_224"), {"blocks.N.attn.qkv[q,v]": 2, "blocks.N.attn.proj": 2,
                                                      "blocks.N.mlp.fc1": 2, "blocks.N.mlp.fc2": 2}),
        (tiny_hf_vit, {"vit.layers.N.attention.q_proj": 2, "vit.layers.N.attention.v_proj": 2,
                       "vit.layers.N.attention.o_proj": 2, "vit.layers.N.mlp.fc1": 2, "vit.layers.N.mlp.fc2": 2}),
        (tiny_open_clip_tower, {"resblocks.N.attn.in_proj[q,v]": 2, "resblocks.N.attn.out_proj": 2,
                                "resblocks.N.mlp.c_fc": 2, "resblocks.N.mlp.c_proj": 2}),
    ],
)
def test_roles_resolve_per_family(factory, expected):
    assert plan_for(factory(), targets=["q", "v", "o", "fc1", "fc2"]).counts() == expected


def test_roles_cover_both_towers_of_clip():
    counts = plan_for(tiny_hf_clip(), targets=["attention"]).counts()
    assert counts == {f"{tower}.encoder.layers.N.self_attn.{p}": 2 for tower in ("text_model", "vision_model")
                      for p in ("q_proj", "k_proj", "v_proj", "out_proj")}


def test_bert_style_text_tower_names():
    import transformers

    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, intermediate_size=64,
                                                          num_hidden_layers=2, num_attention_heads=2,
                                                          vocab_size=100))
    counts = plan_for(bert, targets=["qkv", "o", "mlp"]).counts()
    assert counts == {f"encoder.layer.N.{p}": 2 for p in ("attention.self.query", "attention.self.key",
                                                           "attention.self.value", "attention.output.dense",
                                                           "intermediate.dense", "output.dense")}


def test_hf_dinov2_and_siglip_names():
    import transformers

    dino = transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2,
                                                              num_attention_heads=2, image_size=28, patch_size=14))
    assert plan_for(dino, targets=["q", "v"]).counts() == {"encoder.layer.N.attention.q_proj": 2,
                                                          "encoder.layer.N.attention.v_proj": 2}
    siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8))
    counts = plan_for(siglip, targets=["q", "v"], layers=[0, 1]).counts()
    assert counts == {"encoder.layers.N.self_attn.q_proj": 2, "encoder.layers.N.self_attn.v_proj": 2}


def test_whole_multihead_attention_by_path():
    plan = plan_for(tiny_open_clip_tower(), targets=["resblocks.0.attn"])
    assert [(t.path, t.kind) for t in plan.targets] == [("resblocks.0.attn.in_proj", "mha_in_proj"),
                                                        ("resblocks.0.attn.out_proj", "linear")]


def test_modules_to_save_and_norms(vit):
    plan = plan_for(vit, targets=["qkv"], modules_to_save=["head"], train_norms=True)
    assert "head" in plan.modules_to_save
    assert {"blocks.0.norm1", "blocks.1.norm2", "norm"} <= set(plan.modules_to_save)
    with pytest.raises(TargetError, match="modules_to_save entry 'classifier' matches no module"):
        plan_for(vit, targets=["qkv"], modules_to_save=["classifier"])


def test_plan_prints_counts(vit):
    text = str(plan_for(vit, targets=["qkv", "o"], modules_to_save="head"))
    assert "4 adapted weights" in text and "2 x blocks.N.attn.qkv" in text and "head" in text


def test_sliced_path_targets(vit):
    plan = plan_for(vit, targets=["blocks.1.attn.qkv[k]", r"re:blocks\.0\.attn\.qkv[q,v]"])
    assert [(t.path, t.slices) for t in plan.targets] == [("blocks.0.attn.qkv", ("q", "v")),
                                                         ("blocks.1.attn.qkv", ("k",))]
    with pytest.raises(TargetError, match=r"slices of 'blocks.1.mlp.fc1', which is not a fused qkv projection"):
        plan_for(vit, targets=["blocks.1.mlp.fc1[q]"])
    with pytest.raises(TargetError, match="matches no module"):
        plan_for(vit, targets=["blocks.7.attn.qkv[q]"])
