"""The generative VLM core: LLaVA composition, part targets, answer-only labels, and routed generation equal to
generating each prompt alone with its adapter."""

from __future__ import annotations

import json

import pytest
import torch
from tests.vlm.generative_fixtures import randomize_adapter, tiny_llava

from vislora import inject
from vislora.errors import AdapterError, AdapterFileError, ConfigError, DataError, VisloraWarning
from vislora.formats import save_adapter
from vislora.runs import load_trained_vlm
from vislora.vlm import IGNORE, part_of, vlm_adapter_config


@pytest.fixture(scope="module")
def vlm():
    return tiny_llava()


def adapted(vlm, names=("a", "b"), targets=("lm", "vision"), train_connector=False):
    config = vlm_adapter_config(vlm.model, list(targets), rank=4, alpha=8, train_connector=train_connector)
    model = inject(vlm.model, config, names[0])
    for name in names[1:]:
        model.add_adapter(name, vlm_adapter_config(vlm.model, list(targets), rank=2 + len(name), alpha=4,
                                                   train_connector=train_connector))
    for seed, name in enumerate(names):
        randomize_adapter(model, name, seed)
    return model


def test_compose_llava_runs_the_parts_it_was_given(vlm):
    model = vlm.model
    assert model.config.vision_feature_select_strategy == "default"  # DINOv2 has a class token
    assert vlm.record["image_tokens"] == (28 // 7) ** 2
    image_id = vlm.processor.image_token_id
    embeddings = model.get_input_embeddings().weight
    assert torch.allclose(embeddings[image_id], embeddings[:image_id].mean(0))
    assert model.lm_head.weight is embeddings  # tied as the LM was


def test_part_targets_resolve_inside_their_part(vlm):
    config = vlm_adapter_config(vlm.model, ["lm:q", "lm:v", "vision", "connector"], rank=4, part_ranks={"vision": 2})
    model = inject(vlm.model, config)
    try:
        paths = list(model.layers())
        assert all(part_of(vlm.model, p) in {"lm", "vision", "connector"} for p in paths)
        lm = [p for p in paths if part_of(vlm.model, p) == "lm"]
        assert lm and all(p.endswith(("q_proj", "v_proj")) for p in lm)
        assert {p.rsplit(".", 1)[-1] for p in paths if part_of(vlm.model, p) == "connector"} == {"linear_1",
                                                                                                "linear_2"}
        ranks = model.adapter_ranks("default")
        assert {ranks[p] for p in paths if part_of(vlm.model, p) == "vision"} == {2}
        assert {ranks[p] for p in lm} == {4}
    finally:
        model.unload(merge=False)


def test_unknown_part_and_missing_part_are_named(vlm):
    with pytest.raises(ConfigError, match="names no VLM part"):
        vlm_adapter_config(vlm.model, ["language:q"])
    with pytest.raises(ConfigError, match="no 'qformer' part"):
        vlm_adapter_config(vlm.model, ["qformer"])


def test_labels_cover_the_answer_only(vlm):
    processor = vlm.processor
    batch = processor.train_batch(["what is this item ?", "is it worn on the feet ?"], ["a sneaker", "yes"])
    for i, answer in enumerate(["a sneaker", "yes"]):
        kept = batch["labels"][i][batch["labels"][i] != IGNORE]
        expected = [*processor.tokenizer(answer, add_special_tokens=False)["input_ids"], processor.eos_token_id]
        assert kept.tolist() == expected
        n = int(batch["attention_mask"][i].sum())
        assert batch["input_ids"][i, n - len(expected):n].tolist() == expected  # the labels sit on the answer
        assert (batch["labels"][i, n:] == IGNORE).all()  # padding
    image_positions = batch["input_ids"] == processor.image_token_id
    assert image_positions.sum() == 2 * vlm.record["image_tokens"]
    assert (batch["labels"][image_positions] == IGNORE).all()


def test_loss_ignores_prompt_tokens(vlm):
    """Changing a prompt word changes the logits, but not which tokens the loss is taken over: a loss computed by
    hand over the answer positions alone equals the model's."""
    processor = vlm.processor
    batch = processor.train_batch(["what is this item ?"], ["a sneaker"])
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        out = vlm.model(**batch, pixel_values=pixels)
    logits = out.logits[0, :-1]
    targets = batch["labels"][0, 1:]
    keep = targets != IGNORE
    by_hand = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(out.loss, by_hand, atol=1e-5)
    assert keep.sum() == 3  # "a", "sneaker", end of turn


def test_answers_cut_at_max_length_warn_and_prompts_over_it_fail(vlm):
    processor = vlm.processor
    prompt = len(processor.prompt_ids("what is this item ?"))
    processor.max_length = prompt + 2
    try:
        with pytest.warns(VisloraWarning, match="1 of 1 answers were cut"):
            batch = processor.train_batch(["what is this item ?"], ["a black sneaker"])
        assert batch["input_ids"].shape[1] == prompt + 2
        processor.max_length = prompt - 1
        with pytest.raises(DataError, match=f"prompt is {prompt} tokens.*limit of {prompt - 1}"):
            processor.prompt_batch(["what is this item ?"])
    finally:
        processor.max_length = 128
    with pytest.raises(DataError, match=r"question .* is empty"):
        processor.prompt_batch(["  "])
    with pytest.raises(DataError, match="empty answer"):
        processor.train_batch(["what is it ?"], [""])


@pytest.mark.parametrize(("search", "train_connector"), [({"do_sample": False}, False),
                                                        ({"do_sample": False, "num_beams": 2}, False),
                                                        ({"do_sample": False}, True)])
def test_routed_generate_equals_each_prompt_alone(vlm, search, train_connector):
    """Greedy and beam search; LoRA on the LM and vision tower, and each adapter's own copy of the connector."""
    model = adapted(vlm, train_connector=train_connector)
    try:
        processor = vlm.processor
        questions = ["what is this item ?", "is it worn on the feet ?", "what is it used for ?", "what color is it ?"]
        names = ["a", "b", None, "a"]
        torch.manual_seed(3)
        pixels = torch.randn(4, 3, 28, 28)
        batch = processor.prompt_batch(questions)
        kwargs = {**processor.generation_kwargs(), "max_new_tokens": 6, "min_new_tokens": 6, **search}
        with torch.no_grad():
            routed = model.generate(**batch, pixel_values=pixels, adapters=names, **kwargs)
            texts = processor.decode(routed, batch["input_ids"].shape[1])
            for i, name in enumerate(names):
                one = processor.prompt_batch([questions[i]])
                if name is None:
                    with model.disabled():
                        alone = model.generate(**one, pixel_values=pixels[i:i + 1], **kwargs)
                else:
                    model.set_active(name)
                    alone = model.generate(**one, pixel_values=pixels[i:i + 1], **kwargs)
                assert processor.decode(alone, one["input_ids"].shape[1]) == [texts[i]]
                assert alone[0, one["input_ids"].shape[1]:].tolist() == routed[i, batch["input_ids"].shape[1]:].tolist()
        assert len(set(texts)) > 1  # the adapters differ, so routing mistakes would show
    finally:
        model.unload(merge=False)


def test_generate_checks_the_adapter_list(vlm):
    model = adapted(vlm, names=("a",))
    try:
        batch = vlm.processor.prompt_batch(["what is it ?", "what is it ?"])
        with pytest.raises(AdapterError, match="2 samples"):
            model.generate(**batch, pixel_values=torch.zeros(2, 3, 28, 28), adapters=["a"], max_new_tokens=2)
        with pytest.raises(AdapterError, match="unknown adapter"):
            model.generate(**batch, pixel_values=torch.zeros(2, 3, 28, 28), adapters=["a", "zzz"], max_new_tokens=2)
    finally:
        model.unload(merge=False)


def test_load_trained_vlm_refuses_an_adapter_for_another_lm(vlm, tmp_path):
    model = adapted(vlm, names=("default",))
    try:
        save_adapter(model, tmp_path, "default")
        expected = model.generate(**vlm.processor.prompt_batch(["what is it ?"]), pixel_values=torch.ones(1, 3, 28, 28),
                                  max_new_tokens=4, do_sample=False)
    finally:
        model.unload(merge=False)
    (tmp_path / "task.json").write_text(json.dumps({"task": "vqa", "vlm": vlm.record}))
    loaded, same, task = load_trained_vlm(tmp_path, vlm=vlm)
    try:
        assert task["task"] == "vqa" and same is vlm
        again = loaded.generate(**vlm.processor.prompt_batch(["what is it ?"]), pixel_values=torch.ones(1, 3, 28, 28),
                                max_new_tokens=4, do_sample=False)
        assert again.tolist() == expected.tolist()
    finally:
        loaded.unload(merge=False)
    other = tiny_llava(seed=5)  # same shapes, other weights
    with pytest.raises(AdapterFileError, match=r"another language model .*embeddings_sha256"):
        load_trained_vlm(tmp_path, vlm=other)
