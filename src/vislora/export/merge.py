"""Merge an adapter into its base weights and save the result in the base library's own format.

The folder loads with plain timm or transformers calls, no vislora needed:

- timm model: `model.safetensors` + `config.json` written by timm's `save_for_hf`;
  `timm.create_model("local-dir:OUT", pretrained=True)`.
- DINOv2 classifier (the bundled asset, `hf:` DINOv2): a `Dinov2ForImageClassification` directory
  (`save_pretrained`, with `id2label` and an image processor); `AutoModelForImageClassification.from_pretrained(OUT)`.
  Its head reads [CLS, mean of patch tokens]; a CLS-only (or mean-only) head becomes the same linear map
  with zero weights on the other half, so the logits are unchanged.
- other Hugging Face classifiers: the backbone's `save_pretrained` directory plus `head.safetensors`
  (`weight` [classes, width], `bias` [classes]) and the pooling in `vislora_merge.json`.
- a bare adapter over a Hugging Face model: the merged model's `save_pretrained` directory.
- a captioning or VQA run (generative VLM): a transformers LLaVA folder with tokenizer and processor
  (`vislora.export.vlm_merge`).

Before the folder is renamed into place it is loaded back the plain way and its outputs compared with the
adapted model's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vislora.errors import ExportError
from vislora.export.common import (
    MERGE_ATOL,
    Exportable,
    MergeResult,
    TensorOutput,
    is_dual,
    load_exportable,
    plain_merged,
    preprocessing,
    staged_dir,
    tensor_output,
    write_json,
)
from vislora.export.dual_merge import merge_dual
from vislora.export.vlm_merge import is_generative, merge_vlm
from vislora.tasks.multilabel import exported_task

logger = logging.getLogger(__name__)

# fp32: W + scale * B @ A changes the summation order of every adapted matmul; 1e-4 is far below any
# adapter's effect and far above the rounding seen (~1e-6 on DINOv2-S logits).


def merge_adapter(adapter_dir: str | Path, out: str | Path, base: str | None = None,
                  overwrite: bool = False) -> MergeResult:
    """Merge the adapter of `adapter_dir` into its base model and save it to `out` (see the module docstring;
    contrastive and few-shot runs: `vislora.export.dual_merge`)."""
    if is_dual(adapter_dir):
        return merge_dual(adapter_dir, out, base, overwrite)
    if is_generative(adapter_dir):
        if base is not None:
            raise ExportError(f"{adapter_dir} is a generative VLM run: its task.json names its base model "
                              f"({base!r} was given); drop --base")
        return merge_vlm(adapter_dir, out, overwrite)
    item = load_exportable(adapter_dir, base)
    plain, difference = plain_merged(item)
    if difference > MERGE_ATOL:
        raise ExportError(f"the merged model differs from the adapted one by {difference:.3g} (> {MERGE_ATOL:g}); "
                          "the adapter cannot be merged exactly (is it a method that is not linear in W?)")
    out = Path(out)
    probe = item.example(batch=2, seed=2)
    with torch.inference_mode():
        expected = plain(probe)
    with staged_dir(out, overwrite) as tmp:
        layout, load = _write(plain.model, item, tmp)
        reloaded = _reload(layout, tmp, _pooling(plain.model))
        with torch.inference_mode():
            reload_difference = (tensor_output(reloaded(probe)) - expected).abs().max().item()
        if reload_difference > MERGE_ATOL:
            raise ExportError(f"the saved merged model reloads with outputs {reload_difference:.3g} away from the "
                              f"merged model (> {MERGE_ATOL:g}); nothing was written to {out}")
        write_json(tmp / "vislora_merge.json", {
            "layout": layout, "base": item.base, "adapter": str(item.adapter_dir.resolve()),
            "classes": item.classes, "input": {"size": item.spec.size, **preprocessing(item.spec)},
            "pooling": _pooling(plain.model), "max_abs_diff": difference, "reload_max_abs_diff": reload_difference,
            "load": load, "task": exported_task(item.task)})
    return MergeResult(out, layout, difference, reload_difference, load.replace("OUT", str(out)))


def _pooling(model: nn.Module) -> str | None:
    return getattr(model, "pooling", None)


def _write(model: nn.Module, item: Exportable, folder: Path) -> tuple[str, str]:
    """Save `model` into `folder`; returns (layout name, how to load it)."""
    from transformers import PreTrainedModel

    backbone = getattr(model, "backbone", None)
    if hasattr(model, "pretrained_cfg") or hasattr(backbone, "pretrained_cfg"):
        return _write_timm(model, item, folder)
    if isinstance(model, PreTrainedModel):
        model.save_pretrained(folder)
        return "transformers", "transformers.AutoModel.from_pretrained('OUT')"
    if isinstance(backbone, PreTrainedModel):
        if backbone.config.model_type == "dinov2":
            return _write_dinov2_classifier(model, item, folder)
        backbone.save_pretrained(folder)
        save_file({"weight": model.head.weight.contiguous(), "bias": model.head.bias.contiguous()},
                  folder / "head.safetensors")
        return "transformers+head", ("transformers.AutoModel.from_pretrained('OUT') for the backbone; the head is "
                                     "head.safetensors on the pooled features (pooling in vislora_merge.json)")
    raise ExportError(f"cannot save a merged {type(backbone or model).__name__} in its library's format: merge "
                      "supports timm and Hugging Face models (open_clip: export ONNX instead)")


def _write_timm(model: nn.Module, item: Exportable, folder: Path) -> tuple[str, str]:
    from timm.models import save_for_hf

    if hasattr(model, "backbone"):  # a timm backbone + vislora's linear head: give the model that head
        head = model.head
        model = model.backbone
        model.reset_classifier(head.out_features)
        with torch.no_grad():
            model.get_classifier().weight.copy_(head.weight)
            model.get_classifier().bias.copy_(head.bias)
    spec = item.spec
    data_config = {"input_size": (3, spec.size, spec.size), "mean": spec.mean, "std": spec.std,
                   "interpolation": spec.interpolation, "crop_pct": 1.0}
    extra = {"label_names": item.classes} if item.classes else None
    save_for_hf(model, str(folder), model_config=extra, safe_serialization=True, data_config=data_config)
    return "timm", "timm.create_model('local-dir:OUT', pretrained=True)"


def _write_dinov2_classifier(model: nn.Module, item: Exportable, folder: Path) -> tuple[str, str]:
    """A `Dinov2ForImageClassification` equal to LinearProbeClassifier(Dinov2Model, pooling)."""
    from PIL import Image
    from transformers import BitImageProcessor, Dinov2ForImageClassification

    classes = item.classes or [str(i) for i in range(model.head.out_features)]
    config = model.backbone.config.__class__.from_dict({
        **model.backbone.config.to_dict(), "num_labels": len(classes),
        "id2label": dict(enumerate(classes)), "label2id": {c: i for i, c in enumerate(classes)}})
    classifier = Dinov2ForImageClassification(config).eval()
    classifier.dinov2.load_state_dict(model.backbone.state_dict())
    width = config.hidden_size
    weight = torch.zeros(len(classes), 2 * width)  # [classes, cls | mean of patch tokens]
    halves = {"cls": slice(0, width), "mean": slice(width, 2 * width), "cls_mean": slice(0, 2 * width)}
    weight[:, halves[model.pooling]] = model.head.weight
    with torch.no_grad():
        classifier.classifier.weight.copy_(weight)
        classifier.classifier.bias.copy_(model.head.bias)
    classifier.save_pretrained(folder)
    spec = item.spec
    BitImageProcessor(size={"shortest_edge": spec.size}, crop_size={"height": spec.size, "width": spec.size},
                      resample=Image.Resampling.BICUBIC, image_mean=list(spec.mean), image_std=list(spec.std),
                      do_convert_rgb=True).save_pretrained(folder)
    return ("transformers:Dinov2ForImageClassification",
            "transformers.AutoModelForImageClassification.from_pretrained('OUT')")


def _reload(layout: str, folder: Path, pooling: str | None) -> nn.Module:
    """Load a saved merged folder back with plain timm/transformers (what a user without vislora does)."""
    if layout == "timm":
        import timm

        return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    if layout.startswith("transformers:"):
        from transformers import AutoModelForImageClassification

        return AutoModelForImageClassification.from_pretrained(folder).eval()
    from transformers import AutoModel

    backbone = AutoModel.from_pretrained(folder).eval()
    if layout == "transformers":
        return TensorOutput(backbone, hf_backbone=True)
    from vislora.tasks.classification import LinearProbeClassifier  # the pooling code is the recipe users copy

    head: dict[str, Any] = load_file(folder / "head.safetensors")
    pooling = pooling or "cls"
    model = LinearProbeClassifier(backbone, head["weight"].shape[1] // (2 if pooling == "cls_mean" else 1),
                                  head["weight"].shape[0], pooling)
    model.head.load_state_dict(head)
    return model.eval()
