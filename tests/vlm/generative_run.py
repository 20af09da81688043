"""A captioning run's adapter folder on a tiny LLaVA, as `vislora train` leaves it: the tiny vision encoder and LM
saved with save_pretrained, so `vislora.runs.load_trained_vlm` rebuilds the VLM from task.json offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tests.vlm.generative_fixtures import randomize_adapter, tiny_causal_lm, tiny_tokenizer, tiny_vision

from vislora import inject
from vislora.data.images import load_image
from vislora.data.transforms import build_transform
from vislora.formats import save_adapter
from vislora.vlm import Vlm, build_vlm, vlm_adapter_config

PROMPT = "describe the image briefly ."


def tiny_parts(root: Path, image_size: int = 28) -> tuple[str, str]:
    """(vision spec, LM spec): a tiny DINOv2 and a tiny Llama with its tokenizer, saved under `root`."""
    tokenizer = tiny_tokenizer()
    tiny_vision(image_size).save_pretrained(root / "vision")
    tiny_causal_lm(len(tokenizer)).save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    return f"hf:{root / 'vision'}", f"hf:{root / 'lm'}"


def captioning_run(root: Path, task: str = "captioning", train_connector: bool = True,
                   connector_hidden: int | None = None) -> tuple[Path, Vlm]:
    """An adapter folder (`root/adapter`) of a nonzero LoRA on the LM and vision tower, with a trained connector,
    and the Vlm it was made on (unadapted again)."""
    vision, lm = tiny_parts(root)
    vlm = build_vlm(vision, lm=lm, image_size=28, max_length=128, connector_hidden=connector_hidden)
    config = vlm_adapter_config(vlm.model, ["lm", "vision"], rank=4, alpha=8, train_connector=train_connector)
    model = inject(vlm.model, config)
    randomize_adapter(model, "default", seed=7)
    adapter = root / "adapter"
    save_adapter(model, adapter, "default")
    model.unload(merge=False)
    (adapter / "task.json").write_text(json.dumps({"task": task, "vlm": vlm.record, "prompt": PROMPT}))
    return adapter, vlm


def write_images(folder: Path, count: int, side: int = 40, seed: int = 0) -> list[Path]:
    """`count` random RGB PNGs of different content (not square, so resizing and cropping both act)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (side, side + 12, 3), dtype=np.uint8), "RGB").save(path)
        paths.append(path)
    return paths


def reference_tokens(model, vlm: Vlm, image: Path, question: str, max_new_tokens: int) -> list[int]:
    """Greedy tokens of `model` on one image file, inputs built the vislora way (load_image, eval transform,
    prompt_batch)."""
    pixels = build_transform(vlm.image_spec, train=False)(load_image(image))[None]
    batch = vlm.processor.prompt_batch([question])
    with torch.no_grad():
        out = model.generate(**batch, pixel_values=pixels, max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, **vlm.processor.generation_kwargs())
    return out[0, batch["input_ids"].shape[1]:].tolist()
