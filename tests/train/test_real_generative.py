"""A short real VQA run: DINOv2 ViT-S/14 + SmolLM2-135M-Instruct (the offline pair) on Fashion-MNIST questions."""

import json
import math

import pytest
from PIL import Image

from conftest import real_assets_or_skip, real_vlm_or_skip
from vislora.assets import FASHION_MNIST_CLASSES, read_fashion_mnist
from vislora.run_config import TrainConfig
from vislora.runs import load_trained_vlm
from vislora.train.trainer import Trainer

pytestmark = pytest.mark.slow


def fashion_vqa(folder, count):
    """`count` Fashion-MNIST test images, each asked what it is, as a VQA JSONL."""
    images, labels = read_fashion_mnist("test")
    folder.mkdir(parents=True)
    rows = []
    for i in range(count):
        Image.fromarray(images[i]).convert("RGB").save(folder / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": "What is this item?", "answer": FASHION_MNIST_CLASSES[labels[i]]})
    (folder / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "vqa.jsonl"


def test_three_steps_of_dinov2_smollm2_train_reload_and_answer(tmp_path):
    real_assets_or_skip()
    real_vlm_or_skip()
    data = fashion_vqa(tmp_path / "data", 8)
    cfg = TrainConfig.parse({
        "model": {"spec": "asset:dinov2-small", "lm": "asset:smollm2-135m-instruct"},
        "task": {"kind": "vqa", "max_length": 128, "generations": 2, "max_new_tokens": 4},
        "adapter": {"targets": ["lm:q", "lm:v"], "rank": 4, "alpha": 8, "train_connector": True},
        "data": {"train": str(data), "val": str(data), "val_limit": 4, "image_size": 56},
        "optim": {"batch_size": 4, "lr_adapter": 1e-3, "lr_head": 1e-3},
        "stages": [{"steps": 1, "train": ["connector"]}, {"steps": 2, "train": ["lm"]}],
        "run": {"output_dir": str(tmp_path / "run"), "progress": False},
    })
    trainer = Trainer(cfg)
    result = trainer.fit()
    losses = [r["loss"] for r in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines())
              if r["split"] == "train"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses) and math.isfinite(result.final["loss"])
    model, vlm, task = load_trained_vlm(result.adapter_dir)  # rebuilt from task.json: the real pair again
    assert task["vlm"]["lm"] == "asset:smollm2-135m-instruct" and task["vlm"]["image_tokens"] == 16
    prompts = vlm.processor.prompt_batch(["What is this item?"])
    pixels = trainer.val_data[0]["image"][None]
    out = model.generate(**prompts, pixel_values=pixels, max_new_tokens=6, min_new_tokens=2, do_sample=False,
                         **vlm.processor.generation_kwargs())
    text = vlm.processor.decode(out, prompts["input_ids"].shape[1])[0]
    assert isinstance(text, str) and text.strip(), text
