"""How each transformers VLM family writes a prompt: where its image tokens go and how many, how an answer ends, and
the further inputs its model takes. Each follows that family's processor in transformers (`processing_<family>.py`,
Idefics3 with image splitting off); the number of image tokens is read from the model's config:

    family     prompt                                                                answer
    blip       [bos] question                                                        answer [SEP]
    blip2      <image>*num_query_tokens [bos] Question: question Answer:             ' answer' [eos]
    idefics3   [bos] User:<fake_token_around_image><global-img><image>*n
               <fake_token_around_image>question<end_of_utterance>\\nAssistant:       ' answer' <end_of_utterance>
    paligemma  <image>*n [bos] question\\n                                            answer [eos]

BLIP has no image tokens (its text decoder cross-attends to the image) and its `generate` cuts the last prompt token
(its processor's [SEP]) and sets the end and pad tokens itself. PaliGemma attends both ways inside the prefix and
causally on the answer: `token_type_ids` are 0 on the prompt and 1 on the answer. Idefics3 (and SmolVLM) takes
pixel_values as (B, images, C, H, W).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vislora.errors import ConfigError
from vislora.vlm.processor import LayoutBase, PromptLayout


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _token_id(tokenizer: Any, token: str, family: str) -> int:
    """The id of special `token`; ConfigError when the tokenizer lacks it."""
    if token not in tokenizer.get_vocab():
        raise ConfigError(f"the tokenizer has no {token!r} token, which {family} prompts need; use the tokenizer saved "
                          "with the model")
    return int(tokenizer.convert_tokens_to_ids(token))


def _bos(tokenizer: Any, family: str) -> int:
    if tokenizer.bos_token_id is None:
        raise ConfigError(f"the tokenizer has no beginning-of-sequence token, which {family} prompts start with; use "
                          "the tokenizer saved with the model")
    return int(tokenizer.bos_token_id)


@dataclass(frozen=True)
class BlipLayout(LayoutBase):
    """BLIP: the text decoder starts from its bos token; the question is the text it continues, an answer ends with
    [SEP] (what BLIP's generate stops on)."""

    bos_id: int
    sep_id: int

    def prompt(self, tokenizer: Any, question: str) -> list[int]:
        return [self.bos_id, *_ids(tokenizer, question)]

    def answer(self, tokenizer: Any, answer: str) -> list[int]:
        return [*_ids(tokenizer, answer), self.sep_id]

    def end_id(self, tokenizer: Any) -> int:
        return self.sep_id

    def tail(self, tokenizer: Any) -> list[int]:
        return [self.sep_id]  # BLIP's generate drops the prompt's last token, the [SEP] its processor writes

    def end_kwargs(self, pad_id: int, end_id: int) -> dict[str, Any]:
        return {}  # BLIP's generate passes its own sep (end) and pad tokens


@dataclass(frozen=True)
class Blip2Layout(LayoutBase):
    """BLIP-2 with a decoder-only LM (OPT): the Q-Former's query outputs fill `image_tokens` image tokens before the
    bos token; the question is written into `template`."""

    image_token_id: int
    image_tokens: int
    template: str = "Question: {question} Answer:"

    def prompt(self, tokenizer: Any, question: str) -> list[int]:
        text = _ids(tokenizer, self.template.format(question=question))
        return [*[self.image_token_id] * self.image_tokens, _bos(tokenizer, "BLIP-2"), *text]

    def answer(self, tokenizer: Any, answer: str) -> list[int]:
        return [*_ids(tokenizer, " " + answer), self.end_id(tokenizer)]


@dataclass(frozen=True)
class Idefics3Layout(LayoutBase):
    """Idefics3 and SmolVLM: one user turn holding the global image (image splitting off) and the question; the
    answer ends with <end_of_utterance>."""

    image_token_id: int
    image_tokens: int

    def prompt(self, tokenizer: Any, question: str) -> list[int]:
        around = _token_id(tokenizer, "<fake_token_around_image>", "Idefics3")
        image = [around, _token_id(tokenizer, "<global-img>", "Idefics3"), *[self.image_token_id] * self.image_tokens,
                 around]
        return [_bos(tokenizer, "Idefics3"), *_ids(tokenizer, "User:"), *image, *_ids(tokenizer, question),
                self.end_id(tokenizer), *_ids(tokenizer, "\nAssistant:")]

    def answer(self, tokenizer: Any, answer: str) -> list[int]:
        return [*_ids(tokenizer, " " + answer), self.end_id(tokenizer)]

    def end_id(self, tokenizer: Any) -> int:
        return _token_id(tokenizer, "<end_of_utterance>", "Idefics3")

    def images(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixel_values": pixel_values[:, None]}  # (B, C, H, W) -> (B, 1 image, C, H, W)


@dataclass(frozen=True)
class PaliGemmaLayout(LayoutBase):
    """PaliGemma: image tokens, bos, the question and a newline form the prefix (attended both ways); the answer
    (token type 1, attended causally) ends with eos."""

    image_token_id: int
    image_tokens: int

    def prompt(self, tokenizer: Any, question: str) -> list[int]:
        return [*[self.image_token_id] * self.image_tokens, _bos(tokenizer, "PaliGemma"),
                *_ids(tokenizer, question + "\n")]

    def answer(self, tokenizer: Any, answer: str) -> list[int]:
        return [*_ids(tokenizer, answer), self.end_id(tokenizer)]

    def extra(self, answer: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"token_type_ids": answer.long()}  # 0: prefix (and padding), 1: answer


def family_layout(family: str, model: nn.Module) -> tuple[PromptLayout, int]:
    """(the prompt layout of a `family` model other than LLaVA, image tokens per image), counts read from its config."""
    config = model.config
    if family == "blip":
        text = config.text_config
        return BlipLayout(int(text.bos_token_id), int(text.sep_token_id)), 0
    if family == "blip2":
        if not config.use_decoder_only_language_model:
            raise ConfigError(f"this BLIP-2 model's language model is an encoder-decoder "
                              f"({config.text_config.model_type}); vislora writes prompts for BLIP-2 with a "
                              "decoder-only LM (OPT), e.g. Salesforce/blip2-opt-2.7b")
        tokens = int(config.num_query_tokens)
        return Blip2Layout(int(config.image_token_id), tokens), tokens
    if family == "idefics3":
        vision = config.vision_config
        tokens = int((vision.image_size // vision.patch_size) ** 2 / config.scale_factor ** 2)
        return Idefics3Layout(int(config.image_token_id), tokens), tokens
    if family == "paligemma":
        vision = config.vision_config
        tokens = int(getattr(config.text_config, "num_image_tokens", (vision.image_size // vision.patch_size) ** 2))
        return PaliGemmaLayout(int(config.image_token_id), tokens), tokens
    raise ConfigError(f"prompts for {family} models are not written; supported: llava, blip, blip2, idefics3, "
                      "paligemma")
