import logging

import pytest
import torch
import torch.nn.functional as F
from dual_fixtures import save_towers, tiny_dual, word_tokenizer
from transformers import BertConfig

from conftest import tiny_hf_clip
from vislora import ConfigError
from vislora.dual_encoder import HFDualEncoder, OpenClipDualEncoder, build_dual_encoder
from vislora.tokenize import HFCaptionTokenizer, OpenClipCaptionTokenizer


def test_dual_encoder_projects_pooled_towers_and_normalises(images):
    model = tiny_dual()
    tokens = model.tokenize(["a photo of a red picture", "blue"])
    image_emb, text_emb = model(images=images, **tokens)
    with torch.no_grad():
        cls = model.vision(pixel_values=images).pooler_output  # [2, 32]
        hidden = model.text(**tokens).last_hidden_state  # [2, T, 32]
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * mask).sum(1) / mask.sum(1)  # padding left out of the mean
    torch.testing.assert_close(image_emb, F.normalize(cls @ model.vision_proj.weight.T, dim=-1))
    torch.testing.assert_close(text_emb, F.normalize(mean @ model.text_proj.weight.T, dim=-1))
    assert image_emb.shape == text_emb.shape == (2, 16)
    padded_alone = model.embed_texts(["blue"])  # the same caption without padding gives the same embedding
    torch.testing.assert_close(padded_alone[0], text_emb[1], atol=1e-5, rtol=1e-5)


def test_hf_clip_wrapper_matches_clip_features(images):
    clip = tiny_hf_clip()
    model = HFDualEncoder(clip, HFCaptionTokenizer(word_tokenizer(), max_length=16))
    ids = torch.tensor([[0, 5, 7, 1], [0, 9, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        out = clip(input_ids=ids, attention_mask=mask, pixel_values=images)
        image_emb, text_emb = model(images=images, input_ids=ids, attention_mask=mask)
        torch.testing.assert_close(model.logit_scale() * image_emb @ text_emb.T, out.logits_per_image)
    assert model.towers == {"vision": "model.vision_model", "text": "model.text_model"}
    assert model.heads == {"vision": "model.visual_projection", "text": "model.text_projection"}


def test_hf_siglip_wrapper_keeps_scale_and_bias(images):
    import transformers

    torch.manual_seed(0)
    config = transformers.SiglipConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 100, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8})
    siglip = transformers.SiglipModel(config).eval()
    with torch.no_grad():
        siglip.logit_scale.fill_(2.0)
        siglip.logit_bias.fill_(-3.0)
    model = HFDualEncoder(siglip, HFCaptionTokenizer(word_tokenizer(), 16, pad_to_max=True))
    ids = torch.tensor([[5, 7, 9, 1], [9, 1, 1, 1]])
    with torch.no_grad():
        out = siglip(input_ids=ids, pixel_values=images)
        image_emb, text_emb = model(images=images, input_ids=ids)
        logits = model.logit_scale() * image_emb @ text_emb.T + model.logit_scale.bias
    torch.testing.assert_close(logits, out.logits_per_image)
    assert model.tokenize(["red"])["input_ids"].shape == (1, 16)  # SigLIP pads to the full length
    assert model.heads == {}  # SigLIP's heads live inside its towers


def test_open_clip_wrapper_matches_encode_image_and_text():
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    clip = open_clip.model.CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16,
                                                                       patch_size=8, image_size=32),
                                text_cfg=CLIPTextCfg(context_length=12, vocab_size=49408, width=32, heads=2,
                                                     layers=1)).eval()
    tokenizer = OpenClipCaptionTokenizer(open_clip.get_tokenizer("ViT-B-32"), context_length=12)
    model = OpenClipDualEncoder(clip, tokenizer)
    pixels = torch.randn(2, 3, 32, 32)
    tokens = model.tokenize(["a photo of a cat", "a dog"])
    with torch.no_grad():
        image_emb, text_emb = model(images=pixels, **tokens)
        torch.testing.assert_close(image_emb, clip.encode_image(pixels, normalize=True))
        torch.testing.assert_close(text_emb, clip.encode_text(tokens["input_ids"], normalize=True))
    assert model.towers == {"vision": "model.visual", "text": "model.transformer"}
    model.tokenize(["a photo of a " + "very " * 20 + "long cat"])
    assert tokenizer.truncated == 1


def test_over_long_captions_are_truncated_counted_and_logged_once(caplog):
    model = tiny_dual(max_length=8)
    long = "a long caption that goes on and on and on and on"
    with caplog.at_level(logging.WARNING, logger="vislora.tokenize"):
        tokens = model.tokenize([long, "red", long])
        model.tokenize([long])
    assert tokens["input_ids"].shape == (3, 8)
    assert model.tokenizer.truncated == 3 and model.tokenizer.seen == 4
    warnings = [r for r in caplog.records if "truncated" in r.message]
    assert len(warnings) == 1 and "8 tokens" in warnings[0].message


def test_built_text_tower_has_its_own_dropout_off(tmp_path):
    vision, text = save_towers(tmp_path)
    assert BertConfig.from_pretrained(text).hidden_dropout_prob == 0.1  # as saved
    model = build_dual_encoder(f"hf:{vision}", f"hf:{text}", embed_dim=16).train()
    assert model.text.config.hidden_dropout_prob == model.text.config.attention_probs_dropout_prob == 0.0
    tokens = model.tokenize(["a photo of a red picture"])
    with torch.no_grad():
        torch.testing.assert_close(model(**tokens)[1], model(**tokens)[1], rtol=0, atol=0)  # training mode


def test_specs_without_a_text_tower_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"has no text tower; .*model\.text"):
        build_dual_encoder("timm:vit_tiny_patch16_224")
    with pytest.raises(ConfigError, match=r"unknown text asset 'nope'"):
        build_dual_encoder("timm:vit_tiny_patch16_224", "asset:nope", pretrained=False)
