"""Base vs adapted generation on the same images: every row equals generating that example alone with and without
the adapter, and the metrics are those of the rows."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tests.vlm.generative_fixtures import randomize_adapter, tiny_causal_lm, tiny_llava, tiny_tokenizer, tiny_vision
from typer.testing import CliRunner

from vislora import inject
from vislora.cli import app
from vislora.data.generative import GenerativeExample, read_generative
from vislora.data.images import load_image
from vislora.data.transforms import build_transform
from vislora.errors import ConfigError, DataError
from vislora.evaluate.generative import compare_generative, generate_texts
from vislora.evaluate.generative_metrics import caption_scores, vqa_scores
from vislora.formats import save_adapter
from vislora.report import write_report
from vislora.vlm import build_vlm, vlm_adapter_config

QUESTIONS = ["what is this item ?", "is it worn on the feet ?", "what color is it ?"]
ANSWERS = [("a sneaker", "sneaker", "shoe"), ("yes",), ("black", "black", "white")]


def example(image, question, answers):
    return GenerativeExample(image, question, answers, f"{image.name}")


def write_images(folder: Path, n: int = 3, side: int = 28) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"item{i}.png"
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def adapted():
    vlm = tiny_llava()
    model = inject(vlm.model, vlm_adapter_config(vlm.model, ["lm", "vision"], rank=4, alpha=8), "default")
    randomize_adapter(model, "default", seed=0)
    yield model, vlm
    model.unload(merge=False)


def alone(model, vlm, example, prompt=None, base=False):
    pixels = build_transform(vlm.image_spec, train=False)(load_image(example.image))[None]
    batch = vlm.processor.prompt_batch([example.question or prompt])
    kwargs = {**vlm.processor.generation_kwargs(), "max_new_tokens": 5, "do_sample": False}
    with torch.no_grad():
        if base:
            with model.disabled():
                out = model.generate(**batch, pixel_values=pixels, **kwargs)
        else:
            out = model.generate(**batch, pixel_values=pixels, **kwargs)
    return vlm.processor.decode(out, batch["input_ids"].shape[1])[0]


def test_vqa_rows_equal_each_example_generated_alone(adapted, tmp_path):
    model, vlm = adapted
    examples = [example(p, q, a) for p, q, a in zip(write_images(tmp_path), QUESTIONS, ANSWERS, strict=True)]
    result = compare_generative(model, vlm, examples, "vqa", batch_size=2, max_new_tokens=5, shown=2, data="toy")
    assert [r.base for r in result.rows] == [alone(model, vlm, e, base=True) for e in examples]
    assert [r.adapted for r in result.rows] == [alone(model, vlm, e) for e in examples]
    assert any(r.base != r.adapted for r in result.rows)  # the adapter changes what is generated
    references = [list(a) for a in ANSWERS]
    assert result.base == vqa_scores([r.base for r in result.rows], references)
    assert result.adapted == vqa_scores([r.adapted for r in result.rows], references)
    assert len(result.examples) == 2 and result.rows[0].image == str(examples[0].image)
    data = result.to_dict()
    assert data["task"] == "vqa" and len(data["rows"]) == 3 and set(data["change"]) == {"exact", "soft"}


def test_captioning_uses_the_prompt_and_scores_bleu_and_cider(adapted, tmp_path):
    model, vlm = adapted
    examples = [example(p, None, ("a black sneaker", "a shoe")) for p in write_images(tmp_path, 2)]
    prompt = "describe the image briefly ."
    result = compare_generative(model, vlm, examples, "captioning", prompt=prompt, max_new_tokens=5)
    assert result.base == caption_scores([r.base for r in result.rows], [list(e.answers) for e in examples])
    assert [label for label, *_ in result.metric_rows()] == ["CIDEr", "BLEU-4"]
    texts = generate_texts(model, vlm, examples, "default", prompt=prompt, max_new_tokens=5)
    assert texts == [r.adapted for r in result.rows]


def test_bad_calls_are_named(adapted, tmp_path):
    model, vlm = adapted
    examples = [example(p, None, ("a shoe",)) for p in write_images(tmp_path, 1)]
    with pytest.raises(DataError, match="no question, and no prompt"):
        generate_texts(model, vlm, examples, max_new_tokens=2)
    with pytest.raises(DataError, match="no examples"):
        generate_texts(model, vlm, [], prompt="what ?")
    with pytest.raises(ConfigError, match="not generative"):
        compare_generative(model, vlm, examples, "classification", prompt="what ?")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A VQA run directory whose task.json rebuilds its VLM offline (tiny towers saved with save_pretrained,
    task.json `vlm` naming hf:<dir>): RUN/config.yaml, RUN/adapter/, RUN/val.jsonl and its images."""
    root = tmp_path_factory.mktemp("vqa_run")
    tokenizer = tiny_tokenizer()
    tiny_vision(28, 0).save_pretrained(root / "vision")
    tiny_causal_lm(len(tokenizer), 1).save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    vlm = build_vlm(f"hf:{root / 'vision'}", lm=f"hf:{root / 'lm'}", image_size=28, max_length=128)
    reference = tiny_llava()
    state, expected = vlm.model.state_dict(), reference.model.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)  # rebuilt exactly
    model = inject(vlm.model, vlm_adapter_config(vlm.model, ["lm", "vision"], rank=4, alpha=8), "default")
    randomize_adapter(model, "default", seed=0)
    save_adapter(model, root / "adapter", "default")
    (root / "adapter" / "task.json").write_text(json.dumps({"task": "vqa", "vlm": vlm.record, "step": 3}))
    config = {"data": {"train": "train.jsonl", "val": str(root / "val.jsonl")}}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    images = write_images(root, 2)
    rows = [{"image": p.name, "question": q, "answers": list(a)}
            for p, q, a in zip(images, QUESTIONS, ANSWERS, strict=False)]
    (root / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = read_generative(root / "val.jsonl", "vqa")
    expected_texts = generate_texts(model, vlm, examples, "default", max_new_tokens=4)
    return root, expected_texts


def test_cli_eval_on_a_vqa_adapter_prints_and_writes_base_vs_adapted(trained_run):
    root, expected = trained_run
    out = root / "eval.json"
    result = CliRunner().invoke(app, ["eval", "--adapter", str(root / "adapter"), "--data", str(root / "val.jsonl"),
                                      "--max-new-tokens", "4", "--examples", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "VQA accuracy (soft, VQAv2)" in result.output and "exact match" in result.output
    written = json.loads(out.read_text())
    assert [r["adapted"] for r in written["rows"]] == expected  # the rebuilt VLM and adapter generate as the original
    assert written["task"] == "vqa" and written["n"] == 2 and set(written["base"]) == {"exact", "soft"}
    assert written["change"]["soft"] == pytest.approx(written["adapted"]["soft"] - written["base"]["soft"])


def test_report_of_a_vqa_run_shows_images_and_outputs_before_and_after(trained_run):
    root, expected = trained_run
    files = write_report(root, max_new_tokens=4)
    html = files.html.read_text()
    assert "Generated text: before / after" in html and "<img src='data:image/png;base64," in html
    evaluation = json.loads(files.evaluation.read_text())
    shown = [evaluation["rows"][i] for i in evaluation["examples"]]
    assert shown and all(escape(r["adapted"]) in html and escape(r["base"]) in html for r in shown)
    assert [r["adapted"] for r in evaluation["rows"]] == expected
    card = files.model_card.read_text()
    assert "pipeline_tag: visual-question-answering" in card and "### Example outputs" in card
    assert f"| {evaluation['base']['soft']:.4f} | {evaluation['adapted']['soft']:.4f} |" in card
