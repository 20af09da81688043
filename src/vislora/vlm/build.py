"""Build a generative VLM: a LLaVA-style model composed from a vision encoder and a causal LM, or a Hugging Face VLM.

`build_vlm("asset:dinov2-small", lm="asset:smollm2-135m-instruct", image_size=56)` composes a transformers
`LlavaForConditionalGeneration` from the two pretrained parts and a new 2-layer MLP connector
(vision width -> LM width -> LM width, GELU), so everything transformers does for LLaVA (generate with a KV cache,
beam search, save_pretrained) works on it and a merged model loads without vislora. Any Hugging Face vision encoder
(`hf:` or `asset:`) pairs with any Hugging Face causal LM the same way. The tokenizer gains an `<image>` token whose
embedding row is the mean of the others (deterministic, so a run's base model rebuilds exactly).

`build_vlm("hf:<id or dir>")` loads a whole VLM of a family `vislora.vlm.parts` knows.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vislora.assets import resolve_model_spec
from vislora.data.transforms import InputSpec, model_input_spec
from vislora.errors import AdapterFileError, ConfigError
from vislora.vlm.layouts import family_layout
from vislora.vlm.parts import Family, family_of, unwrap
from vislora.vlm.processor import ChatLayout, PromptLayout, VlmProcessor

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"


@dataclass
class Vlm:
    """A generative VLM ready for adapters: the transformers model, its processor, the input spec its images follow,
    and `record`, what rebuilds it (written into an adapter's task.json)."""

    model: nn.Module
    processor: VlmProcessor
    image_spec: InputSpec
    family: Family
    record: dict[str, Any] = field(default_factory=dict)


def build_vlm(spec: str, lm: str | None = None, *, image_size: int | None = None, connector_hidden: int | None = None,
              max_length: int = 512, system: str | None = None, seed: int = 0) -> Vlm:
    """A VLM from a vision encoder `spec` and a causal LM `lm` (LLaVA-style, see the module docstring), or from one
    Hugging Face VLM `spec` when `lm` is None. `image_size` is the side images are resized to (default: the vision
    tower's own); `connector_hidden` the connector's hidden width (default: the LM's width); `seed` fixes the new
    connector's initial weights; `max_length` bounds prompt + answer; `system` is the chat template's system turn."""
    if lm is None:
        return load_hf_vlm(spec, image_size=image_size, max_length=max_length, system=system)
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    vision_spec, lm_spec = resolve_model_spec(spec, "image"), resolve_model_spec(lm, "lm")
    for what, value in (("the vision encoder", vision_spec), ("the language model", lm_spec)):
        if not value.startswith("hf:"):
            raise ConfigError(f"{what} of a composed VLM must be a Hugging Face model (hf:<id or dir> or "
                              f"asset:<name>), got {value!r}: LLaVA builds its towers with transformers' AutoModel")
    vision = AutoModel.from_pretrained(vision_spec[3:])
    causal = AutoModelForCausalLM.from_pretrained(lm_spec[3:], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(lm_spec[3:])
    model, image_tokens = compose_llava(vision, causal, tokenizer, image_size=image_size,
                                        connector_hidden=connector_hidden, seed=seed)
    image_spec = model_input_spec(vision, image_size)
    layout = ChatLayout(IMAGE_TOKEN, image_tokens, system)
    processor = VlmProcessor(tokenizer, layout, max_length, image_token_id=model.config.image_token_id)
    record = {"spec": spec, "lm": lm, "image_size": image_spec.size, "connector_hidden": connector_hidden,
              "image_tokens": image_tokens, "seed": seed, "max_length": max_length, "system": system,
              "lm_identity": lm_identity(model)}
    return Vlm(model.eval(), processor, image_spec, family_of(model), record)


def compose_llava(vision: nn.Module, causal: nn.Module, tokenizer: Any, *, image_size: int | None = None,
                  connector_hidden: int | None = None, seed: int = 0) -> tuple[nn.Module, int]:
    """(LlavaForConditionalGeneration around `vision` and `causal`, image tokens per image). The modules are used
    as they are (not copied); `tokenizer` gains the `<image>` token and `causal` a matching embedding row."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    side = image_size or _native_side(vision)
    image_tokens, strategy = _image_tokens(vision, side)
    image_token_id = _add_image_token(tokenizer, causal)
    text_config = causal.config.to_dict()
    config = LlavaConfig(vision_config=vision.config.to_dict(), text_config=text_config,
                         image_token_id=image_token_id, projector_hidden_act="gelu", vision_feature_layer=-1,
                         vision_feature_select_strategy=strategy, image_seq_length=image_tokens,
                         tie_word_embeddings=bool(getattr(causal.config, "tie_word_embeddings", False)))
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.language_model = causal.get_decoder()
    model.lm_head = causal.get_output_embeddings()
    generator = torch.Generator().manual_seed(seed)
    connector = LlavaMultiModalProjector(config)
    if connector_hidden is not None:
        connector.linear_1 = nn.Linear(vision.config.hidden_size, connector_hidden)
        connector.linear_2 = nn.Linear(connector_hidden, causal.config.hidden_size)
    for linear in (connector.linear_1, connector.linear_2):
        with torch.no_grad():
            linear.weight.normal_(0.0, linear.in_features ** -0.5, generator=generator)
            linear.bias.zero_()
    model.model.multi_modal_projector = connector
    model.generation_config = causal.generation_config
    left = [name for name, p in model.named_parameters() if p.is_meta]
    if left:
        raise ConfigError(f"composing LLaVA left parameters unset: {left[:5]}; the vision encoder or LM has a layout "
                          "transformers' LLaVA does not expect")
    return model, image_tokens


def lm_identity(model: nn.Module) -> dict[str, Any]:
    """What names the language model inside `model` (adapted or not): its type, sizes and a digest of its input
    embeddings, so an adapter made for another LM is refused even when the shapes agree."""
    base = unwrap(model)
    config = getattr(base.config, "text_config", base.config)
    embeddings = base.get_input_embeddings().weight.detach()
    digest = hashlib.sha256(embeddings[:64].float().cpu().numpy().tobytes()).hexdigest()[:16]
    return {"model_type": config.model_type, "vocab_size": int(embeddings.shape[0]),
            "hidden_size": int(embeddings.shape[1]), "layers": int(getattr(config, "num_hidden_layers", 0)),
            "embeddings_sha256": digest}


def check_lm_identity(expected: dict[str, Any] | None, found: dict[str, Any], what: str) -> None:
    """AdapterFileError naming every field in which the language model `what` was made for (`expected`, an
    `lm_identity`) differs from the one it is being loaded onto (`found`); nothing when `expected` is None."""
    if not expected:
        return
    differ = {key: (expected[key], found.get(key)) for key in expected if expected[key] != found.get(key)}
    if differ:
        listed = "; ".join(f"{key}: made for {want!r}, this model has {have!r}" for key, (want, have) in differ.items())
        raise AdapterFileError(f"{what} was made for another language model ({listed}); load it onto the VLM it was "
                               "trained on (task.json `vlm` names its vision encoder and LM)")


def load_hf_vlm(spec: str, *, image_size: int | None = None, max_length: int = 512,
                system: str | None = None) -> Vlm:
    """A whole Hugging Face VLM (`hf:<id or dir>`) of a known family, with its tokenizer."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    if not spec.startswith("hf:"):
        raise ConfigError(f"model spec {spec!r} is not a Hugging Face VLM; use hf:<id or dir> (e.g. "
                          "hf:llava-hf/llava-1.5-7b-hf), or give model.lm to compose one from a vision encoder")
    name = spec[3:]
    model = AutoModelForImageTextToText.from_pretrained(name, dtype=torch.float32)
    family = family_of(model)
    tokenizer = AutoTokenizer.from_pretrained(name)
    vision = model.get_submodule(family.path("vision"))
    side = image_size or _native_side(vision)
    layout, image_tokens = prompt_layout(family, model, tokenizer, side, system)
    token_id = getattr(model.config, "image_token_id", None) or getattr(model.config, "image_token_index", None)
    processor = VlmProcessor(tokenizer, layout, max_length, image_token_id=token_id)
    image_spec = model_input_spec(vision, side)
    record = {"spec": spec, "lm": None, "image_size": side, "image_tokens": image_tokens, "max_length": max_length,
              "system": system, "lm_identity": lm_identity(model)}
    return Vlm(model.eval(), processor, image_spec, family, record)


def prompt_layout(family: Family, model: nn.Module, tokenizer: Any, side: int,
                  system: str | None) -> tuple[PromptLayout, int]:
    """(how `family` writes prompts, image tokens per image) for `model` at image side `side`. LLaVA counts its
    image tokens at `side`; the other families' counts come from their configs, so they take their native side."""
    vision = model.get_submodule(family.path("vision"))
    if family.name == "llava":
        image_tokens, _ = _image_tokens(vision, side)
        return ChatLayout(IMAGE_TOKEN, image_tokens, system), image_tokens
    native = _native_side(vision)
    if side != native:
        raise ConfigError(f"a {family.name} model takes images of side {native} (its image token count is fixed by "
                          f"its config), got image_size {side}; leave image_size unset or give {native}")
    return family_layout(family.name, model)


def _native_side(vision: nn.Module) -> int:
    size = getattr(vision.config, "image_size", None)
    if size is None:
        raise ConfigError(f"cannot read the image side of a {type(vision).__name__}; give image_size")
    return int(size if isinstance(size, int) else size[0])


def _image_tokens(vision: nn.Module, side: int) -> tuple[int, str]:
    """(tokens per image LLaVA passes on, its feature-select strategy): the patch tokens, dropping a class token
    ("default") when the encoder has one, else every token ("full"). Counted by running the encoder once."""
    patch = getattr(vision.config, "patch_size", None)
    if patch and side % patch:
        raise ConfigError(f"image side {side} is not a multiple of the vision encoder's patch size {patch}; use "
                          f"{side // patch * patch} or {(side // patch + 1) * patch}")
    channels = getattr(vision.config, "num_channels", 3)
    with torch.no_grad():
        tokens = vision(torch.zeros(1, channels, side, side)).last_hidden_state.shape[1]
    patches = (side // patch) ** 2 if patch else tokens
    return (patches, "default") if tokens == patches + 1 else (tokens, "full")


def _add_image_token(tokenizer: Any, causal: nn.Module) -> int:
    """The id of `<image>`, added to `tokenizer` (and a row, the mean embedding, to `causal`) when missing."""
    if IMAGE_TOKEN in tokenizer.get_vocab():
        token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if token_id < causal.get_input_embeddings().weight.shape[0]:
            return token_id
    else:
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    old = causal.get_input_embeddings().weight.shape[0]
    causal.resize_token_embeddings(token_id + 1, mean_resizing=False)
    with torch.no_grad():
        for table in {id(t): t for t in (causal.get_input_embeddings(), causal.get_output_embeddings())}.values():
            if table is not None:
                table.weight[old:] = table.weight[:old].mean(0)
    return token_id
