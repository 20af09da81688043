"""Shipping dual-encoder runs (task.kind contrastive / few_shot): the adapted model opened for export, merged, and
split into its two towers.

    image tower: pixels [batch, 3, size, size]                    -> image_embeds [batch, dim], L2-normalised
    text tower:  input_ids, attention_mask [batch, tokens] (int64) -> text_embeds [batch, dim], L2-normalised
    similarity:  logit_scale * image_embeds @ text_embeds.T (+ logit_bias for SigLIP)

`vislora export onnx` writes image.onnx and text.onnx (each checked against PyTorch with onnxruntime), the tokenizer
files, export.json (inputs, preprocessing, tokenizer settings, logit scale) and, for a run with class names, the
zero-shot classifier its prompts give (zero_shot_classifier.npy, labels.txt). `vislora export triton` writes two
Triton models, NAME_image and NAME_text. `vislora merge` is in `vislora.export.dual_merge`.

Not supported, refused with a message naming it: runs trained on a dual encoder prepared in Python (task.json
`prepared_base`), adapters that cannot merge (MoLoRA), INT8 (`--int8`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vislora.adapters.methods import method_class
from vislora.data.transforms import InputSpec
from vislora.dual_encoder import DualTowerModel
from vislora.errors import ExportError
from vislora.export.common import INPUT_NAME, MERGE_ATOL, preprocessing, staged_dir, write_json
from vislora.export.onnx import ONNX_ATOL, ONNX_RTOL, OPSET, check_onnx, compare_outputs, export_module
from vislora.export.runtime import inference_session
from vislora.model import AdaptedModel
from vislora.runs import input_spec, load_trained_dual
from vislora.tasks.clip import DEFAULT_TEMPLATES, text_classifier
from vislora.tokenize import OpenClipCaptionTokenizer

logger = logging.getLogger(__name__)

IMAGE_OUTPUT = "image_embeds"
TEXT_OUTPUT = "text_embeds"
TEXT_INPUTS = ("input_ids", "attention_mask")
PROBE_TEXTS = ("a photo", "an image of something small on a table", "a picture")
INT8_REFUSAL = ("INT8 (--int8) is not supported for dual-encoder runs yet (its accuracy report scores a classifier's "
                "logits, not embeddings); export the fp32 towers without --int8")


@dataclass
class DualExportable:
    """A dual-encoder run's adapted model ready to export, with its input transform and task.json."""

    adapted: AdaptedModel
    spec: InputSpec
    base: str
    adapter_dir: Path
    task: dict[str, Any]

    @property
    def model(self) -> DualTowerModel:
        return self.adapted.base_model

    @property
    def classes(self) -> list[str] | None:
        return list(self.task["classes"]) if self.task.get("classes") else None

    def example(self, batch: int = 2, seed: int = 0) -> torch.Tensor:
        """A fixed random batch [batch, 3, size, size] in the model's input range (normalised pixels)."""
        size = self.spec.size
        return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))

    def texts(self) -> list[str]:
        """Probe captions: some of the run's class prompts and captions of other lengths."""
        names, templates = self.task.get("class_names") or [], self.task.get("templates") or ["a photo of a {}."]
        return [t.format(n) for n in names for t in templates][:5] + list(PROBE_TEXTS)

    def tokens(self, texts: list[str] | None = None) -> dict[str, torch.Tensor]:
        """The probe captions tokenized as the model tokenizes (padded to the longest, or to the fixed length)."""
        return self.model.tokenize(texts or self.texts())


def load_dual_exportable(adapter_dir: str | Path, base: str | None = None) -> DualExportable:
    """The adapted dual encoder of a contrastive / few-shot adapter folder, in eval mode; refuses what it cannot
    export (a prepared base model, an adapter that cannot merge) with a message naming it."""
    adapter_dir = Path(adapter_dir)
    task = json.loads((adapter_dir / "task.json").read_text())
    model_section = task["model"]
    trained_on = model_section["spec"] + (f" + {model_section['text']}" if model_section.get("text") else "")
    if base is not None and base != model_section["spec"]:
        raise ExportError(f"{adapter_dir} was trained on {model_section['spec']!r} (task.json) but --base is "
                          f"{base!r}; drop --base: a trained adapter folder names its own base model")
    if task.get("prepared_base"):
        raise ExportError(f"{adapter_dir} is a {task['task']} run trained on a dual encoder prepared in Python "
                          "(task.json prepared_base, e.g. pre-aligned projections), which task.json cannot rebuild: "
                          "exporting a dual-encoder run on a prepared base is not supported. Build that model in "
                          "Python, load the adapter with vislora.load_adapter and export it from there")
    adapted, task = load_trained_dual(adapter_dir)
    for name in adapted.active_adapters:
        config = adapted.configs[name]
        refusal = method_class(config).refusal
        if refusal is not None:
            raise ExportError(f"{adapter_dir}: adapter {name!r} ({config.method}) cannot be merged into the towers, "
                              f"so this dual-encoder run cannot be merged or exported: it is {refusal}. Serve it "
                              "with vislora (vislora serve) or retrain with method lora or dora")
    return DualExportable(adapted, input_spec(task), trained_on, adapter_dir, task)


def embeddings(model: nn.Module, images: torch.Tensor, tokens: dict[str, torch.Tensor]
               ) -> dict[str, torch.Tensor]:
    """{"image": [n, dim], "text": [m, dim]} of a dual encoder (adapted or plain)."""
    with torch.inference_mode():
        image, _ = model(images=images)
        _, text = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    return {"image": image, "text": text}


def max_differences(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: (got[k].float() - expected[k].float()).abs().max().item() for k in expected}


def plain_dual(item: DualExportable, probe: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
               ) -> tuple[DualTowerModel, dict[str, float], dict[str, torch.Tensor]]:
    """(the merged plain dual encoder, max |merged - adapted| per tower, the adapted embeddings of `probe`).

    The AdaptedModel is emptied (see `AdaptedModel.unload`). Raises if the merge changes the embeddings.
    """
    images, tokens = probe or (item.example(batch=2, seed=1), item.tokens())
    reference = embeddings(item.adapted, images, tokens)
    with torch.no_grad():  # not inference mode: merged weights must stay normal tensors for the ONNX exporter
        plain = item.adapted.unload(merge=True).eval()
    difference = max_differences(embeddings(plain, images, tokens), reference)
    worst = max(difference.values())
    if worst > MERGE_ATOL:
        raise ExportError(f"the merged dual encoder's embeddings differ from the adapted one's by {worst:.3g} "
                          f"(> {MERGE_ATOL:g}; image {difference['image']:.3g}, text {difference['text']:.3g}); the "
                          "adapter cannot be merged exactly")
    return plain, difference, reference


# ---------------------------------------------------------------------------------------------- towers
class ImageTower(nn.Module):
    """pixels [batch, 3, H, W] -> L2-normalised image embeddings [batch, dim]."""

    def __init__(self, model: DualTowerModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


class TextTower(nn.Module):
    """input_ids, attention_mask [batch, tokens] -> L2-normalised text embeddings [batch, dim]."""

    def __init__(self, model: DualTowerModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask)


def fixed_length(model: DualTowerModel) -> int | None:
    """The token count every caption is padded to (SigLIP, open_clip), or None when batches pad to the longest."""
    tokenizer = model.tokenizer
    if isinstance(tokenizer, OpenClipCaptionTokenizer) or getattr(tokenizer, "pad_to_max", False):
        return tokenizer.max_length
    return None


@dataclass
class TowerCheck:
    """onnxruntime vs PyTorch per tower: max |diff| per probe (batch size x tokens for text)."""

    max_abs_diff: dict[str, dict[str, float]]

    @property
    def worst(self) -> float:
        return max(v for tower in self.max_abs_diff.values() for v in tower.values())

    def __str__(self) -> str:
        parts = [f"{tower} " + ", ".join(f"{k}: {v:.2e}" for k, v in probes.items())
                 for tower, probes in self.max_abs_diff.items()]
        return (f"onnxruntime vs PyTorch max |diff| {'; '.join(parts)} (tolerance {ONNX_ATOL:g} + "
                f"{ONNX_RTOL:g}·|torch|)")


def export_towers(model: DualTowerModel, image_size: int, image_path: Path, text_path: Path,
                  opset: int = OPSET) -> dict[str, Any]:
    """Write the image and text towers of a plain dual encoder as ONNX (dynamic batch; dynamic token axis unless
    the tokenizer pads to a fixed length). Returns the text tower's sequence settings."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    export_module(ImageTower(model), (torch.zeros(2, 3, image_size, image_size),), [INPUT_NAME], [IMAGE_OUTPUT],
                  ({0: batch},), image_path, opset)
    fixed = fixed_length(model)
    limit = model.tokenizer.max_length
    length = fixed or min(limit, 8)
    ids = torch.ones(2, length, dtype=torch.long)
    mask = torch.ones(2, length, dtype=torch.long)
    axes = {0: batch} if fixed else {0: batch, 1: torch.export.Dim("tokens", min=1, max=limit)}
    export_module(TextTower(model), (ids, mask), list(TEXT_INPUTS), [TEXT_OUTPUT], (axes, axes), text_path, opset)
    return {"tokens": fixed if fixed else "dynamic", "max_length": limit}


def onnx_inputs(path: Path) -> list[str]:
    """The input names an ONNX file kept (an input the graph never reads, e.g. SigLIP's mask, is dropped)."""
    import onnx

    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]


def check_towers(model: DualTowerModel, item: DualExportable, image_path: Path, text_path: Path,
                 seed: int = 0, device: str = "cpu") -> TowerCheck:
    """Run both ONNX towers with onnxruntime (on `device`'s provider) and PyTorch on the same inputs; raise if they
    disagree."""
    image = check_onnx(ImageTower(model), image_path, item.spec.size, seed=seed, output=IMAGE_OUTPUT, device=device)
    differences = {"image": {f"batch {b}": d for b, d in image.max_abs_diff.items()}, "text": {}}
    text = inference_session(text_path, device)
    names = {i.name for i in text.get_inputs()}
    texts = item.texts()
    for probe in (texts[-1:], texts[:3], texts):
        tokens = model.tokenize(probe)
        with torch.inference_mode():
            expected = model.encode_text(tokens["input_ids"], tokens["attention_mask"]).numpy()
        got = text.run([TEXT_OUTPUT], {k: v.numpy() for k, v in tokens.items() if k in names})[0]
        label = f"{len(probe)}x{tokens['input_ids'].shape[1]} tokens"
        differences["text"][label] = compare_outputs(got, expected, text_path, label)
    return TowerCheck(differences)


# ---------------------------------------------------------------------------------------------- export onnx
@dataclass
class DualOnnxExport:
    """What `export_dual_onnx_dir` wrote and measured."""

    out: Path
    image: Path
    text: Path
    check: TowerCheck
    merge_max_abs_diff: dict[str, float]
    classes: list[str] | None
    image_size: int

    def lines(self) -> list[str]:
        merge = ", ".join(f"{k} {v:.2e}" for k, v in self.merge_max_abs_diff.items())
        return [f"max |merged - adapted| {merge}", str(self.check),
                f"wrote {self.image} and {self.text} (+ export.json, tokenizer files) in {self.out}"]


def write_towers(item: DualExportable, plain: DualTowerModel, folder: Path, log: Any = logger.info,
                 device: str = "cpu") -> tuple[TowerCheck, dict[str, Any]]:
    """image.onnx, text.onnx and their check into `folder`; returns (check, the text sequence settings)."""
    folder.mkdir(parents=True, exist_ok=True)
    log(f"exporting the image and text towers to ONNX ({item.spec.size} px, dynamic batch) ...")
    sequence = export_towers(plain, item.spec.size, folder / "image.onnx", folder / "text.onnx")
    check = check_towers(plain, item, folder / "image.onnx", folder / "text.onnx", device=device)
    log(str(check))
    return check, sequence


def save_tokenizer(model: DualTowerModel, folder: Path) -> dict[str, Any]:
    """Write the text tower's tokenizer files into `folder` (Hugging Face tokenizers); returns its settings."""
    tokenizer = model.tokenizer
    fixed = fixed_length(model)
    settings: dict[str, Any] = {"max_length": tokenizer.max_length, "truncation": True,
                                "padding": "max_length" if fixed else "longest", "pad_id": tokenizer.pad_id}
    if isinstance(tokenizer, OpenClipCaptionTokenizer):
        settings.update(kind="open_clip", load="open_clip.get_tokenizer(<model name>) (see base)")
        return settings
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.tokenizer.save_pretrained(folder)
    settings.update(kind="transformers", folder=folder.name,
                    load=f"transformers.AutoTokenizer.from_pretrained('{folder.name}'), called with padding="
                         f"'{settings['padding']}', truncation=True, max_length={tokenizer.max_length}")
    return settings


def logit_figures(model: DualTowerModel) -> dict[str, float | None]:
    bias = model.logit_scale.bias
    return {"logit_scale": float(model.logit_scale().detach()),
            "logit_bias": float(bias.detach()) if bias is not None else None}


def zero_shot_classifier(item: DualExportable, model: DualTowerModel) -> np.ndarray | None:
    """The prompt-ensembled class embeddings [classes, dim] of the run's class names and templates, or None."""
    names = item.task.get("class_names") or []
    if not names:
        return None
    with torch.inference_mode():
        return text_classifier(model, names, item.task.get("templates") or DEFAULT_TEMPLATES).float().numpy()


def write_dual_metadata(folder: Path, item: DualExportable, plain: DualTowerModel, check: TowerCheck,
                        merge_difference: dict[str, float], sequence: dict[str, Any], tokenizer: dict[str, Any],
                        files: dict[str, str], text_onnx: Path | None = None) -> None:
    """export.json (both towers' inputs/outputs, preprocessing, tokenizer, logit scale, measured differences),
    labels.txt and zero_shot_classifier.npy (when the run has class names)."""
    spec = item.spec
    classifier = zero_shot_classifier(item, plain)
    with torch.inference_mode():
        dim = int(plain.encode_image(item.example(1)).shape[-1])
    text_inputs = [{"name": n, "shape": ["batch", "tokens" if sequence["tokens"] == "dynamic" else sequence["tokens"]],
                    "dtype": "int64"} for n in onnx_inputs(text_onnx or folder / files["text"])]
    write_json(folder / "export.json", {
        "kind": "dual_encoder", "task": item.task["task"], "base": item.base,
        "adapter": str(item.adapter_dir.resolve()),
        "image": {"file": files["image"], "input": {
            "name": INPUT_NAME, "shape": ["batch", 3, spec.size, spec.size], "dtype": "float32",
            "preprocessing": {"resize_shorter_side": spec.size, "center_crop": spec.size, **preprocessing(spec)}},
                  "output": {"name": IMAGE_OUTPUT, "shape": ["batch", dim], "l2_normalised": True}},
        "text": {"file": files["text"], "inputs": text_inputs, "tokens": sequence["tokens"],
                 "tokenizer": tokenizer,
                 "output": {"name": TEXT_OUTPUT, "shape": ["batch", dim], "l2_normalised": True}},
        **logit_figures(plain),
        "similarity": "logits = logit_scale * image_embeds @ text_embeds.T (+ logit_bias when not null)",
        "zero_shot": None if classifier is None else {
            "file": "zero_shot_classifier.npy", "labels": "labels.txt", "classes": item.classes,
            "class_names": item.task.get("class_names"), "templates": item.task.get("templates"),
            "logits": "logit_scale * image_embeds @ classifier.T"},
        "merge_max_abs_diff": merge_difference, "onnx_max_abs_diff": check.max_abs_diff,
        "onnx_tolerance": {"atol": ONNX_ATOL, "rtol": ONNX_RTOL}})
    if classifier is not None:
        np.save(folder / "zero_shot_classifier.npy", classifier)
        (folder / "labels.txt").write_text("".join(f"{c}\n" for c in item.classes or item.task["class_names"]))


def export_dual_onnx_dir(adapter_dir: str | Path, out: str | Path, base: str | None = None, int8: bool = False,
                         overwrite: bool = False, log: Any = logger.info, device: str = "cpu") -> DualOnnxExport:
    """OUT/image.onnx, OUT/text.onnx, OUT/tokenizer/, OUT/export.json (+ zero_shot_classifier.npy, labels.txt)."""
    if int8:
        raise ExportError(INT8_REFUSAL)
    item = load_dual_exportable(adapter_dir, base)
    plain, difference, _ = plain_dual(item)
    out = Path(out)
    with staged_dir(out, overwrite) as tmp:
        check, sequence = write_towers(item, plain, tmp, log, device)
        tokenizer = save_tokenizer(plain, tmp / "tokenizer")
        write_dual_metadata(tmp, item, plain, check, difference, sequence, tokenizer,
                            {"image": "image.onnx", "text": "text.onnx"})
    return DualOnnxExport(out, out / "image.onnx", out / "text.onnx", check, difference, item.classes,
                          item.spec.size)
