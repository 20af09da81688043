"""`vislora report` on a dual-encoder run (task.kind contrastive / few_shot): base vs adapted on held-out data.

The run's dual encoder is opened with `vislora.runs.load_trained_dual`; the same held-out images (and their captions)
go through it twice, without its adapters (*base*: the dual encoder as built before training, its projections and
logit scale as they were) and with them (*adapted*), and `vislora.evaluate.dual.score_rows` scores both:

- zero-shot accuracy: the prompt classifier built from the run's class names and templates (labelled data);
- retrieval recall@1/5/10, image -> text and text -> image, and the contrastive loss (captioned data);
- embedding drift: cosine similarity between the base and adapted image embeddings of each image
  (`vislora.evaluate.drift`), the embeddings an index built on the base model stores.

`write_dual_report` writes report.html, MODEL_CARD.md, evaluation.json, diagnostics.json and the PNGs (training,
drift, rank utilisation, parameters) into RUN/report/, reusing the classifier report's sections where they apply.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import torch
import yaml

from vislora.data.datasets import collate, open_dataset
from vislora.diagnostics import Diagnosis, diagnose
from vislora.errors import VisloraError
from vislora.evaluate.drift import Drift, embedding_drift
from vislora.evaluate.dual import embed_rows, score_rows
from vislora.io import atomic_write_text
from vislora.model import AdaptedModel
from vislora.parameters import ParameterReport, parameter_report
from vislora.report import plots
from vislora.report.card import base_model_id, data_markdown, details_markdown, health_markdown, md_table, method_name
from vislora.report.html import cards_html, head, html_table, image_tag, page
from vislora.report.run import DataSummary, ReportFiles, RunInfo, training_data
from vislora.runs import input_spec, load_trained_dual

Progress = Callable[[Iterable, int], Iterable]

# (key in score_rows' figures, label, higher is better)
FIGURES = (("accuracy", "zero-shot accuracy (prompt classifier)", True),
           ("i2t_r@1", "image -> text recall@1", True), ("i2t_r@5", "image -> text recall@5", True),
           ("i2t_r@10", "image -> text recall@10", True), ("t2i_r@1", "text -> image recall@1", True),
           ("t2i_r@5", "text -> image recall@5", True), ("t2i_r@10", "text -> image recall@10", True),
           ("recall@1", "mean recall@1", True), ("contrastive_loss", "contrastive loss", False))
BASELINE = "the dual encoder without its adapters (projections and logit scale as built, before training)"


@dataclass
class DualComparison:
    """Base vs adapted figures of a dual encoder on the same held-out images."""

    data: str
    n: int
    skipped: int
    base: dict[str, float]
    adapted: dict[str, float]
    drift: Drift | None
    labelled: bool
    captioned: bool
    baseline: str = BASELINE
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[tuple[str, float, float, float]]:
        """(label, base, adapted, change) for every figure measured."""
        return [(label, self.base[key], self.adapted[key], self.adapted[key] - self.base[key])
                for key, label, _ in FIGURES if key in self.adapted and key in self.base]

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data, "n": self.n, "skipped": self.skipped, "baseline": self.baseline,
                "base": self.base, "adapted": self.adapted,
                "change": {k: self.adapted[k] - self.base[k] for k in self.adapted if k in self.base},
                "drift": asdict(self.drift) if self.drift is not None else None, "notes": self.notes}


def compare_dual(model: AdaptedModel, task: dict[str, Any], source: str, batch_size: int = 64,
                 limit: int | None = None, label_column: str | None = "label", path_column: str = "path",
                 seed: int = 0, progress: Progress | None = None) -> DualComparison:
    """Embed `source` with and without the adapters and score both (see the module docstring)."""
    classes = task.get("classes") or None
    dataset = open_dataset(source, label_column=label_column if classes else None, path_column=path_column,
                           classes=classes)
    if limit:
        dataset = dataset.subset(limit, seed=seed)
    dataset.read_as(input_spec(task), seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate,
                                         generator=torch.Generator())
    tokenize = model.base_model.tokenize
    names, templates = task.get("class_names") or [], task.get("templates") or []

    def batches() -> Iterable:
        return progress(loader, len(loader)) if progress is not None else loader

    adapted_rows, skipped = embed_rows(model, batches(), tokenize)
    if not adapted_rows:
        raise VisloraError(f"no image of {source} could be read ({len(skipped)} skipped); give held-out images the "
                           "run can open (--data)")
    adapted = score_rows(adapted_rows, model.base_model, names, templates)
    with model.disabled():
        base_rows, _ = embed_rows(model, batches(), tokenize)
        base = score_rows(base_rows, model.base_model, names, templates)
    drift = embedding_drift(torch.stack([r["image"] for r in base_rows]),
                            torch.stack([r["image"] for r in adapted_rows]))
    labelled = "accuracy" in adapted
    captioned = "text" in adapted_rows[0]
    notes = []
    if not labelled:
        notes.append("No zero-shot accuracy: the evaluation data has no labels or the run has no class names.")
    if not captioned:
        notes.append("No retrieval recall: the evaluation data has no captions (recall@K needs image-caption "
                     "pairs, e.g. a manifest with a caption column).")
    return DualComparison(data=dataset.name, n=len(adapted_rows), skipped=len(set(skipped)), base=base,
                          adapted=adapted, drift=drift, labelled=labelled, captioned=captioned, notes=notes)


def write_dual_report(info: RunInfo, data: str | None = None, limit: int | None = None, out: str | Path | None = None,
                      batch_size: int = 64, progress: Progress | None = None) -> Any:
    """The report of a contrastive / few-shot run (`vislora.report.write_report` sends them here)."""
    if info.task.get("prepared_base"):
        raise VisloraError(f"{info.adapter_dir} is a {info.task['task']} run trained on a dual encoder prepared in "
                           "Python (task.json prepared_base), which task.json cannot rebuild: vislora report does "
                           "not support dual-encoder runs on a prepared base; evaluate it in Python with "
                           "vislora.evaluate.dual.score_rows on the model you built")
    model, task = load_trained_dual(info.adapter_dir)
    settings = info.config.get("data", {})
    source = data or settings.get("val")
    comparison = None
    if source:
        comparison = compare_dual(model, task, source, batch_size,
                                  limit or (None if data else settings.get("val_limit")),
                                  settings.get("label_column", "label"), settings.get("path_column", "path"),
                                  info.config.get("run", {}).get("seed", 0), progress)
    summary = training_data(info)
    folder = Path(out) if out is not None else info.run_dir / "report"
    diagnosis = diagnose(model, "default")
    params = parameter_report(model)
    config = model.configs["default"].model_dump(mode="json")
    metrics = [r for r in info.metrics if r.get("split") != "val" or "accuracy" in r]  # caption-only: no accuracy
    images = {"training": plots.training_curves(metrics, folder / "training.png"),
              "telemetry": plots.telemetry(info.metrics, folder / "telemetry.png"),
              "rank_utilisation": plots.rank_heatmap(diagnosis, folder / "rank_utilisation.png")}
    by_module: Counter = Counter()
    counts = model.parameter_counts("default")
    for target in model.plans["default"].targets:
        by_module[target.path.rpartition(".")[2] + (f"[{','.join(target.slices)}]" if target.slices else "")] += (
            counts[target.path])
    gain = (comparison.adapted["accuracy"] - comparison.base["accuracy"]
            if comparison is not None and comparison.labelled else None)
    images["parameters"] = plots.parameter_efficiency(params.base, params.trainable, sum(counts.values()),
                                                      dict(by_module), folder / "parameters.png", gain)
    evaluation = None
    if comparison is not None:
        if comparison.drift is not None:
            images["drift"] = plots.drift_histogram(comparison.drift, folder / "drift.png")
        evaluation = folder / "evaluation.json"
        atomic_write_text(evaluation, json.dumps(comparison.to_dict(), indent=2))
    drawn = {k: v for k, v in images.items() if v is not None}
    atomic_write_text(folder / "diagnostics.json", json.dumps(diagnosis.to_dict(), indent=2))
    card = folder / "MODEL_CARD.md"
    atomic_write_text(card, dual_model_card(info, config, diagnosis, comparison, params, summary))
    links = [p.name for p in (card, folder / "diagnostics.json", evaluation) if p is not None]
    html = folder / "report.html"
    atomic_write_text(html, render_dual_html(info, config, diagnosis, comparison, params, summary, drawn, links))
    return ReportFiles(folder=folder, html=html, model_card=card, diagnostics=folder / "diagnostics.json",
                       evaluation=evaluation, plots=list(drawn.values()))


def _models(info: RunInfo) -> str:
    model = info.task["model"]
    return model["spec"] + (f" + {model['text']}" if model.get("text") else "")


# ---------------------------------------------------------------------------------------------- HTML
def render_dual_html(info: RunInfo, adapter_config: dict[str, Any], diagnosis: Diagnosis,
                     comparison: DualComparison | None, params: ParameterReport | None, data: DataSummary | None,
                     images: dict[str, Path], links: Sequence[str]) -> str:
    """The report page of a dual-encoder run (the classifier page's sections where they apply)."""
    body = head(info, adapter_config, f"{_models(info)} ({info.task['task']})", links,
                _cards(diagnosis, comparison, params), images)
    if comparison is not None:
        body += ["<h2>Before / after</h2>",
                 f"<p>On {escape(comparison.data)}: {comparison.n:,} images ({comparison.skipped} skipped). Base = "
                 f"{escape(comparison.baseline)}.</p>",
                 html_table(("metric", "base", "adapted", "change"),
                        [(label, f"{b:.4f}", f"{a:.4f}", f"{c:+.4f}") for label, b, a, c in comparison.rows()])]
        body += [f"<p class='muted'>{escape(note)}</p>" for note in comparison.notes]
        if comparison.drift is not None:
            d = comparison.drift
            body += ["<h3>Embedding drift</h3>",
                     f"<p>Cosine similarity between the base and adapted image embeddings (after the projection, "
                     f"L2-normalised) of each image: mean {d.mean:.4f}, median {d.median:.4f}, p5 {d.p5:.4f}, "
                     f"min {d.min:.4f}.</p>", image_tag(images, "drift")]
    else:
        body.append("<h2>Before / after</h2><p>No held-out data: run <code>vislora report RUN --data DIR</code>.</p>")
    return page(info, body, diagnosis, images, params, data)


def _cards(diagnosis: Diagnosis, comparison: DualComparison | None, params: ParameterReport | None) -> str:
    cards = []
    if comparison is not None:
        base, adapted = comparison.base, comparison.adapted
        if comparison.labelled:
            gain = 100 * (adapted["accuracy"] - base["accuracy"])
            cards.append(("zero-shot accuracy", f"{adapted['accuracy']:.3f}",
                          f"base {base['accuracy']:.3f} ({gain:+.1f} points)"))
        if comparison.captioned:
            cards.append(("recall@1 (mean of both ways)", f"{adapted['recall@1']:.3f}", f"base {base['recall@1']:.3f}"))
        if comparison.drift is not None:
            cards.append(("embedding drift", f"{comparison.drift.mean:.3f}", "mean cosine similarity"))
    return cards_html(cards, diagnosis, params)


# ---------------------------------------------------------------------------------------------- model card
def dual_model_card(info: RunInfo, adapter_config: dict[str, Any], diagnosis: Diagnosis,
                    comparison: DualComparison | None, params: ParameterReport | None,
                    data: DataSummary | None) -> str:
    """MODEL_CARD.md of a dual-encoder run (Hugging Face style front matter with the measured results)."""
    kind = info.task["task"]
    what = ("contrastive image-text fine-tuning" if kind == "contrastive" else
            "few-shot classification through prompts (CLIP-LoRA)")
    sections = [
        "---\n" + yaml.safe_dump(_front_matter(info, adapter_config, comparison), sort_keys=False) + "---",
        f"# {info.name}: {method_name(adapter_config)} adapter for the dual encoder {_models(info)}",
        f"Low-rank adapters on the image and text towers of `{_models(info)}`, trained with vislora for {what}. "
        "They load with vislora (`vislora.runs.load_trained_dual`) and with Hugging Face PEFT (PEFT directory "
        "layout, safetensors).",
        details_markdown(info, adapter_config, params),
        data_markdown(data) if data is not None and any(data.class_counts.values()) else _caption_data(data),
        _evaluation(comparison),
        health_markdown(diagnosis),
        _intended_use(info),
        _limitations(comparison, data),
        _usage(info),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def _front_matter(info: RunInfo, adapter_config: dict[str, Any],
                  comparison: DualComparison | None) -> dict[str, Any]:
    front: dict[str, Any] = {"library_name": "peft"}
    base = base_model_id(info.task["model"]["spec"])
    if base:
        front["base_model"] = base
    front.update({"pipeline_tag": "zero-shot-image-classification",
                  "tags": list(dict.fromkeys(["vislora", "lora", adapter_config.get("method", "lora"),
                                              info.task["task"].replace("_", "-"), "zero-shot-image-classification",
                                              "image-text-retrieval"])),
                  "metrics": ["accuracy", "recall"]})
    if comparison is not None:
        metrics = []
        if comparison.labelled:
            metrics += [{"type": "accuracy", "value": round(comparison.adapted["accuracy"], 4),
                         "name": "zero-shot accuracy (adapted)"},
                        {"type": "accuracy", "value": round(comparison.base["accuracy"], 4),
                         "name": "zero-shot accuracy (base)"}]
        if comparison.captioned:
            metrics += [{"type": "recall", "value": round(comparison.adapted[key], 4), "name": f"{label} (adapted)"}
                        for key, label in (("i2t_r@1", "image->text recall@1"), ("t2i_r@1", "text->image recall@1"),
                                           ("i2t_r@5", "image->text recall@5"), ("t2i_r@5", "text->image recall@5"))]
        if metrics:
            front["model-index"] = [{"name": info.name, "results": [{
                "task": {"type": "zero-shot-image-classification", "name": "Zero-shot image classification and "
                                                                            "image-text retrieval"},
                "dataset": {"name": comparison.data, "type": comparison.data.split(" ")[0]},
                "metrics": metrics}]}]
    return front


def _caption_data(data: DataSummary | None) -> str:
    if data is None:
        return "## Training data\n\nThe training data could not be opened when this card was written."
    return f"## Training data\n\n`{data.source}`: {data.n_images:,} images (image-caption pairs, no class labels)."


def _evaluation(comparison: DualComparison | None) -> str:
    if comparison is None:
        return "## Evaluation\n\nNo held-out data was evaluated (`vislora report RUN --data DIR` adds it)."
    text = (f"## Evaluation\n\nOn `{comparison.data}` ({comparison.n:,} images). *Base* is {comparison.baseline}; "
            "*adapted* is the model with its adapters. Zero-shot accuracy is the prompt classifier's (the run's "
            "class names in its templates, prompt-ensembled); recall@K counts a query as found when its own "
            "caption (image) is among the K nearest.\n\n")
    text += md_table(("metric", "base", "adapted", "change"),
                     [(label, f"{b:.4f}", f"{a:.4f}", f"{c:+.4f}") for label, b, a, c in comparison.rows()])
    if comparison.drift is not None:
        d = comparison.drift
        text += (f"\n\nEmbedding drift: cosine similarity between the base and adapted image embeddings of the same "
                 f"image has mean {d.mean:.4f}, 5th percentile {d.p5:.4f}, minimum {d.min:.4f}.")
    for note in comparison.notes:
        text += f"\n\n{note}"
    return text


def _intended_use(info: RunInfo) -> str:
    names = info.task.get("class_names") or []
    listed = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
    classes = f" Its prompt classifier covers {len(names)} classes: {listed}." if names else ""
    return ("## Intended use\n\nEmbedding images and captions into one space: zero-shot classification with text "
            f"prompts, and image-text retrieval.{classes} Images are resized and normalised as `task.json` records; "
            "captions are tokenized by the text tower's tokenizer. Use it as a research and engineering baseline; "
            "decisions about people need their own evaluation.")


def _limitations(comparison: DualComparison | None, data: DataSummary | None) -> str:
    items = []
    if comparison is not None:
        n = comparison.n
        if comparison.labelled:
            accuracy = comparison.adapted["accuracy"]
            margin = 1.96 * (accuracy * (1 - accuracy) / n) ** 0.5  # normal approximation of a binomial proportion
            items.append(f"Evaluated on {n:,} images only: the zero-shot accuracy carries a sampling error of about "
                         f"±{100 * margin:.1f} points (95%).")
        if comparison.captioned:
            items.append(f"Recall@K is measured among {n:,} captions: with more candidates it is lower.")
        worse = [label for label, _, _, change in comparison.rows() if _is_worse(label, change)]
        if worse:
            items.append("Worse than the base model on: " + ", ".join(worse) + ".")
        if comparison.drift is not None and comparison.drift.mean < 0.99:
            items.append(f"The adapters move the image embeddings (mean cosine similarity "
                         f"{comparison.drift.mean:.3f}): indices or caches built from the base model's embeddings "
                         "must be rebuilt.")
        items += comparison.notes
    else:
        items.append("No held-out evaluation: zero-shot accuracy and retrieval recall are unknown.")
    if data is not None and data.missing_provenance:
        items.append(f"The training data lacks {', '.join(data.missing_provenance)} for some or all images: its "
                     "licensing and its coverage of places and times cannot be checked from the data.")
    return "## Limitations\n\n" + "\n".join(f"- {item}" for item in items)


def _is_worse(label: str, change: float) -> bool:
    higher_is_better = next(better for _, name, better in FIGURES if name == label)
    return (change < 0) if higher_is_better else (change > 0 and not math.isclose(change, 0.0))


def _usage(info: RunInfo) -> str:
    return ("## How to use\n\n```python\nfrom vislora.runs import load_trained_dual\n\n"
            f"model, task = load_trained_dual(\"{info.adapter_dir}\")  # dual encoder rebuilt, adapters loaded\n"
            "image_emb, _ = model(images=images)  # images normalised as task['input'] says\n"
            "_, text_emb = model(**model.base_model.tokenize([\"a photo of a cat\"]))\n"
            "logits = model.base_model.logit_scale() * image_emb @ text_emb.T\n```\n\n"
            "`vislora merge` and `vislora export onnx|triton` ship it without vislora (docs/export.md).")
