"""Tiny VLMs of the transformers families (BLIP, BLIP-2, Idefics3, PaliGemma): random weights from config classes,
hidden width 32, 2 layers, 32-pixel images in 8-pixel patches, and a word-level tokenizer with each family's special
tokens (no hub), seconds to build."""

from __future__ import annotations

from typing import Any

import torch
import transformers as T
from tests.vlm.generative_fixtures import WORDS

from vislora.data.transforms import model_input_spec
from vislora.vlm import Vlm, VlmProcessor, family_of, lm_identity
from vislora.vlm.build import prompt_layout

SIDE = 32
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "image_size": SIDE, "patch_size": 8}
TEXT = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
# special tokens by family: (bos, eos, pad, others); BLIP's eos is its [SEP]
SPECIALS = {
    "blip": ("[DEC]", "[SEP]", "[PAD]", ()),
    "blip2": ("</s>", "</s>", "<pad>", ("<image>",)),
    "idefics3": ("<|begin_of_text|>", "<|end_of_text|>", "<pad>",
                 ("<fake_token_around_image>", "<global-img>", "<image>", "<end_of_utterance>")),
    "paligemma": ("<bos>", "<eos>", "<pad>", ("<image>",)),
}
FAMILY_NAMES = tuple(SPECIALS)


def family_tokenizer(family: str) -> Any:
    """A word-level fast tokenizer over WORDS and the words family prompts use, with `family`'s special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    bos, eos, pad, others = SPECIALS[family]
    specials = list(dict.fromkeys([pad, bos, eos, "<unk>", *others]))
    words = [*WORDS, "?", ".", ",", ":", "\n", "Question", "Answer", "User", "Assistant"]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate([*specials, *words])}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                     pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = T.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad,
                                          unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in (pad, "<unk>")]})
    return tokenizer


def family_model(family: str, tokenizer: Any, seed: int = 0) -> torch.nn.Module:
    """A tiny random `family` model whose special token ids are `tokenizer`'s."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    image = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(seed)
    if family == "blip":
        # label smoothing on, as BLIP was trained: the loss test computes its reference with it
        config = T.BlipConfig(vision_config=VISION, text_config={
            **TEXT, "intermediate_size": 64, "encoder_hidden_size": 32, "sep_token_id": tokenizer.eos_token_id,
            "label_smoothing": 0.1, **ids})
        return T.BlipForConditionalGeneration(config).eval()
    if family == "blip2":
        config = T.Blip2Config(vision_config=VISION, qformer_config={**TEXT, "intermediate_size": 64,
                                                                     "encoder_hidden_size": 32},
                               text_config={**TEXT, "model_type": "opt", "ffn_dim": 64, "word_embed_proj_dim": 32,
                                            **ids},
                               num_query_tokens=4, image_token_index=image)
        return T.Blip2ForConditionalGeneration(config).eval()
    if family == "idefics3":
        config = T.Idefics3Config(vision_config=VISION, text_config={**TEXT, "model_type": "llama",
                                                                     "intermediate_size": 64,
                                                                     "num_key_value_heads": 2, **ids},
                                  scale_factor=2, image_token_id=image, pad_token_id=tokenizer.pad_token_id)
        return T.Idefics3ForConditionalGeneration(config).eval()
    config = T.PaliGemmaConfig(vision_config={**VISION, "projection_dim": 32, "vision_use_head": False},
                               text_config={**TEXT, "model_type": "gemma", "head_dim": 8, "intermediate_size": 64,
                                            "num_key_value_heads": 2, **ids},
                               projection_dim=32, image_token_id=image)
    return T.PaliGemmaForConditionalGeneration(config).eval()


def tiny_family(family: str, seed: int = 0, max_length: int = 128) -> Vlm:
    """A tiny `family` VLM, its processor (the family's layout, as load_hf_vlm picks it) and input spec."""
    tokenizer = family_tokenizer(family)
    model = family_model(family, tokenizer, seed)
    found = family_of(model)
    vision = model.get_submodule(found.path("vision"))
    layout, image_tokens = prompt_layout(found, model, tokenizer, SIDE, None)
    token_id = getattr(model.config, "image_token_id", None)
    processor = VlmProcessor(tokenizer, layout, max_length, image_token_id=token_id)
    record = {"spec": f"tiny-{family}", "lm": None, "image_size": SIDE, "image_tokens": image_tokens,
              "lm_identity": lm_identity(model)}
    return Vlm(model, processor, model_input_spec(vision, SIDE), found, record)
