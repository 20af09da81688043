"""`vislora merge` for captioning and VQA runs: the generative VLM with its adapter merged, saved as a plain
transformers LLaVA folder that loads and generates without vislora.

OUT holds:
- the merged `LlavaForConditionalGeneration` (`save_pretrained`: vision tower, connector, language model; a tied
  LM head stays tied), its generation_config.json ending on the chat's end token, padding with the pad token and
  never generating `<image>`;
- the tokenizer with `<image>` and the chat template, and a `LlavaProcessor` whose image processor resizes the
  shorter side, centre-crops and normalises as the run did, and which expands one `<image>` into the image tokens;
- vislora_generation.json: the prompt layout (image tokens, image side, mean/std, interpolation, the run's prompt and
  the exact prompt text it makes) and the load recipe, also written as README.md.

A plain-transformers user writes (the recipe in README.md):

    model = LlavaForConditionalGeneration.from_pretrained(OUT)
    processor = AutoProcessor.from_pretrained(OUT)
    text = processor.tokenizer.apply_chat_template([{"role": "user", "content": "<image>\\n" + question}],
                                                   tokenize=False, add_generation_prompt=True)
    inputs = processor(images=image, text=text, add_special_tokens=False, return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=30, do_sample=False)

Before the folder is renamed into place it is loaded back that way; its pixels, logits and greedy tokens on a probe
image are compared with the adapted model's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from vislora.data.transforms import build_transform
from vislora.errors import ExportError
from vislora.export.common import MERGE_ATOL, MergeResult, preprocessing, staged_dir, write_json
from vislora.io import atomic_write_text
from vislora.runs import GENERATIVE_TASKS, TASK_FILE, load_trained_vlm
from vislora.vlm import IMAGE_TOKEN, Vlm

logger = logging.getLogger(__name__)

LAYOUT = "transformers:LlavaForConditionalGeneration"
PROBE_TOKENS = 8
PIXEL_ATOL = 1e-4  # PIL resize in both pipelines; only float rounding of rescale and normalise differs
DEFAULT_QUESTION = "Describe the image briefly."
RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
            "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}
RECIPE = """\
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

model = LlavaForConditionalGeneration.from_pretrained("OUT").eval()
processor = AutoProcessor.from_pretrained("OUT")
text = processor.tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
inputs = processor(images=Image.open("photo.jpg").convert("RGB"), text=text, add_special_tokens=False,
                   return_tensors="pt")
ids = model.generate(**inputs, max_new_tokens=30, do_sample=False)
print(processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
"""


def is_generative(adapter_dir: str | Path) -> bool:
    """Whether `adapter_dir` holds a task.json of a captioning or VQA run (a generative VLM adapter)."""
    task_file = Path(adapter_dir) / TASK_FILE
    if not task_file.is_file():
        return False
    try:
        return json.loads(task_file.read_text()).get("task") in GENERATIVE_TASKS
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def merge_vlm(adapter_dir: str | Path, out: str | Path, overwrite: bool = False) -> MergeResult:
    """Merge a captioning / VQA run's adapter into its VLM and save a plain transformers LLaVA folder to `out`
    (see the module docstring)."""
    if Path(out).exists() and not overwrite:  # before minutes of loading, not after
        raise ExportError(f"{out} already exists; choose another output folder or pass --overwrite to replace it")
    adapted, vlm, task = load_trained_vlm(adapter_dir)
    _check_plain_llava(vlm, adapter_dir)
    question = task.get("prompt") or DEFAULT_QUESTION
    image = probe_image(vlm.image_spec.size or 224)
    pixels = build_transform(vlm.image_spec, train=False)(image)[None]  # [1, 3, S, S]
    batch = vlm.processor.prompt_batch([question])
    kwargs = {**vlm.processor.generation_kwargs(), "max_new_tokens": PROBE_TOKENS, "do_sample": False,
              "num_beams": 1}
    with torch.inference_mode():
        reference = adapted(**batch, pixel_values=pixels).logits
        expected = adapted.generate(**batch, pixel_values=pixels, **kwargs)[0, batch["input_ids"].shape[1]:]
    with torch.no_grad():
        plain = adapted.unload(merge=True).eval()
    with torch.inference_mode():
        difference = (plain(**batch, pixel_values=pixels).logits - reference).abs().max().item()
    if difference > MERGE_ATOL:
        raise ExportError(f"the merged VLM differs from the adapted one by {difference:.3g} (> {MERGE_ATOL:g}); the "
                          "adapter cannot be merged exactly (is it a method that is not linear in W?)")
    generation = generation_record(vlm, task, question)
    with staged_dir(out, overwrite) as tmp:
        _save(plain, vlm, tmp)
        reload_difference = _check_reload(tmp, image, pixels, generation["prompt_text"], reference, expected)
        load = f"see {Path(out) / 'README.md'} (LlavaForConditionalGeneration + AutoProcessor)"
        write_json(tmp / "vislora_generation.json", {
            **generation, "layout": LAYOUT, "adapter": str(Path(adapter_dir).resolve()), "task": task.get("task"),
            "max_abs_diff": difference, "reload_max_abs_diff": reload_difference})
        atomic_write_text(tmp / "README.md", readme(generation, Path(out)))
    return MergeResult(Path(out), LAYOUT, difference, reload_difference, load)


def generation_record(vlm: Vlm, task: dict[str, Any], question: str) -> dict[str, Any]:
    """How a plain-transformers user builds inputs: the prompt layout, image preprocessing and generation ends."""
    spec, tokenizer = vlm.image_spec, vlm.processor.tokenizer
    system = vlm.record.get("system")
    return {"prompt": task.get("prompt"), "prompt_text": prompt_text(tokenizer, question, system),
            "messages": messages(question, system), "image_token": IMAGE_TOKEN,
            "image_token_id": vlm.model.config.image_token_id, "image_tokens": vlm.record.get("image_tokens"),
            "chat_template": getattr(tokenizer, "chat_template", None), "add_special_tokens": False,
            "image_size": spec.size, **preprocessing(spec), "resize": "shorter side, then centre crop",
            "eos_token_id": vlm.processor.eos_token_id, "pad_token_id": vlm.processor.pad_token_id}


def messages(question: str, system: str | None) -> list[dict[str, str]]:
    """The chat turns of one prompt, one `<image>` placeholder before the question (the processor expands it)."""
    turns = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"}]
    return [{"role": "system", "content": system}, *turns] if system is not None else turns


def prompt_text(tokenizer: Any, question: str, system: str | None) -> str:
    """The prompt text vislora's ChatLayout tokenizes, with one `<image>` in place of the image tokens."""
    if not getattr(tokenizer, "chat_template", None):
        return f"{IMAGE_TOKEN}\n{question}\n"
    return tokenizer.apply_chat_template(messages(question, system), tokenize=False, add_generation_prompt=True)


def probe_image(side: int, seed: int = 2) -> Image.Image:
    """A fixed RGB noise image, larger than `side` and not square, so resizing and cropping are both checked."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (side * 2, side * 3, 3), dtype=np.uint8), "RGB")


def readme(generation: dict[str, Any], out: Path) -> str:
    """README.md of a merged VLM folder: what it is and the plain-transformers recipe."""
    recipe = RECIPE.replace("OUT", str(out)).replace("MESSAGES", repr(generation["messages"]))
    return (f"# Merged VLM (vislora)\n\nA transformers `LlavaForConditionalGeneration` with its LoRA adapter merged; "
            f"it needs no vislora. Images: {generation['image_size']} px ({generation['resize']}), mean "
            f"{generation['mean']}, std {generation['std']}; each `<image>` becomes {generation['image_tokens']} "
            "image tokens. The run's prompt layout is in vislora_generation.json.\n\n```python\n" + recipe + "```\n")


def _check_plain_llava(vlm: Vlm, adapter_dir: str | Path) -> None:
    """ExportError unless transformers' own LLaVA can rebuild the model from its config alone."""
    if vlm.family.name != "llava":
        raise ExportError(f"{adapter_dir} adapts a {vlm.family.name} model; merged generative export is written for "
                          "LLaVA models (vislora.vlm.build_vlm with an LM); load it with vislora.runs.load_trained_vlm")
    connector = vlm.model.model.multi_modal_projector.linear_1
    width = vlm.model.config.text_config.hidden_size
    if connector.out_features != width:
        raise ExportError(f"the connector's hidden width is {connector.out_features}, but transformers' LLaVA builds "
                          f"it at the LM width {width}, so a plain load would fail; train with connector_hidden unset "
                          "to export a merged model")


def _save(plain: nn.Module, vlm: Vlm, folder: Path) -> None:
    """The merged model, tokenizer, processor and generation config, in transformers' own files."""
    from transformers import BitImageProcessor, LlavaProcessor

    processor = vlm.processor
    config = plain.generation_config
    config.pad_token_id, config.eos_token_id = processor.pad_token_id, processor.eos_token_id
    config.suppress_tokens = [processor.image_token_id] if processor.image_token_id is not None else None
    plain.save_pretrained(folder)
    spec = vlm.image_spec
    side = spec.size or 224
    images = BitImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                               do_center_crop=True, resample=RESAMPLE.get(spec.interpolation, Image.Resampling.BICUBIC),
                               image_mean=list(spec.mean), image_std=list(spec.std), do_convert_rgb=True)
    vision = plain.config.vision_config
    strategy = plain.config.vision_feature_select_strategy
    patch = int(vision.patch_size)
    extra = int(vlm.record["image_tokens"]) - (side // patch) ** 2 + (1 if strategy == "default" else 0)
    LlavaProcessor(image_processor=images, tokenizer=processor.tokenizer, patch_size=patch,
                   vision_feature_select_strategy=strategy, chat_template=processor.tokenizer.chat_template,
                   image_token=IMAGE_TOKEN, num_additional_image_tokens=extra).save_pretrained(folder)


def _check_reload(folder: Path, image: Image.Image, pixels: torch.Tensor, text: str, reference: torch.Tensor,
                  expected: torch.Tensor) -> float:
    """Load `folder` the plain way, build the probe's inputs with its processor; ExportError if its pixels or greedy
    tokens differ from the adapted model's. Returns max |reloaded logits - adapted logits|."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    inputs = AutoProcessor.from_pretrained(folder)(images=image, text=text, add_special_tokens=False,
                                                   return_tensors="pt")
    pixel_gap = (inputs["pixel_values"] - pixels).abs().max().item()
    if inputs["pixel_values"].shape != pixels.shape or pixel_gap > PIXEL_ATOL:
        raise ExportError(f"the saved image processor prepares pixels {pixel_gap:.3g} away from the run's transform "
                          f"(> {PIXEL_ATOL:g}); nothing was written")
    with torch.inference_mode():
        logits = model(**inputs).logits
        if logits.shape != reference.shape:
            raise ExportError(f"the saved processor builds a prompt of {logits.shape[1]} tokens, the run's has "
                              f"{reference.shape[1]}; nothing was written")
        tokens = model.generate(**inputs, max_new_tokens=PROBE_TOKENS, do_sample=False, num_beams=1)
    tokens = tokens[0, inputs["input_ids"].shape[1]:]
    if tokens.tolist() != expected.tolist():
        raise ExportError(f"the saved model generates {tokens.tolist()} on the probe, the adapted model "
                          f"{expected.tolist()}; nothing was written")
    return (logits - reference).abs().max().item()
