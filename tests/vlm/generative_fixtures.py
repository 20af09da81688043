"""Tiny generative VLMs for the tests: real transformers architectures with random weights and a word-level
tokenizer built here (no hub), seconds to build."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from vislora.data.transforms import model_input_spec
from vislora.vlm import IMAGE_TOKEN, ChatLayout, Vlm, VlmProcessor, compose_llava, family_of, lm_identity

_WORDS = """a an the is it this what which item photo of shoe sneaker bag shirt dress coat sandal boot trouser pullover
yes no worn on feet top category footwear clothing accessory used for walking carrying wearing describe image briefly
answer question color black white red blue small large"""
WORDS = tuple(_WORDS.split())
# a ChatML template like SmolLM2's, shorter
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer(chat: bool = True) -> Any:
    """A word-level fast tokenizer: specials, `<image>`-free vocabulary of WORDS, punctuation split off."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    vocab = {token: i for i, token in enumerate([*specials, *WORDS, "?", ".", ",", "\n", "user", "assistant",
                                                 "system"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                     pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        unk_token="<unk>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_vision(image_size: int = 28, seed: int = 0) -> Dinov2Model:
    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, patch_size=7,
                          image_size=image_size)
    return Dinov2Model(config).eval()


def tiny_causal_lm(vocab_size: int, seed: int = 1, **overrides: Any) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         **overrides)
    return LlamaForCausalLM(config).eval()


def tiny_llava(image_size: int = 28, seed: int = 0, max_length: int = 128) -> Vlm:
    """A LLaVA model of a tiny DINOv2 and a tiny Llama (random weights), its processor and input spec."""
    tokenizer = tiny_tokenizer()
    vision = tiny_vision(image_size, seed)
    causal = tiny_causal_lm(len(tokenizer), seed + 1)
    model, image_tokens = compose_llava(vision, causal, tokenizer, image_size=image_size, seed=seed)
    processor = VlmProcessor(tokenizer, ChatLayout(IMAGE_TOKEN, image_tokens), max_length,
                             image_token_id=model.config.image_token_id)
    record = {"spec": "tiny", "lm": "tiny", "image_size": image_size, "image_tokens": image_tokens,
              "lm_identity": lm_identity(model)}
    return Vlm(model.eval(), processor, model_input_spec(vision, image_size), family_of(model), record)


def randomize_adapter(model: Any, name: str, seed: int, std: float = 0.3) -> None:
    """Give adapter `name` nonzero B matrices (a fresh LoRA adds nothing), so routing mistakes show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.adapter_parameters(name):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
