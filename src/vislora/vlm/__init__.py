"""Generative vision-language models: LLaVA-style composition, the families transformers ships, their parts and
prompts (see docs/vlm_generative.md)."""

from vislora.vlm.build import (
    IMAGE_TOKEN,
    Vlm,
    build_vlm,
    check_lm_identity,
    compose_llava,
    lm_identity,
    load_hf_vlm,
)
from vislora.vlm.layouts import Blip2Layout, BlipLayout, Idefics3Layout, PaliGemmaLayout
from vislora.vlm.parts import FAMILIES, PARTS, Family, family_of, is_vlm, part_of, parts_of, vlm_adapter_config
from vislora.vlm.processor import IGNORE, ChatLayout, LayoutBase, PromptLayout, VlmProcessor

__all__ = [
    "FAMILIES",
    "IGNORE",
    "IMAGE_TOKEN",
    "PARTS",
    "Blip2Layout",
    "BlipLayout",
    "ChatLayout",
    "Family",
    "Idefics3Layout",
    "LayoutBase",
    "PaliGemmaLayout",
    "PromptLayout",
    "Vlm",
    "VlmProcessor",
    "build_vlm",
    "check_lm_identity",
    "compose_llava",
    "family_of",
    "is_vlm",
    "lm_identity",
    "load_hf_vlm",
    "part_of",
    "parts_of",
    "vlm_adapter_config",
]
