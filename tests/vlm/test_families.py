"""The transformers VLM families (BLIP, BLIP-2, Idefics3/SmolVLM, PaliGemma) on tiny random models: part targets,
each family's prompt with answer-only labels (the model's own loss against one computed by hand), routed generation
equal to generating each prompt alone with its adapter, and loading a saved model through load_hf_vlm."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
import transformers as T
from tests.vlm.family_fixtures import FAMILY_NAMES, SIDE, TEXT, VISION, family_tokenizer, tiny_family
from tests.vlm.generative_fixtures import randomize_adapter

from vislora import inject
from vislora.errors import ConfigError
from vislora.vlm import IGNORE, PARTS, Idefics3Layout, VlmProcessor, family_of, load_hf_vlm, part_of, vlm_adapter_config
from vislora.vlm.build import prompt_layout
from vislora.vlm.layouts import family_layout

FAMILY_PARTS = {"blip": {"vision", "lm"}, "blip2": {"vision", "qformer", "connector", "lm"},
                "idefics3": {"vision", "connector", "lm"}, "paligemma": {"vision", "connector", "lm"}}
QUESTIONS = ["what is this item ?", "is it worn on the feet ?", "describe the image briefly"]


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def vlm(request):
    return tiny_family(request.param)


def adapted(vlm):
    """Adapters a and b (different ranks, random B) on the LM and vision tower, and the Q-Former where there is one."""
    targets = ["lm", "vision", *(["qformer"] if "qformer" in vlm.family.parts else [])]
    model = inject(vlm.model, vlm_adapter_config(vlm.model, targets, rank=4, alpha=8), "a")
    model.add_adapter("b", vlm_adapter_config(vlm.model, targets, rank=2, alpha=4))
    for seed, name in enumerate(("a", "b")):
        randomize_adapter(model, name, seed)
    return model


def test_part_targets_resolve_inside_their_parts(vlm):
    parts = FAMILY_PARTS[vlm.family.name]
    assert set(vlm.family.parts) == parts
    model = inject(vlm.model, vlm_adapter_config(vlm.model, sorted(parts), rank=4, part_ranks={"vision": 2}))
    try:
        by_part: dict[str | None, list[str]] = {}
        for path in model.layers():
            by_part.setdefault(part_of(vlm.model, path), []).append(path)
        assert set(by_part) == parts  # every part adapted, nothing outside them
        ranks = {t.module_path: t.rank for t in model.plans["default"].targets}  # per q/v slice of a fused qkv
        assert {ranks[p] for p in by_part["vision"]} == {2}
        assert {ranks[p] for p in by_part["lm"]} == {4}
    finally:
        model.unload(merge=False)
    model = inject(vlm.model, vlm_adapter_config(vlm.model, ["lm:q"], rank=2))
    try:
        paths = list(model.layers())
        assert paths and all(part_of(vlm.model, p) == "lm" and p.endswith(("q_proj", "query")) for p in paths)
    finally:
        model.unload(merge=False)


def test_a_part_the_family_lacks_is_named_with_its_parts(vlm):
    missing = [part for part in PARTS if part not in vlm.family.parts]
    listed = re.escape(", ".join(vlm.family.parts))
    for part in missing:
        with pytest.raises(ConfigError, match=f"{vlm.family.name} model has no '{part}' part; its parts are {listed}"):
            vlm_adapter_config(vlm.model, [f"{part}:q"])
    with pytest.raises(ConfigError, match=f"part_ranks/part_alphas name .*its parts are {listed}"):
        vlm_adapter_config(vlm.model, ["lm"], part_ranks={"decoder": 2})


def test_loss_is_taken_over_the_answer_tokens_only(vlm):
    """The model's loss equals a cross-entropy computed by hand over the answer positions alone (BLIP with its label
    smoothing 0.1), so a prompt or image token in the labels would show."""
    processor = vlm.processor
    answers = ["a black sneaker", "yes"]
    batch = processor.train_batch(QUESTIONS[:2], answers)
    for i, answer in enumerate(answers):
        expected = processor.layout.answer(processor.tokenizer, answer)
        assert expected[-1] == processor.eos_token_id
        kept = batch["labels"][i][batch["labels"][i] != IGNORE]
        assert kept.tolist() == expected
        n = int(batch["attention_mask"][i].sum())
        assert batch["input_ids"][i, n - len(expected):n].tolist() == expected
    if processor.image_token_id is not None:
        images = batch["input_ids"] == processor.image_token_id
        assert images.sum(1).tolist() == [vlm.record["image_tokens"]] * 2
        assert (batch["labels"][images] == IGNORE).all()
    if vlm.family.name == "paligemma":  # prefix attended both ways, answer causally
        assert batch["token_type_ids"].tolist() == (batch["labels"] != IGNORE).long().tolist()
    torch.manual_seed(1)
    with torch.no_grad():
        out = vlm.model(**batch, **processor.image_inputs(torch.randn(2, 3, SIDE, SIDE)))
    logits, targets = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = targets != IGNORE
    smoothing = getattr(vlm.model.config.text_config, "label_smoothing", 0.0)
    assert smoothing == (0.1 if vlm.family.name == "blip" else 0.0)
    by_hand = torch.nn.functional.cross_entropy(logits[keep], targets[keep], label_smoothing=smoothing)
    assert torch.allclose(out.loss, by_hand, atol=1e-5)
    assert keep.sum() == 4 + 2  # "a black sneaker" and "yes", each with its end token


def test_routed_generate_equals_each_prompt_alone(vlm):
    check_routed_generate(vlm, {})


def test_routed_beam_search_equals_each_prompt_alone():
    """Beam search on BLIP-2 (kept to one family for time): its vision tower and Q-Former see each prompt once, its
    LM every beam, and OPT's MLP the beams' tokens folded into one dimension."""
    check_routed_generate(tiny_family("blip2"), {"num_beams": 2})


def check_routed_generate(vlm, search):
    """Prompts routed to adapters a, b and None in one generate give the tokens each prompt gives alone."""
    model = adapted(vlm)
    try:
        processor = vlm.processor
        names = ["a", "b", None]
        torch.manual_seed(3)
        pixels = torch.randn(3, 3, SIDE, SIDE)
        batch = processor.prompt_batch(QUESTIONS)
        width = batch["input_ids"].shape[1]
        kwargs = {**processor.generation_kwargs(), "max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False,
                  **search}
        with torch.no_grad():
            routed = processor.new_tokens(model.generate(**batch, **processor.image_inputs(pixels), adapters=names,
                                                         **kwargs), width)
            for i, name in enumerate(names):
                one = processor.prompt_batch([QUESTIONS[i]])
                inputs = {**one, **processor.image_inputs(pixels[i:i + 1]), **kwargs}
                if name is None:
                    with model.disabled():
                        alone = model.generate(**inputs)
                else:
                    model.set_active(name)
                    alone = model.generate(**inputs)
                assert processor.new_tokens(alone, one["input_ids"].shape[1]).tolist() == [routed[i].tolist()]
            model.set_active("a")
            same = processor.new_tokens(model.generate(**processor.prompt_batch(QUESTIONS),
                                                       **processor.image_inputs(pixels), **kwargs), width)
        assert same[0].tolist() == routed[0].tolist()
        assert same.tolist() != routed.tolist()  # the adapters differ, so routing mistakes would show
    finally:
        model.unload(merge=False)


def test_load_hf_vlm_reads_a_saved_model(vlm, tmp_path):
    """save_pretrained + the tokenizer, loaded offline through load_hf_vlm (AutoModelForImageTextToText), writes the
    same prompts and generates the same tokens."""
    vlm.model.save_pretrained(tmp_path)
    vlm.processor.tokenizer.save_pretrained(tmp_path)
    loaded = load_hf_vlm(f"hf:{tmp_path}", max_length=128)
    assert type(loaded.model) is type(vlm.model)
    assert loaded.family.name == vlm.family.name
    assert loaded.record["image_tokens"] == vlm.record["image_tokens"]
    assert loaded.image_spec.size == SIDE
    assert loaded.processor.layout == vlm.processor.layout
    batch = loaded.processor.prompt_batch(QUESTIONS[:2])
    assert batch["input_ids"].tolist() == vlm.processor.prompt_batch(QUESTIONS[:2])["input_ids"].tolist()
    torch.manual_seed(4)
    pixels = torch.randn(2, 3, SIDE, SIDE)
    kwargs = {**loaded.processor.generation_kwargs(), "max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    with torch.no_grad():
        again = loaded.model.generate(**batch, **loaded.processor.image_inputs(pixels), **kwargs)
        first = vlm.model.generate(**vlm.processor.prompt_batch(QUESTIONS[:2]), **vlm.processor.image_inputs(pixels),
                                   **kwargs)
    assert again.tolist() == first.tolist()


def test_families_take_their_native_image_side(vlm):
    with pytest.raises(ConfigError, match=f"takes images of side {SIDE}.*got image_size 64"):
        prompt_layout(vlm.family, vlm.model, vlm.processor.tokenizer, 64, None)


def test_blip2_with_an_encoder_decoder_lm_is_refused():
    config = T.Blip2Config(text_config={"model_type": "t5", "vocab_size": 100, "d_model": 32, "num_layers": 1})
    with pytest.raises(ConfigError, match=r"encoder-decoder \(t5\).*blip2-opt"):
        family_layout("blip2", SimpleNamespace(config=config))


def test_smolvlm_shares_the_idefics3_layout():
    tokenizer = family_tokenizer("idefics3")
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(0)
    config = T.SmolVLMConfig(vision_config=VISION, text_config={**TEXT, "model_type": "llama", "intermediate_size": 64,
                                                                "num_key_value_heads": 2, **ids},
                             scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    model = T.SmolVLMForConditionalGeneration(config).eval()
    family = family_of(model)
    layout, image_tokens = prompt_layout(family, model, tokenizer, SIDE, None)
    assert (family.name, type(layout), image_tokens) == ("idefics3", Idefics3Layout, (SIDE // 8) ** 2 // 2 ** 2)
    processor = VlmProcessor(tokenizer, layout, 128, image_token_id=config.image_token_id)
    batch = processor.train_batch(["what is it ?"], ["a bag"])
    with torch.no_grad():
        out = model(**batch, **processor.image_inputs(torch.randn(1, 3, SIDE, SIDE)))
    targets = batch["labels"][0, 1:]
    keep = targets != IGNORE
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(out.logits[0, :-1][keep], targets[keep]),
                          atol=1e-5)
