"""`vislora merge` for dual-encoder runs: the merged dual encoder saved in its libraries' own formats.

The folder loads without vislora:

- Hugging Face CLIP / SigLIP (`HFDualEncoder`): the merged model's `save_pretrained` directory with its tokenizer;
  the trained logit scale (and SigLIP's bias) are written into the model's own `logit_scale` / `logit_bias`.
  `transformers.AutoModel.from_pretrained(OUT)`, then `get_image_features` / `get_text_features`, L2-normalised.
- vislora's `DualEncoder` pairing (an image backbone + a text encoder + new projections):
  `vision/` (timm's `save_for_hf`, loaded with `timm.create_model("local-dir:OUT/vision", pretrained=True)`, or
  the Hugging Face model's `save_pretrained`), `text/` (`save_pretrained` + tokenizer),
  `projections.safetensors` (`vision_proj` [dim, vision width], `text_proj` [dim, text width], `log_logit_scale`)
  and `vislora_merge.json`, which says how each tower is pooled:

      image: timm  forward_head(forward_features(x), pre_logits=True)
             HF    cls: pooler_output (else last_hidden_state[:, 0]); mean: last_hidden_state[:, 1:].mean(1);
                   cls_mean: both, concatenated
      text:  mean: sum(last_hidden_state * mask) / sum(mask);  cls: last_hidden_state[:, 0]
      embedding = normalize(pooled @ proj.T)

open_clip models are refused (open_clip loads checkpoints only for the configurations it registers): export ONNX.
Before the folder is renamed into place it is loaded back the plain way (`reload`) and its embeddings compared
with the adapted model's.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from vislora.dual_encoder import DualEncoder, DualTowerModel, HFDualEncoder
from vislora.errors import ExportError
from vislora.export.common import MERGE_ATOL, MergeResult, preprocessing, staged_dir, write_json
from vislora.export.dual import (
    DualExportable,
    load_dual_exportable,
    logit_figures,
    max_differences,
    plain_dual,
    save_tokenizer,
)

logger = logging.getLogger(__name__)


def merge_dual(adapter_dir: str | Path, out: str | Path, base: str | None = None,
               overwrite: bool = False) -> MergeResult:
    """Merge a contrastive / few-shot run's adapters into its towers and save the dual encoder to `out`."""
    item = load_dual_exportable(adapter_dir, base)
    writer = _writer(item.model)
    probe = (item.example(batch=3, seed=2), item.tokens())
    plain, difference, reference = plain_dual(item, probe)
    out = Path(out)
    with staged_dir(out, overwrite) as tmp:
        layout, load, meta = writer(plain, item, tmp)
        reloaded = reload(tmp, {**meta, "layout": layout})
        reload_difference = max_differences(reloaded(*probe), reference)
        worst = max(reload_difference.values())
        if worst > MERGE_ATOL:
            raise ExportError(f"the saved merged dual encoder reloads with embeddings {worst:.3g} away from the "
                              f"adapted model's (> {MERGE_ATOL:g}; {reload_difference}); nothing was written to {out}")
        spec = item.spec
        write_json(tmp / "vislora_merge.json", {
            "layout": layout, "task": item.task["task"], "base": item.base,
            "adapter": str(item.adapter_dir.resolve()), "classes": item.classes,
            "class_names": item.task.get("class_names"), "templates": item.task.get("templates"),
            "input": {"size": spec.size, **preprocessing(spec)},
            **meta, **logit_figures(plain),
            "similarity": "logits = logit_scale * image_embeds @ text_embeds.T (+ logit_bias when not null), "
                          "embeddings L2-normalised",
            "max_abs_diff": max(difference.values()), "reload_max_abs_diff": worst, "load": load})
    return MergeResult(out, layout, max(difference.values()), worst, load.replace("OUT", str(out)))


def _writer(model: DualTowerModel) -> Any:
    """The function that saves `model`'s family, or an ExportError naming a family that has no plain format."""
    if isinstance(model, HFDualEncoder):
        return _write_hf
    if isinstance(model, DualEncoder):
        from transformers import PreTrainedModel

        vision_ok = hasattr(model.vision, "pretrained_cfg") or isinstance(model.vision, PreTrainedModel)
        if not vision_ok:
            raise ExportError(f"cannot save a merged DualEncoder whose image tower is a {type(model.vision).__name__}: "
                              "merge writes timm and Hugging Face image towers; export ONNX instead "
                              "(vislora export onnx)")
        if not isinstance(model.text, PreTrainedModel):
            raise ExportError(f"cannot save a merged DualEncoder whose text tower is a {type(model.text).__name__}: "
                              "merge writes Hugging Face text towers; export ONNX instead (vislora export onnx)")
        return _write_pair
    raise ExportError(f"cannot save a merged {type(model).__name__} in its library's format: merge writes Hugging "
                      "Face CLIP/SigLIP models and vislora's DualEncoder pairings (timm/HF image tower + HF text "
                      "tower); for open_clip models export ONNX instead (vislora export onnx)")


def _write_hf(model: HFDualEncoder, item: DualExportable, folder: Path) -> tuple[str, str, dict[str, Any]]:
    hf = model.model
    scale = model.logit_scale
    with torch.no_grad():  # the trained temperature into the model's own parameters (capped at 100 as ours is)
        hf.logit_scale.fill_(math.log(float(scale().detach())))
        if scale.bias is not None and getattr(hf, "logit_bias", None) is not None:
            hf.logit_bias.fill_(float(scale.bias.detach()))
    hf.save_pretrained(folder)
    tokenizer = save_tokenizer(model, folder)
    tokenizer.update(folder=".", load="transformers.AutoTokenizer.from_pretrained('OUT')")
    siglip = type(hf).__name__.startswith("Siglip")
    meta = {"architecture": type(hf).__name__, "tokenizer": tokenizer,
            "text_attention_mask": not siglip}
    return (f"transformers:{type(hf).__name__}",
            "transformers.AutoModel.from_pretrained('OUT'): normalize(get_image_features(pixel_values)), "
            "normalize(get_text_features(input_ids" + ("" if siglip else ", attention_mask") + "))", meta)


def _write_pair(model: DualEncoder, item: DualExportable, folder: Path) -> tuple[str, str, dict[str, Any]]:
    from transformers import PreTrainedModel

    vision = model.vision
    if hasattr(vision, "pretrained_cfg"):
        from timm.models import save_for_hf

        spec = item.spec
        data_config = {"input_size": (3, spec.size, spec.size), "mean": spec.mean, "std": spec.std,
                       "interpolation": spec.interpolation, "crop_pct": 1.0}
        save_for_hf(vision, str(folder / "vision"), safe_serialization=True, data_config=data_config)
        vision_meta = {"format": "timm", "folder": "vision",
                       "load": "timm.create_model('local-dir:OUT/vision', pretrained=True)",
                       "pooling": "forward_head(forward_features(x), pre_logits=True)"}
    else:
        assert isinstance(vision, PreTrainedModel)
        vision.save_pretrained(folder / "vision")
        vision_meta = {"format": "transformers", "folder": "vision",
                       "load": "transformers.AutoModel.from_pretrained('OUT/vision')",
                       "pooling": model.vision_pooling}
    model.text.save_pretrained(folder / "text")
    tokenizer = save_tokenizer(model, folder / "text")
    tokenizer["load"] = tokenizer["load"].replace("'text'", "'OUT/text'")
    tensors = {"vision_proj": model.vision_proj.weight, "text_proj": model.text_proj.weight,
               "log_logit_scale": model.logit_scale.log_scale}
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, folder / "projections.safetensors")
    meta = {"vision": vision_meta,
            "text_tower": {"format": "transformers", "folder": "text",
                           "load": "transformers.AutoModel.from_pretrained('OUT/text')",
                           "pooling": model.text_pooling, "tokenizer": tokenizer},
            "projections": {"file": "projections.safetensors", "vision_proj": list(model.vision_proj.weight.shape),
                            "text_proj": list(model.text_proj.weight.shape),
                            "log_logit_scale": "log of the logit scale (the scale is capped at 100)"}}
    return ("dual_encoder", "vision/ and text/ with their libraries (see vislora_merge.json), then "
            "normalize(pool(tower(x)) @ proj.T) with projections.safetensors", meta)


# ---------------------------------------------------------------------------------------------- reload
def reload(folder: Path, meta: dict[str, Any]) -> Any:
    """Load a saved merged dual encoder with plain timm / transformers (what a user without vislora does): a
    function (images, tokens) -> {"image": [n, dim], "text": [m, dim]}, L2-normalised."""
    from transformers import AutoModel

    if meta["layout"].startswith("transformers:"):
        model = AutoModel.from_pretrained(folder).eval()
        use_mask = meta.get("text_attention_mask", True)

        def hf(images: torch.Tensor, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            with torch.inference_mode():
                image = _tensor(model.get_image_features(pixel_values=images))
                extra = {"attention_mask": tokens["attention_mask"]} if use_mask else {}
                text = _tensor(model.get_text_features(input_ids=tokens["input_ids"], **extra))
            return {"image": F.normalize(image.float(), dim=-1), "text": F.normalize(text.float(), dim=-1)}

        return hf
    vision_meta, text_meta = meta["vision"], meta["text_tower"]
    if vision_meta["format"] == "timm":
        import timm

        vision: nn.Module = timm.create_model(f"local-dir:{folder / 'vision'}", pretrained=True).eval()
    else:
        vision = AutoModel.from_pretrained(folder / "vision").eval()
    text = AutoModel.from_pretrained(folder / "text").eval()
    projections = load_file(folder / "projections.safetensors")

    def pair(images: torch.Tensor, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            if vision_meta["format"] == "timm":
                pooled = vision.forward_head(vision.forward_features(images), pre_logits=True)
            else:
                out = vision(pixel_values=images)
                hidden = out.last_hidden_state
                cls = out.pooler_output if getattr(out, "pooler_output", None) is not None else hidden[:, 0]
                mean = hidden[:, 1:].mean(dim=1)
                pooled = {"cls": cls, "mean": mean, "cls_mean": torch.cat([cls, mean], -1)}[vision_meta["pooling"]]
            mask = tokens["attention_mask"]
            hidden = text(input_ids=tokens["input_ids"], attention_mask=mask).last_hidden_state
            if text_meta["pooling"] == "cls":
                sentence = hidden[:, 0]
            else:
                weights = mask.unsqueeze(-1).to(hidden.dtype)
                sentence = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return {"image": F.normalize((pooled @ projections["vision_proj"].T).float(), dim=-1),
                    "text": F.normalize((sentence @ projections["text_proj"].T).float(), dim=-1)}

    return pair


def _tensor(out: Any) -> torch.Tensor:
    return out if torch.is_tensor(out) else out.pooler_output


def read_merge_json(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "vislora_merge.json").read_text())
