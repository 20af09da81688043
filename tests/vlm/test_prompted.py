"""Prompted attributes on dual encoders (vislora.tasks.prompted, vislora.evaluate.prompted, the prompted_multilabel
task): logits equal a hand computation from the towers, zero-shot thresholds are tuned on validation data and used
at predict, a tiny run learns, saves its thresholds and reloads; bad input is refused with the fix."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from dual_fixtures import save_towers, tiny_dual
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from synthetic_images import csv_manifest, tag_image
from vislora.cli import app
from vislora.data import AttributeSet, MultiLabelFormat, manifest
from vislora.data.transforms import SampleTransform, build_transform, model_input_spec
from vislora.errors import ConfigError, DataError
from vislora.evaluate.multilabel import tune_thresholds
from vislora.evaluate.multilabel_comparison import nan_text
from vislora.evaluate.prompted import compare_prompted, score_dataset, zero_shot_attributes
from vislora.model import inject
from vislora.report import write_report
from vislora.run_config import TrainConfig
from vislora.runs import load_trained_dual
from vislora.serve import ServeConfig, build_engine, create_app
from vislora.tasks.prompted import PromptedHead, add_logit_bias, prompt_names, prompted_head
from vislora.towers import tower_adapter_config
from vislora.train.trainer import Trainer
from vislora.train.vlm import tower_variants

COLOURS = ("red", "green", "blue")
TEMPLATES = ["a photo of a {}", "a {} picture"]


def colour_tags(root, n, seed, name):
    """A multi-label CSV of `n` images, each with 1-2 of the colour tags painted in its quadrants."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        tags = sorted(rng.choice(COLOURS, size=int(rng.integers(1, 3)), replace=False).tolist(), key=COLOURS.index)
        file = f"{name.split('.')[0]}_{i:03d}.png"
        tag_image(tuple(tags), rng).save(root / file)
        rows.append({"path": file, "label": "|".join(tags)})
    return csv_manifest(root, rows, name=name)


def dataset(path, model, attributes):
    data = manifest(path, multilabel=MultiLabelFormat(), attributes=attributes)
    data.transform = SampleTransform(build_transform(model_input_spec(model.vision_tower, 32), train=False))
    return data


def hand_prompts(model, names, templates):
    """Per attribute: the mean of its prompts' text embeddings, renormalised, each prompt encoded on its own."""
    rows = []
    for name in names:
        embeddings = []
        for template in templates:
            tokens = model.tokenizer([template.format(name)])
            embeddings.append(model.encode_text(tokens["input_ids"], tokens["attention_mask"])[0])
        mean = torch.stack(embeddings).mean(0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


def test_prompted_logits_equal_a_hand_computation():
    model = tiny_dual()
    add_logit_bias(model)
    with torch.no_grad():
        model.logit_scale.bias.fill_(-0.75)
        images = torch.randn(3, 3, 32, 32)
        task = {"task": "prompted_multilabel", "attributes": AttributeSet(COLOURS).to_dict(),
                "class_names": list(COLOURS), "templates": TEMPLATES, "thresholds": None}
        head = prompted_head(model, task)
        prompts = hand_prompts(model, COLOURS, TEMPLATES)
        embedded = model.encode_image(images)
        expected = model.logit_scale() * (embedded @ prompts.T) - 0.75  # [3 images, 3 attributes]
        torch.testing.assert_close(head.logits(embedded), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(head.scores(embedded), torch.sigmoid(expected), rtol=1e-5, atol=1e-6)
    assert head.bias == pytest.approx(-0.75) and head.thresholds.tolist() == [0.5, 0.5, 0.5]


def test_a_model_without_a_bias_gets_a_zero_one_and_a_siglip_style_bias_is_kept():
    model = tiny_dual()
    assert model.logit_scale.bias is None
    add_logit_bias(model)
    assert model.logit_scale.bias.item() == 0.0 and "logit_scale.bias" in dict(model.named_parameters())
    with torch.no_grad():
        model.logit_scale.bias.fill_(-10.0)
    add_logit_bias(model)
    assert model.logit_scale.bias.item() == -10.0


def test_zero_shot_thresholds_are_tuned_on_val_and_used_at_predict(tmp_path):
    model = tiny_dual()
    add_logit_bias(model)
    attributes = AttributeSet(COLOURS)
    val = dataset(colour_tags(tmp_path, 12, 0, "val.csv"), model, attributes)
    test = dataset(colour_tags(tmp_path, 8, 1, "test.csv"), model, attributes)
    thresholds, metrics = zero_shot_attributes(model, attributes, val, test, templates=TEMPLATES)

    with torch.no_grad():  # the reference: images and prompts embedded by hand, scored, thresholds tuned on val
        prompts = hand_prompts(model, COLOURS, TEMPLATES)
        scores = {}
        for name, data in (("val", val), ("test", test)):
            images = torch.stack([data[i]["image"] for i in range(len(data))])
            scores[name] = torch.sigmoid(model.logit_scale() * model.encode_image(images) @ prompts.T)
    val_targets = torch.stack([attributes.encode(labels) for labels in val.label_sets()])
    expected = tune_thresholds(scores["val"], val_targets, COLOURS)
    assert thresholds.values == pytest.approx(expected.values, abs=1e-6) and thresholds.tuned_on == val.name
    assert [a.threshold for a in metrics.per_attribute] == pytest.approx(expected.values, abs=1e-6)
    assert metrics.n == len(test)

    head = PromptedHead(attributes, prompts, model.logit_scale().item(), 0.0, torch.tensor(thresholds.values))
    images = torch.stack([test[i]["image"] for i in range(len(test))])
    with torch.no_grad():
        predicted = head.predict(model.encode_image(images))
    above = scores["test"] >= torch.tensor(thresholds.values, dtype=scores["test"].dtype)
    assert [{name for name, _ in row} for row in predicted] == [
        {COLOURS[a] for a in torch.nonzero(hit).flatten().tolist()} for hit in above]
    for row, image_scores in zip(predicted, scores["test"], strict=True):
        assert [s for _, s in row] == sorted((s for _, s in row), reverse=True)
        assert all(score == pytest.approx(image_scores[COLOURS.index(name)].item(), abs=1e-5) for name, score in row)


def test_scoring_without_adapters_is_the_base_model(tmp_path):
    model = tiny_dual()
    add_logit_bias(model)
    attributes = AttributeSet(COLOURS)
    val = dataset(colour_tags(tmp_path, 6, 0, "val.csv"), model, attributes)
    base = score_dataset(model, val, attributes, COLOURS, TEMPLATES)
    adapted = inject(model, tower_adapter_config(model, ["q", "v"], ["q", "v"], rank=2, alpha=4))
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    moved = score_dataset(adapted, val, attributes, COLOURS, TEMPLATES)
    again = score_dataset(adapted, val, attributes, COLOURS, TEMPLATES, base=True)
    assert not torch.allclose(moved.scores, base.scores, atol=1e-3)
    torch.testing.assert_close(again.scores, base.scores, rtol=0, atol=1e-6)


def test_prompt_names_are_checked():
    assert prompt_names(["red", "blue_ish"], {"red": "crimson"}) == ["crimson", "blue_ish"]
    with pytest.raises(ConfigError, match=r"task\.class_names names \['redd'\], which are not attributes "
                                          r"\(red, blue\); fix the keys"):
        prompt_names(["red", "blue"], {"redd": "crimson"})
    with pytest.raises(ConfigError, match=r"attributes \['blue'\] have no prompt name \(task\.class_names maps "
                                          r"them to an empty text\)"):
        prompt_names(["red", "blue"], {"blue": " "})


def prompted_config(tmp_path, towers, train, val=None, **sections):
    config = {
        "model": {"spec": f"hf:{towers[0]}", "text": f"hf:{towers[1]}", "embed_dim": 16, "pooling": "mean"},
        "task": {"kind": "prompted_multilabel", "templates": ["{}", "a {} picture"]},
        "adapter": {"vision_targets": ["q", "v"], "text_targets": ["q", "v"], "rank": 4, "alpha": 8},
        "data": {"train": str(train), "image_size": 32, "augment": {"enabled": False},
                 **({"val": str(val)} if val else {})},
        "optim": {"batch_size": 8, "max_steps": 60, "lr_adapter": 3e-2, "lr_head": 5e-2},
        "run": {"output_dir": str(tmp_path / "run"), "progress": False},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    return TrainConfig.parse(config)


@pytest.fixture(scope="module")
def prompted_run(tmp_path_factory):
    """A tiny prompted run (LoRA on both towers, 60 steps) on colour-tag images, and its validation manifest."""
    tmp_path = tmp_path_factory.mktemp("prompted")
    towers = save_towers(tmp_path / "towers")
    train = colour_tags(tmp_path / "data", 32, 0, "train.csv")
    val = colour_tags(tmp_path / "data", 16, 1, "val.csv")
    trainer = Trainer(prompted_config(tmp_path, towers, train, val, run={"eval_every": 30}))
    return trainer, trainer.fit(), val


@pytest.mark.slow
def test_prompted_run_learns_saves_thresholds_and_reloads(prompted_run):
    trainer, result, val = prompted_run
    losses = [r["loss"] for r in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines())
              if r["split"] == "train"]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    task = json.loads((result.adapter_dir / "task.json").read_text())
    assert task["task"] == "prompted_multilabel" and task["attributes"]["names"] == sorted(COLOURS)
    assert len(task["thresholds"]["values"]) == 3 and task["thresholds"]["tuned_on"].endswith("val.csv at step 60")
    assert task["zero_shot_thresholds"]["tuned_on"].endswith("val.csv at the base model")
    assert result.final["map"] > 0.8

    model, saved = load_trained_dual(result.adapter_dir)
    data = dataset(val, model.base_model, AttributeSet(COLOURS))
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    trained = trainer.adapted.eval()
    with torch.no_grad():
        expected = prompted_head(trained.base_model, saved).predict(trained(images=images)[0])
        reloaded = prompted_head(model.base_model, saved).predict(model(images=images)[0])
    assert [[n for n, _ in row] for row in reloaded] == [[n for n, _ in row] for row in expected]
    assert prompted_head(model.base_model, saved).bias != 0.0  # the learned bias was saved and loaded



@pytest.mark.slow
def test_eval_compares_the_adapter_with_the_base_zero_shot_each_at_its_thresholds(prompted_run, tmp_path):
    _, result, val = prompted_run
    task = json.loads((result.adapter_dir / "task.json").read_text())
    comparison = compare_prompted(result.adapter_dir, val, predictions=tmp_path / "p.csv")
    assert comparison.adapted.map == pytest.approx(result.final["map"], abs=1e-5)  # the final evaluation's data
    assert [a.threshold for a in comparison.base.per_attribute] == pytest.approx(
        task["zero_shot_thresholds"]["values"])
    assert [a.threshold for a in comparison.adapted.per_attribute] == pytest.approx(task["thresholds"]["values"])
    assert comparison.adapted.map > comparison.base.map + 0.1 and comparison.drift.mean < 1.0
    assert [d.ap_delta for d in comparison.per_attribute] == pytest.approx(
        [a.ap - b.ap for a, b in zip(comparison.adapted.per_attribute, comparison.base.per_attribute, strict=True)])
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 1 + 16

    out = CliRunner().invoke(app, ["eval", "--adapter", str(result.adapter_dir), "--data", str(val)],
                             terminal_width=200)
    assert out.exit_code == 0, out.output
    printed = " ".join(out.output.split())  # rich wraps long lines
    for text in ("mAP", "micro-F1", "per attribute", "base = the base dual encoder zero-shot",
                 "adapted: tuned (max_f1) on", "val.csv at the base model"):
        assert text in printed


@pytest.mark.slow
def test_report_on_a_prompted_run_has_the_multilabel_section_against_zero_shot(prompted_run):
    _, result, val = prompted_run
    files = write_report(result.adapter_dir.parent, data=str(val))
    comparison = compare_prompted(result.adapter_dir, val)
    saved = json.loads(files.evaluation.read_text())
    assert saved["task"] == "prompted_multilabel"
    assert saved["adapted"]["map"] == pytest.approx(comparison.adapted.map)
    assert saved["base"]["map"] == pytest.approx(comparison.base.map)
    html, card = files.html.read_text(), files.model_card.read_text()
    for page in (html, card):
        assert nan_text(comparison.adapted.map) in page and nan_text(comparison.base.map) in page
    assert "zero-shot" in html


@pytest.mark.slow
def test_serving_a_prompted_adapter_returns_the_attributes_above_their_thresholds(prompted_run, tmp_path):
    _, result, val = prompted_run
    model, task = load_trained_dual(result.adapter_dir)
    data = dataset(val, model.base_model, AttributeSet.from_dict(task["attributes"]))
    images = torch.stack([data[i]["image"] for i in range(8)])
    with torch.no_grad():
        scores = prompted_head(model.base_model, task).scores(model(images=images)[0])
    folder = shutil.copytree(result.adapter_dir, tmp_path / "tags")  # thresholds midway between the 4th and 5th
    task["thresholds"]["values"] = scores.sort(0).values[3:5].mean(0).tolist()  # highest scores: half pass
    (folder / "task.json").write_text(json.dumps(task))
    thresholds = torch.tensor(task["thresholds"]["values"])
    files = [val.parent / data.records[i].source for i in range(8)]

    with build_engine(ServeConfig.parse({"adapters": {"tags": str(folder)}})) as engine:
        predictions = engine.predict_many([str(f) for f in files], ["tags"] * 8, k=1)
        counts = set()
        for prediction, row in zip(predictions, scores, strict=True):
            want = [(task["attributes"]["names"][a], row[a].item()) for a in row.argsort(descending=True).tolist()
                    if row[a] >= thresholds[a]]
            assert prediction.multilabel and prediction.adapter == "tags"
            assert [(label.label, label.score) for label in prediction.labels] == [
                (name, pytest.approx(score, abs=1e-5)) for name, score in want]
            assert [label.threshold for label in prediction.labels] == pytest.approx(
                [thresholds[label.index].item() for label in prediction.labels])
            counts.add(len(want))
        assert len(counts) > 1  # images differ in how many attributes pass: the thresholds are in use
        with TestClient(create_app(engine, close_engine=False)) as client:
            response = client.post("/v1/predict", files={"image": ("x.png", files[0].read_bytes(), "image/png")},
                                   data={"adapter": "tags"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["multilabel"] is True and [label["label"] for label in body["labels"]] == [
        label.label for label in predictions[0].labels]


def test_bad_prompted_configs_are_refused_with_the_fix(tmp_path):
    towers = save_towers(tmp_path / "towers")
    train = colour_tags(tmp_path / "data", 8, 0, "train.csv")
    classifier = prompted_config(tmp_path, towers, train, model={"spec": "timm:vit_tiny_patch16_224", "text": None})
    with pytest.raises(ConfigError, match=r"model spec 'timm:vit_tiny_patch16_224' has no text tower; use "
                                          r"hf:<CLIP/SigLIP>, open_clip:<name>, or set model\.text"):
        Trainer(classifier)
    typo = prompted_config(tmp_path, towers, train, task={"class_names": {"gren": "green"}})
    with pytest.raises(ConfigError, match=r"task\.class_names names \['gren'\], which are not attributes "
                                          r"\(blue, green, red\)"):
        Trainer(typo)
    folder = prompted_config(tmp_path, towers, train, data={"train": str(tmp_path / "data")})
    with pytest.raises(DataError, match=r"multi-label data must be a \.csv/\.jsonl manifest with a list of labels"):
        Trainer(folder)
    single = manifest(csv_manifest(tmp_path / "data", [{"path": "train_000.png", "label": "red"}] * 8, "one.csv"))
    with pytest.raises(DataError, match=r"one\.csv holds one label per image; task\.kind prompted_multilabel needs "
                                        r"a \.csv/\.jsonl manifest whose label column lists each image's attributes"):
        Trainer(prompted_config(tmp_path, towers, train), train_data=single)
    with pytest.raises(ConfigError, match=r"task\.multilabel is set but task\.kind is 'contrastive'"):
        prompted_config(tmp_path, towers, train, task={"kind": "contrastive", "multilabel": {"loss": "asymmetric"}})


def test_tower_variants_adapt_both_towers_or_only_one(tmp_path):
    towers = save_towers(tmp_path / "towers")
    train = colour_tags(tmp_path / "data", 8, 0, "train.csv")
    variants = tower_variants(prompted_config(tmp_path, towers, train))
    assert list(variants) == ["both", "vision", "text"]
    adapted = {}
    for name, config in variants.items():
        assert config.run.output_dir == str(tmp_path / "run" / name)
        model = Trainer(config).adapted
        adapted[name] = ({path.split(".")[0] for path in model.layers()},
                         set(model.configs["default"].modules_to_save))
    assert adapted["both"] == ({"vision", "text"}, {"vision_proj", "text_proj", "logit_scale"})
    assert adapted["vision"] == ({"vision"}, {"vision_proj", "logit_scale"})
    assert adapted["text"] == ({"text"}, {"text_proj", "logit_scale"})


def test_the_example_config_trains_on_a_tiny_manifest(tmp_path):
    example = Path(__file__).resolve().parents[2] / "examples" / "prompted_attributes.yaml"
    towers = save_towers(tmp_path / "towers")
    train = colour_tags(tmp_path / "data", 8, 0, "train.csv")
    val = colour_tags(tmp_path / "data", 8, 1, "val.csv")
    overrides = [f"model.spec=hf:{towers[0]}", f"model.text=hf:{towers[1]}", "model.embed_dim=16",
                 "task.class_names={}", f"data.train={train}", f"data.val={val}", "data.image_size=32",
                 "optim.max_steps=2", "optim.batch_size=8", "optim.warmup_steps=0",
                 f"run.output_dir={tmp_path / 'run'}", "run.eval_every=0", "run.save_every=0", "run.progress=false"]
    config = TrainConfig.load(example, overrides)
    assert config.task.multilabel.loss == "asymmetric" and config.run.best_metric == "map"
    result = Trainer(config).fit()
    task = json.loads((result.adapter_dir / "task.json").read_text())
    assert task["task"] == "prompted_multilabel" and task["templates"] == config.task.templates
    assert task["zero_shot_thresholds"] is not None and task["thresholds"] is not None
