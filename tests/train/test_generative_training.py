"""Captioning / VQA training with the trainer on a tiny LLaVA: answer-only loss that falls, stages (connector, then
LM LoRA), exact resume, task.json that rebuilds the trained model, the truncation warning, config errors."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tests.vlm.generative_fixtures import tiny_causal_lm, tiny_llava, tiny_tokenizer, tiny_vision

from vislora.errors import AdapterFileError, ConfigError, VisloraWarning
from vislora.run_config import VLM_PARTS, TrainConfig
from vislora.runs import load_trained_vlm
from vislora.train.generative import matches
from vislora.train.trainer import Trainer
from vislora.vlm import IGNORE, PARTS

COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "black": (10, 10, 10), "white": (245, 245, 245)}


def vqa_file(folder: Path, per_color: int = 2, long_answer: bool = False) -> Path:
    """A JSONL VQA set of solid-colour 28 px images: `what color is this item ?` -> the colour."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, rgb in COLORS.items():
        for i in range(per_color):
            shade = tuple(max(0, min(255, c + 8 * i)) for c in rgb)
            Image.new("RGB", (28, 28), shade).save(folder / f"{name}-{i}.png")
            answer = f"a small {name} item" + " , a small item" * 6 if long_answer else name
            rows.append({"image": f"{name}-{i}.png", "question": "what color is this item ?", "answer": answer})
    path = folder / "vqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def vqa_config(out: Path, train: Path, **sections: dict) -> TrainConfig:
    """A VQA TrainConfig for the tiny LLaVA (passed as the base model) on `train` (also the held-out data)."""
    config = {
        "model": {"spec": "tiny"},
        "task": {"kind": "vqa", "max_length": 128, "generations": 4, "max_new_tokens": 3},
        "adapter": {"targets": ["lm"], "rank": 4, "alpha": 8, "train_connector": True},
        "data": {"train": str(train), "val": str(train), "augment": {"enabled": False}},
        "optim": {"batch_size": 4, "max_steps": 4, "lr_adapter": 3e-2, "lr_head": 1e-2, "schedule": "constant"},
        "run": {"output_dir": str(out), "progress": False},
    }
    if "stages" in sections and "max_steps" not in sections.get("optim", {}):
        del config["optim"]["max_steps"]  # the stages' sum
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    return TrainConfig.parse(config)


def rows(run: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return vqa_file(tmp_path_factory.mktemp("vqa"))


def test_answer_only_loss_falls_and_the_run_records_its_vlm(tmp_path, data):
    trainer = Trainer(vqa_config(tmp_path / "run", data, optim={"max_steps": 6}), base_model=tiny_llava())
    batch = next(trainer._epoch_batches())
    tokens = trainer.task.tokens(trainer.task.questions(batch), batch["answer"])
    for labels, answer in zip(tokens["labels"], batch["answer"], strict=True):  # the loss sees the answer alone
        expected = trainer.task.vlm.processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
        assert labels[labels != IGNORE].tolist() == [*expected, trainer.task.vlm.processor.eos_token_id]
    untrained = trainer.task.evaluate(trainer)  # not logged: fit starts metrics.jsonl afresh
    result = trainer.fit()
    losses = [r["loss"] for r in rows(result.run_dir, "train")]
    assert len(losses) == 6 and sum(losses[-2:]) / 2 < losses[0] - 0.3, losses
    assert set(result.final) == {"loss", "exact_match"} and result.final["loss"] < untrained.loss - 0.3
    assert result.best is not None and (result.run_dir / "best" / "task.json").is_file()
    task = json.loads((result.adapter_dir / "task.json").read_text())
    assert task["task"] == "vqa" and task["vlm"]["image_tokens"] == 16 and task["prepared_base"] is True
    assert task["step"] == 6 and task["input"]["size"] == 28
    with pytest.raises(AdapterFileError, match="prepared in Python"):
        load_trained_vlm(result.adapter_dir)  # a hand-built VLM cannot be rebuilt from task.json
    model, _, _ = load_trained_vlm(result.adapter_dir, vlm=tiny_llava())
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert any("multi_modal_projector" in k for k in weights)  # the trained connector travels with the adapter
    assert torch.equal(model.base_model.model.multi_modal_projector.linear_1.weight,
                       trainer.adapted.base_model.model.multi_modal_projector.linear_1.weight)


def test_exact_match_normalizes_case_and_punctuation():
    assert matches("Red.", ["red"]) and matches("a  sneaker", ["A sneaker"]) and not matches("red", ["blue"])


def part_weights(step_dir: Path, part: str) -> dict[str, torch.Tensor]:
    paths = {"lm": ".language_model.", "vision": ".vision_tower.", "connector": ".multi_modal_projector."}
    return {k: v for k, v in load_file(step_dir / "adapter_model.safetensors").items() if paths[part] in k}


STAGES = [{"steps": 2, "train": ["connector"]}, {"steps": 2, "train": ["lm"]}]


def staged(run: Path, data: Path) -> TrainConfig:
    return vqa_config(run, data, stages=STAGES, run={"save_every": 1, "keep_last": 10},
                      task={"generations": 0}, optim={"max_steps": 4})


def test_stage_one_aligns_the_connector_stage_two_trains_lm_lora(tmp_path, data):
    vlm = tiny_llava()
    vision = copy.deepcopy(vlm.model.model.vision_tower.state_dict())
    connector = {k: v.clone() for k, v in vlm.model.model.multi_modal_projector.state_dict().items()}
    result = Trainer(staged(tmp_path / "run", data), base_model=vlm).fit()
    assert [(r["step"], r["train"]) for r in rows(result.run_dir, "stage")] == [(0, ["connector"]), (2, ["lm"])]
    step = {s: result.run_dir / f"checkpoints/step-{s:06d}" for s in (2, 4)}
    lm_2, lm_4 = part_weights(step[2], "lm"), part_weights(step[4], "lm")
    assert lm_2 and all(v.abs().sum() == 0 for k, v in lm_2.items() if "lora_B" in k)  # LM LoRA untouched
    assert any(v.abs().sum() > 0 for k, v in lm_4.items() if "lora_B" in k)  # stage 2 trains it
    conn_2, conn_4 = part_weights(step[2], "connector"), part_weights(step[4], "connector")
    assert conn_2.keys() == conn_4.keys() and all(torch.equal(conn_2[k], conn_4[k]) for k in conn_2)  # frozen
    trained = {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1]: v for k, v in conn_2.items()}
    assert set(trained) == set(connector)
    assert all(not torch.equal(trained[k], connector[k]) for k in connector if k.endswith("weight"))  # stage 1
    assert not part_weights(step[4], "vision")
    after = vlm.model.model.vision_tower.state_dict()
    assert all(torch.equal(vision[k], after[k]) for k in vision)  # the vision tower stays as it was


def test_stage_errors_name_the_part(tmp_path, data):
    with pytest.raises(ConfigError, match=r"stage 2 trains \['qformer'\], which a llava model does not have; its "
                                          r"parts are vision, connector, lm"):
        Trainer(vqa_config(tmp_path / "a", data, stages=[{"steps": 1, "train": ["lm"]},
                                                         {"steps": 1, "train": ["qformer"]}]),
                base_model=tiny_llava())
    with pytest.raises(ConfigError, match=r"stages\[0\]\.train names `text`, a dual-encoder tower"):
        vqa_config(tmp_path / "b", data, stages=[{"steps": 1, "train": ["text"]}])
    with pytest.raises(ConfigError, match=r"stage 1 trains \['connector'\], but no trainable parameter"):
        Trainer(vqa_config(tmp_path / "c", data, adapter={"train_connector": False},
                           stages=[{"steps": 1, "train": ["connector"]}]), base_model=tiny_llava())
    everything = vqa_config(tmp_path / "d", data, stages=[{"steps": 1}])
    assert everything.stages[0].train == list(VLM_PARTS) == list(PARTS)


def test_config_refuses_generative_settings_elsewhere_and_others_here(tmp_path, data):
    base = {"model": {"spec": "timm:vit_tiny_patch16_224"}, "data": {"train": str(data)},
            "optim": {"max_steps": 1}, "run": {"output_dir": str(tmp_path)}}
    with pytest.raises(ConfigError, match=r"model\.lm, adapter\.train_connector configure captioning / VQA runs, "
                                          r"but task\.kind is 'classification'"):
        TrainConfig.parse({**base, "model": {"spec": "x", "lm": "y"}, "adapter": {"train_connector": True}})
    with pytest.raises(ConfigError, match=r"stages\[0\]\.train names \['lm'\], VLM parts"):
        TrainConfig.parse({**base, "stages": [{"steps": 1, "train": ["lm"]}]})
    with pytest.raises(ConfigError, match=r"adapter\.vision_targets belong to dual encoders"):
        vqa_config(tmp_path, data, adapter={"vision_targets": ["q"]})
    with pytest.raises(ConfigError, match=r"run\.best_metric map is not measured by this captioning run"):
        vqa_config(tmp_path, data, task={"kind": "captioning"}, run={"best_metric": "map"})
    with pytest.raises(ConfigError, match=r"model\.connector_hidden sizes the connector"):
        vqa_config(tmp_path, data, model={"spec": "hf:x", "connector_hidden": 8})
    assert vqa_config(tmp_path, data).run.best_metric == "loss"
    assert vqa_config(tmp_path, data, run={"best_metric": "exact_match"}).run.best_metric == "exact_match"


def test_resume_after_a_stop_matches_the_uninterrupted_run(tmp_path, data):
    straight = Trainer(staged(tmp_path / "a", data), base_model=tiny_llava()).fit()
    interrupted = tmp_path / "b"
    shutil.copytree(straight.run_dir, interrupted)
    for step in (2, 3, 4):  # stopped after step 1, inside stage 1
        shutil.rmtree(interrupted / f"checkpoints/step-{step:06d}")
    for name in ("adapter", "best", "summary.json"):
        path = interrupted / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    resumed = Trainer(staged(interrupted, data), base_model=tiny_llava())
    result = resumed.fit()
    for name in ("adapter/adapter_model.safetensors", "checkpoints/step-000004/optimizer.safetensors"):
        a, b = load_file(straight.run_dir / name), load_file(result.run_dir / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert [r["loss"] for r in rows(straight.run_dir, "train")] == [r["loss"] for r in rows(result.run_dir, "train")]


def save_tiny_parts(folder: Path) -> tuple[Path, Path]:
    """A tiny DINOv2 and a tiny Llama with its tokenizer, saved as Hugging Face folders."""
    vision_dir, lm_dir = folder / "vision", folder / "lm"
    tiny_vision().save_pretrained(vision_dir)
    tokenizer = tiny_tokenizer()
    tiny_causal_lm(len(tokenizer)).save_pretrained(lm_dir)
    tokenizer.save_pretrained(lm_dir)
    return vision_dir, lm_dir


def test_a_run_from_config_reloads_from_task_json_and_generates_the_same_tokens(tmp_path, data):
    vision_dir, lm_dir = save_tiny_parts(tmp_path / "parts")
    config = vqa_config(tmp_path / "run", data, model={"spec": f"hf:{vision_dir}", "lm": f"hf:{lm_dir}"},
                        data={"image_size": 28}, task={"system": "answer briefly ."}, optim={"max_steps": 3})
    trainer = Trainer(config)
    result = trainer.fit()
    task = json.loads((result.adapter_dir / "task.json").read_text())
    assert task["prepared_base"] is False and task["vlm"]["lm"] == f"hf:{lm_dir}" and task["vlm"]["seed"] == 0
    assert task["vlm"]["system"] == "answer briefly ." and task["prompt"] == config.task.prompt
    model, vlm, _ = load_trained_vlm(result.adapter_dir)  # rebuilt from task.json alone
    prompts = vlm.processor.prompt_batch(["what color is this item ?"] * 2)
    pixels = torch.stack([trainer.val_data[i]["image"] for i in (0, 7)])
    kwargs = {"max_new_tokens": 4, "do_sample": False, **vlm.processor.generation_kwargs()}
    trainer.adapted.eval()
    with torch.no_grad():
        expected = trainer.adapted.generate(**prompts, pixel_values=pixels, **kwargs)
        again = model.generate(**prompts, pixel_values=pixels, **kwargs)
    assert torch.equal(expected, again)
    one = vlm.processor.train_batch(["what color is this item ?"], ["red"])
    with torch.no_grad():
        adapted = model(**one, pixel_values=pixels[:1]).logits
        plain = model(**one, pixel_values=pixels[:1], adapters=[None]).logits
    assert not torch.allclose(adapted, plain)  # the reloaded adapter is the trained one, not a no-op


def test_cut_answers_warn_once_and_are_counted(tmp_path):
    data = vqa_file(tmp_path / "long", per_color=1, long_answer=True)
    probe = tiny_llava()
    room = len(probe.processor.prompt_ids("what color is this item ?")) + 3
    config = vqa_config(tmp_path / "run", data, task={"max_length": room, "generations": 0},
                        optim={"max_steps": 3})
    trainer = Trainer(config, base_model=tiny_llava(max_length=room))
    with pytest.warns(VisloraWarning, match=r"4 of 4 answers were cut at max_length .*later cuts are counted") as got:
        result = trainer.fit()
    assert len([w for w in got if "were cut" in str(w.message)]) == 1
    assert [r["cut_answers"] for r in rows(result.run_dir, "train")] == [4, 8, 12]
