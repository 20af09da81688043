"""vislora.input_size: each family runs at another side as its own library does it, and says how."""

import copy

import open_clip
import pytest
import timm
import torch
import transformers
from open_clip.model import resize_pos_embed
from timm.models.vision_transformer import checkpoint_filter_fn

from conftest import TINY_TIMM, tiny_hf_clip
from vislora.data.transforms import InputSpec, model_input_spec
from vislora.dual_encoder import HFDualEncoder
from vislora.errors import ConfigError
from vislora.input_size import (
    build_timm,
    check_sides,
    fit_input_size,
    input_size_of,
    resize_images,
    runs_at_any_size,
    sized_batch,
    step_side,
)
from vislora.runs import input_spec
from vislora.tasks.classification import LinearProbeClassifier, build_classifier

ARCH = "vit_tiny_patch16_224"
VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16}
TEXT = {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}


def images(side, n=2, seed=0):
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def tiny_timm(**kwargs):
    torch.manual_seed(0)
    return timm.create_model(ARCH, pretrained=False, **{**TINY_TIMM, **kwargs}).eval()


def pooled(output):
    """A get_image_features result as a tensor (transformers 5 returns an output object)."""
    return output if torch.is_tensor(output) else output.pooler_output


def tiny_hf_vit():
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8)
    return transformers.ViTModel(config, add_pooling_layer=False).eval()


def tiny_open_clip(image_size=32):
    torch.manual_seed(0)
    return open_clip.CLIP(embed_dim=16, vision_cfg={**VISION, "image_size": image_size}, text_cfg=TEXT).eval()


@torch.no_grad()
def test_timm_at_its_native_side_is_left_as_it_is():
    model = tiny_timm()
    before = model(images(32))
    record = fit_input_size(model, 32)
    assert torch.equal(model(images(32)), before)
    assert (record.size, record.native_size, record.position_embeddings, record.patch_size) == (32, 32, "native", 8)


@torch.no_grad()
def test_timm_at_twice_the_side_equals_timms_own_resampled_model():
    model = tiny_timm()
    reference = tiny_timm(img_size=64)  # timm's loading path: the 32-px state dict through its checkpoint filter
    reference.load_state_dict(checkpoint_filter_fn(model.state_dict(), reference))
    record = fit_input_size(model, 64)
    assert torch.equal(model(images(64)), reference(images(64)))
    assert (record.native_size, record.position_embeddings) == (32, "timm-resample")


@torch.no_grad()
def test_build_timm_from_a_recorded_native_side_draws_the_run_base_then_resamples():
    def load(**kwargs):
        torch.manual_seed(0)
        return timm.create_model(ARCH, pretrained=False, num_classes=5, **{k: v for k, v in TINY_TIMM.items()
                                                                           if k not in ("img_size", "num_classes")},
                                 **kwargs).eval()

    model = build_timm(load, 64, {}, pretrained=False, native_size=32)
    reference = tiny_timm()  # the base a 32-px run drew, resampled by timm itself
    reference.set_input_size(img_size=(64, 64))
    assert torch.equal(model(images(64)), reference(images(64)))
    assert input_size_of(model).position_embeddings == "timm-resample"
    dynamic = build_timm(load, 32, {}, pretrained=False, dynamic=True)
    assert runs_at_any_size(dynamic) and not runs_at_any_size(reference)
    assert torch.allclose(dynamic(images(64)), reference(images(64)), atol=1e-6)


@torch.no_grad()
def test_hf_vit_runs_at_its_native_side_unchanged_and_interpolates_at_twice_it():
    backbone = tiny_hf_vit()
    classifier = LinearProbeClassifier(backbone, 32, 3)
    assert torch.equal(classifier.features(images(32)), backbone(pixel_values=images(32)).last_hidden_state[:, 0])
    with pytest.raises(ValueError, match="doesn't match model"):  # HF ViT needs to be asked to interpolate
        backbone(pixel_values=images(64))
    expected = backbone(pixel_values=images(64), interpolate_pos_encoding=True).last_hidden_state[:, 0]
    assert torch.equal(classifier.features(images(64)), expected)
    record = fit_input_size(backbone, 64)
    assert (record.native_size, record.position_embeddings, record.patch_size) == (32, "hf-interpolate", 8)
    assert runs_at_any_size(backbone)


@torch.no_grad()
def test_open_clip_resized_equals_open_clips_own_loading_at_that_side():
    model = tiny_open_clip()
    assert fit_input_size(copy.deepcopy(model), 32).position_embeddings == "native"
    reference = tiny_open_clip(image_size=64)  # create_model(force_image_size=64) loads a checkpoint this way
    state = dict(model.state_dict())
    resize_pos_embed(state, reference)
    reference.load_state_dict(state)
    record = fit_input_size(model, 64)
    assert torch.equal(model.encode_image(images(64)), reference.encode_image(images(64)))
    assert (record.native_size, record.position_embeddings) == (32, "open_clip-resize")
    assert fit_input_size(model, 64) == record  # fitting again (the trainer does) keeps what was done
    assert model.visual.image_size == (64, 64) and model_input_spec(model).size == 64  # what transforms read
    with pytest.raises(ConfigError, match="runs at one side per build"):
        check_sides(model, [32, 64])


def test_build_classifier_records_how_each_family_runs():
    model, _ = build_classifier(f"timm:{ARCH}", 3, pretrained=False, image_size=48, patch_size=8, embed_dim=32,
                                depth=2, num_heads=2)
    assert input_size_of(model).position_embeddings == "native"  # random weights drawn at 48: nothing resampled
    assert model(images(48)).shape == (2, 3)
    cnn, _ = build_classifier("timm:resnet18", 3, pretrained=False, image_size=40)
    assert input_size_of(cnn).position_embeddings == "none" and runs_at_any_size(cnn)


def test_sides_must_be_multiples_of_the_patch():
    with pytest.raises(ConfigError, match=r"multiple of the patch size 8 \(e\.g\. 16 or 24\)"):
        check_sides(tiny_timm(dynamic_img_size=True), [16, 20])
    with pytest.raises(ConfigError, match="runs at one side per build"):
        check_sides(tiny_timm(), [16, 32])
    check_sides(tiny_timm(dynamic_img_size=True), [16, 32])


def test_step_sides_are_drawn_from_seed_and_step_alone():
    sides = [16, 24, 32]
    drawn = [step_side(sides, seed=3, step=step) for step in range(60)]
    assert drawn == [step_side(list(reversed(sides)), seed=3, step=step) for step in range(60)]
    assert set(drawn) == set(sides) and drawn != [step_side(sides, seed=4, step=step) for step in range(60)]


def test_sized_batch_resizes_the_images_only_for_a_mixed_run():
    batch = {"image": images(32), "label": torch.tensor([0, 1])}
    spec = InputSpec(32, train_sizes=(16, 24))
    sized = sized_batch(batch, spec, seed=0, step=5)
    side = step_side((16, 24), 0, 5)
    assert sized["image"].shape == (2, 3, side, side) and sized["label"] is batch["label"]
    expected = torch.nn.functional.interpolate(batch["image"], size=(side, side), mode="bicubic", antialias=True)
    assert torch.equal(sized["image"], expected)
    assert sized_batch(batch, InputSpec(32), 0, 5) is batch and resize_images(batch["image"], 32) is batch["image"]


def test_an_old_task_json_reads_without_the_size_record():
    spec = input_spec({"input": {"size": 32, "mean": [0.5] * 3, "std": [0.2] * 3, "interpolation": "bicubic"}})
    assert (spec.native_size, spec.position_embeddings, spec.train_sizes) == (None, None, None)
    new = input_spec({"input": {"size": 32, "mean": [0.5] * 3, "std": [0.2] * 3, "interpolation": "bicubic",
                                "native_size": 224, "position_embeddings": "timm-resample", "train_sizes": [16, 32]}})
    assert new.train_sizes == (16, 32) and new.preprocessing() == spec.preprocessing()
    assert new.preprocessing() == {"mean": (0.5,) * 3, "std": (0.2,) * 3, "interpolation": "bicubic",
                                   "window": "auto"}


@torch.no_grad()
def test_a_clip_dual_encoder_image_tower_interpolates_at_another_side():
    clip = tiny_hf_clip()
    model = HFDualEncoder(clip, tokenizer=None)
    record = fit_input_size(model.vision_tower, 64)
    assert (record.native_size, record.position_embeddings) == (32, "hf-interpolate")
    expected = pooled(clip.get_image_features(pixel_values=images(64), interpolate_pos_encoding=True))
    assert torch.equal(model.image_features(images(64)), expected)
    assert torch.equal(model.image_features(images(32)), pooled(clip.get_image_features(pixel_values=images(32))))
