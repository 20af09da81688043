"""`vislora report RUN_DIR`: a self-contained HTML report with PNG plots, MODEL_CARD.md and the raw figures as JSON.

`write_report(run_dir)` rebuilds the trained classifier from the run's adapter, diagnoses the adapter, compares
base and adapted on the run's held-out data (or `data`), and writes into RUN_DIR/report/:
report.html, MODEL_CARD.md, evaluation.json, diagnostics.json and the PNGs (training.png, telemetry.png,
per_class.png, confusion.png, drift.png, rank_utilisation.png, parameters.png). `build_report` does the writing for a
model and comparison already in hand (the demo reuses its own predictions that way). Contrastive and few-shot runs get
the dual-encoder report of `vislora.report.dual` (recall@K, zero-shot accuracy, embedding drift); captioning and VQA
runs the generative report of `vislora.report.generative` (BLEU-4/CIDEr or VQA accuracy, sample images with their
outputs before and after).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from vislora.diagnostics import diagnose
from vislora.errors import VisloraError
from vislora.evaluate import Comparison, compare_model
from vislora.evaluate.multilabel_comparison import MultilabelComparison, compare_multilabel_model
from vislora.evaluate.prompted import compare_prompted_model
from vislora.io import atomic_write_text
from vislora.model import AdaptedModel
from vislora.parameters import parameter_report
from vislora.report import plots
from vislora.report.card import model_card
from vislora.report.clinical import clinical_html, clinical_markdown
from vislora.report.dual import write_dual_report
from vislora.report.generative import write_generative_report
from vislora.report.html import render_html
from vislora.report.multilabel import multilabel_html, multilabel_markdown
from vislora.report.run import DataSummary, ReportFiles, RunInfo, load_run, summarize_data, training_data
from vislora.run_config import EvalSection
from vislora.runs import DUAL_TASKS, GENERATIVE_TASKS, PROMPTED_TASK, load_trained, load_trained_dual

__all__ = ["ReportFiles", "build_report", "load_run", "summarize_data", "write_report"]


def write_report(run_dir: str | Path, data: str | None = None, limit: int | None = None, adapter: str = "adapter",
                 out: str | Path | None = None, batch_size: int = 64, latency_images: int = 8,
                 progress: Callable[[Iterable, int], Iterable] | None = None,
                 max_new_tokens: int = 32) -> ReportFiles:
    """Report on a finished run; `data` (default: the run's data.val, same limit) is the before/after data;
    `max_new_tokens` bounds each generated caption or answer (captioning / VQA runs)."""
    info = load_run(run_dir, adapter)
    kind = info.task.get("task", "classification")
    settings = info.config.get("data", {})
    source = data or settings.get("val")
    if kind == PROMPTED_TASK:  # prompted attributes: the multi-label section, base = the dual encoder zero-shot
        model, task = load_trained_dual(info.adapter_dir)
        tagging = compare_prompted_model(model, task, source, batch_size=batch_size, limit=limit or (
            None if data else settings.get("val_limit")), label_column=settings.get("label_column", "label"),
            path_column=settings.get("path_column", "path")) if source else None
        return build_report(info, model, None, training_data(info), out, tagging=tagging)
    if kind in DUAL_TASKS:  # contrastive / few_shot: recall@K, zero-shot accuracy, drift (vislora.report.dual)
        return write_dual_report(info, data, limit, out, batch_size, progress)
    if kind in GENERATIVE_TASKS:  # captioning / VQA: generated text before / after (vislora.report.generative)
        return write_generative_report(info, data, limit, out, batch_size, max_new_tokens)
    if kind not in ("classification", "multilabel"):
        raise VisloraError(f"{info.adapter_dir} is a {kind!r} run; vislora report covers classification, multilabel, "
                           f"contrastive, few_shot, {PROMPTED_TASK}, captioning and vqa runs. "
                           f"`vislora inspect {info.adapter_dir}` diagnoses any adapter")
    model, task = load_trained(info.adapter_dir)
    comparison = tagging = None
    if source and kind == "multilabel":
        tagging = compare_multilabel_model(model, task, source, batch_size, limit or (None if data else settings.get(
            "val_limit")), settings.get("label_column", "label"), settings.get("path_column", "path"),
            info.config.get("run", {}).get("seed", 0), progress=progress)
    elif source:
        comparison = compare_model(model, task, source, batch_size, limit or (None if data else settings.get(
            "val_limit")), settings.get("label_column", "label"), settings.get("path_column", "path"),
            info.config.get("run", {}).get("seed", 0), latency_images=latency_images, progress=progress,
            clinical=EvalSection.model_validate(info.config.get("eval") or {}))
    return build_report(info, model, comparison, training_data(info), out, tagging=tagging)


def build_report(info: RunInfo, model: AdaptedModel, comparison: Comparison | None, data: DataSummary | None,
                 out: str | Path | None = None, adapter: str = "default",
                 tagging: MultilabelComparison | None = None) -> ReportFiles:
    """Diagnose `model`'s adapter and write the plots, report.html, MODEL_CARD.md and JSON files into `out`;
    `tagging` is the before/after of a multilabel run (report/multilabel.py)."""
    folder = Path(out) if out is not None else info.run_dir / "report"
    diagnosis = diagnose(model, adapter)
    params = parameter_report(model)
    config = model.configs[adapter].model_dump(mode="json")
    images = {"training": plots.training_curves(info.metrics, folder / "training.png"),
              "telemetry": plots.telemetry(info.metrics, folder / "telemetry.png"),
              "rank_utilisation": plots.rank_heatmap(diagnosis, folder / "rank_utilisation.png")}
    by_module: Counter = Counter()
    counts = model.parameter_counts(adapter)
    for target in model.plans[adapter].targets:
        by_module[target.path.rpartition(".")[2] + (f"[{','.join(target.slices)}]" if target.slices else "")] += (
            counts[target.path])
    gain = comparison.adapted.accuracy - comparison.base.accuracy if comparison else None
    images["parameters"] = plots.parameter_efficiency(params.base, params.trainable, sum(counts.values()),
                                                      dict(by_module), folder / "parameters.png", gain)
    evaluation = None
    if comparison is not None:
        images["per_class"] = plots.per_class_bars(comparison, folder / "per_class.png")
        images["confusion"] = plots.confusion_matrices(comparison, info.task["classes"], folder / "confusion.png")
        if comparison.drift is not None:
            images["drift"] = plots.drift_histogram(comparison.drift, folder / "drift.png")
    if comparison is not None or tagging is not None:
        evaluation = folder / "evaluation.json"
        atomic_write_text(evaluation, json.dumps((comparison or tagging).to_dict(), indent=2))
    drawn = {k: v for k, v in images.items() if v is not None}
    atomic_write_text(folder / "diagnostics.json", json.dumps(diagnosis.to_dict(), indent=2))
    card = folder / "MODEL_CARD.md"
    clinical = comparison.clinical if comparison is not None else None
    atomic_write_text(card, model_card(info, config, diagnosis, comparison, params, data,
                                       evaluation=multilabel_markdown(tagging) if tagging else None,
                                       clinical=clinical_markdown(clinical) if clinical else None))
    links = [p.name for p in (card, folder / "diagnostics.json", evaluation) if p is not None]
    html = folder / "report.html"
    atomic_write_text(html, render_html(info, config, diagnosis, comparison, params, data, drawn, links,
                                        evaluation=multilabel_html(tagging) if tagging else (),
                                        clinical=clinical_html(clinical) if clinical else ()))
    return ReportFiles(folder=folder, html=html, model_card=card, diagnostics=folder / "diagnostics.json",
                       evaluation=evaluation, plots=list(drawn.values()))
