"""MODEL_CARD.md in Hugging Face model-card style: YAML front matter (model-index with the measured results),
then model details, training data with metadata coverage, before/after evaluation, per-group regressions,
adapter health, intended use and limitations. Every figure comes from the run's files and measurements."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from vislora.diagnostics import Diagnosis
from vislora.evaluate import Comparison, points
from vislora.parameters import ParameterReport
from vislora.report.run import DataSummary, RunInfo

ASSET_IDS = {"asset:dinov2-small": "facebook/dinov2-small"}
METHOD_NAMES = {"lora": "LoRA", "dora": "DoRA", "adalora": "AdaLoRA", "molora": "MoLoRA"}


def method_name(adapter_config: dict[str, Any]) -> str:
    """LoRA, DoRA, ... as the papers write them (rsLoRA and PiSSA noted)."""
    method = adapter_config.get("method", "lora")
    name = METHOD_NAMES.get(method, method)
    if adapter_config.get("use_rslora"):
        name = f"{name} (rsLoRA scaling)"
    return f"{name}, PiSSA init" if adapter_config.get("init") == "pissa" else name


def base_model_id(spec: str) -> str | None:
    """The hub id of a model spec (`timm/<name>` for timm), or None for a local directory."""
    if spec in ASSET_IDS:
        return ASSET_IDS[spec]
    family, _, name = spec.partition(":") if ":" in spec else ("timm", "", spec)
    if family == "hf":
        return None if Path(name).exists() else name
    return f"timm/{name}" if family == "timm" else name


def model_card(info: RunInfo, adapter_config: dict[str, Any], diagnosis: Diagnosis, comparison: Comparison | None,
               params: ParameterReport | None, data: DataSummary | None, evaluation: str | None = None,
               clinical: str | None = None) -> str:
    """The whole MODEL_CARD.md text; `evaluation` replaces the classification evaluation section (another task's,
    e.g. report/multilabel.py); `clinical` is the clinical-metrics section (report/clinical.py), after it."""
    spec = info.task["model"]["spec"]
    n = len(info.task["classes"])
    job = f"multi-label tagging with {n} attributes" if info.task.get("task") == "multilabel" else (
        f"{n}-class image classification")
    sections = [
        "---\n" + yaml.safe_dump(_front_matter(info, adapter_config, comparison), sort_keys=False) + "---",
        f"# {info.name}: {method_name(adapter_config)} adapter for {spec}",
        f"A low-rank adapter plus a classification head over `{spec}`, trained with vislora for "
        f"{job}. It loads with vislora and with Hugging Face PEFT "
        "(PEFT directory layout, safetensors).",
        details_markdown(info, adapter_config, params),
        data_markdown(data),
        evaluation or _evaluation(comparison),
        clinical,
        health_markdown(diagnosis),
        _intended_use(info, data),
        _limitations(info, comparison, data),
        _usage(info),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def _front_matter(info: RunInfo, adapter_config: dict[str, Any], comparison: Comparison | None) -> dict[str, Any]:
    front: dict[str, Any] = {"library_name": "peft"}
    base = base_model_id(info.task["model"]["spec"])
    if base:
        front["base_model"] = base
    front.update({"pipeline_tag": "image-classification",
                  "tags": list(dict.fromkeys(["vislora", "lora", adapter_config.get("method", "lora"),
                                              "image-classification"])),  # method "lora" is named once
                  "metrics": ["accuracy", "f1"] + (["roc_auc"] if comparison and comparison.clinical else [])})
    if comparison is not None:
        metrics = [{"type": "accuracy", "value": round(comparison.adapted.accuracy, 4), "name": "accuracy (adapted)"},
                   {"type": "accuracy", "value": round(comparison.base.accuracy, 4), "name": "accuracy (base)"},
                   {"type": "f1", "value": round(comparison.adapted.macro_f1, 4), "name": "macro-F1 (adapted)"}]
        if comparison.clinical is not None:
            metrics.append({"type": "roc_auc", "value": round(comparison.clinical.adapted.macro_auroc.value, 4),
                            "name": "macro AUROC, one-vs-rest (adapted)"})
        front["model-index"] = [{"name": info.name, "results": [{
            "task": {"type": "image-classification", "name": "Image Classification"},
            "dataset": {"name": comparison.data, "type": comparison.data.split(" ")[0]},
            "metrics": metrics}]}]
    return front


def details_markdown(info: RunInfo, adapter_config: dict[str, Any], params: ParameterReport | None) -> str:
    rows = [("base model", f"`{info.task['model']['spec']}`"),
            ("method", method_name(adapter_config)),
            ("rank / alpha", f"{adapter_config.get('rank')} / {adapter_config.get('alpha')}"),
            ("targets", ", ".join(f"`{t}`" for t in adapter_config.get("targets", []))),
            ("trained in full", ", ".join(f"`{m}`" for m in adapter_config.get("modules_to_save", [])) or "-"),
            ("input", f"{info.task['input'].get('size')} px"),
            ("training steps", str(info.task.get("step", "-")))]
    if params is not None:
        rows.append(("trainable parameters", f"{params.trainable:,} ({100 * params.trainable / params.base:.2f}% of "
                                             f"the {params.base:,} that full fine-tuning trains)"))
    return "## Model details\n\n" + md_table(("", ""), rows)


def data_markdown(data: DataSummary | None) -> str:
    if data is None:
        return "## Training data\n\nThe training data could not be opened when this card was written."
    balance = [n for n in data.class_counts.values() if n]
    text = (f"## Training data\n\n`{data.source}`: {data.n_images:,} images, {len(data.class_counts)} classes "
            f"(largest/smallest class {max(balance) / min(balance):.2f}).\n\n**Metadata coverage** "
            "(share of images with a non-empty value):\n\n")
    text += md_table(("field", "coverage"), [(k, f"{v:.1f}%") for k, v in data.coverage.items()])
    if data.missing_provenance:
        text += (f"\n\nProvenance is incomplete: some or all images lack "
                 f"{', '.join(data.missing_provenance)}.")
    return text


def _evaluation(comparison: Comparison | None) -> str:
    if comparison is None:
        return "## Evaluation\n\nNo held-out data was evaluated (`vislora report RUN --data DIR` adds it)."
    base, adapted = comparison.base, comparison.adapted
    rows = [(name, f"{getattr(base, key):.4f}", f"{getattr(adapted, key):.4f}",
             f"{getattr(adapted, key) - getattr(base, key):+.4f}")
            for name, key in (("accuracy", "accuracy"), ("top-5 accuracy", "top5"), ("macro-F1", "macro_f1"),
                              ("expected calibration error", "ece"), ("cross-entropy loss", "loss"))]
    text = (f"## Evaluation\n\nOn `{comparison.data}`. *Base* is {comparison.baseline}; *adapted* is the model with "
            "the adapter.\n\n" + md_table(("metric", "base", "adapted", "change"), rows))
    if comparison.drift is not None:
        d = comparison.drift
        text += (f"\n\nEmbedding drift: cosine similarity between base and adapted embeddings of the same image has "
                 f"mean {d.mean:.4f}, 5th percentile {d.p5:.4f}, minimum {d.min:.4f}.")
    text += "\n\n### Per-group results and regressions\n\n"
    for column, deltas in comparison.per_group.items():
        text += f"**{column}**\n\n" + md_table((column, "images", "base", "adapted", "change", "p (McNemar)"), [
            (d.name, str(d.n), f"{d.base:.4f}", f"{d.adapted:.4f}",
             f"{d.delta:+.4f}" + (" (regression)" if d.regression else ""), f"{d.p_value:.3g}") for d in deltas])
        text += "\n\n"
    if not comparison.per_group:
        text += "The evaluation data has no metadata column with groups (e.g. `group`, `location`).\n\n"
    regressions = comparison.regressions
    text += (f"Regressions (accuracy down by more than {points(comparison.tolerance)}; p from an exact McNemar test "
             "on the same images): " + (", ".join(f"{d.name} ({100 * d.delta:+.1f} points, p={d.p_value:.2g})"
                                                  for d in regressions) if regressions else "none") + ".")
    return text


def health_markdown(diagnosis: Diagnosis) -> str:
    v = diagnosis.verdict
    lines = [f"## Adapter health\n\nVerdict: **{v.status}** ({len(diagnosis.layers)} low-rank pairs; "
             f"`vislora inspect` gives the per-layer figures).\n"]
    lines += [f"- {r}" for r in v.reasons] + [f"- recommendation: {r}" for r in v.recommendations]
    return "\n".join(lines)


def _intended_use(info: RunInfo, data: DataSummary | None) -> str:
    classes = ", ".join(info.task["classes"][:20]) + (" ..." if len(info.task["classes"]) > 20 else "")
    source = f" like those of `{data.source}`" if data else ""
    return (f"## Intended use\n\nClassifying images{source} into these {len(info.task['classes'])} classes: {classes}. "
            "Inputs are resized and normalised as `task.json` records. Use it as a research and engineering "
            "baseline; decisions about people need their own evaluation.")


def _limitations(info: RunInfo, comparison: Comparison | None, data: DataSummary | None) -> str:
    items = []
    if comparison is not None:
        accuracy, n = comparison.adapted.accuracy, comparison.adapted.n
        margin = 1.96 * (accuracy * (1 - accuracy) / n) ** 0.5  # normal approximation of a binomial proportion
        items.append(f"Evaluated on {n:,} images only: the accuracy carries a sampling error of about "
                     f"±{100 * margin:.1f} points (95%).")
        worst = sorted(comparison.per_class, key=lambda d: d.adapted)[:2]
        items.append("Weakest classes: " + ", ".join(f"{d.name} ({d.adapted:.3f})" for d in worst) + ".")
        if comparison.regressions:
            significant = [d.name for d in comparison.regressions if d.p_value < 0.05]
            items.append("Some classes or groups got worse than the base model: "
                         + ", ".join(d.name for d in comparison.regressions) + "; "
                         + (f"significant at p < 0.05: {', '.join(significant)}." if significant else
                            "none of these drops is significant at p < 0.05 on this data."))
        if comparison.drift is not None and comparison.drift.mean < 0.99:
            items.append(f"The adapter moves the embeddings (mean cosine similarity {comparison.drift.mean:.3f}): "
                         "indices or caches built from the base model's embeddings must be rebuilt.")
    if data is not None and data.missing_provenance:
        items.append(f"The training data lacks {', '.join(data.missing_provenance)} for some or all images: its "
                     "licensing and its coverage of places and times cannot be checked from the data.")
    if comparison is None or not comparison.per_group:
        items.append("No per-group evaluation was possible: behaviour on subpopulations is unknown.")
    return "## Limitations\n\n" + "\n".join(f"- {item}" for item in items)


def _usage(info: RunInfo) -> str:
    return ("## How to use\n\n```python\nfrom vislora.runs import load_trained\n\n"
            f"model, task = load_trained(\"{info.adapter_dir}\")  # base model rebuilt from task.json, adapter loaded\n"
            "logits = model(images)  # images normalised as task['input'] says\n"
            "model.merge()           # fold the adapter into the weights: base-model speed\n```")


def md_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)
