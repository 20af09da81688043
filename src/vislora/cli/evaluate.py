"""`vislora eval`: the base model and the adapted model on the same images, side by side (classifiers,
multi-label taggers, and captioning / VQA adapters of generative VLMs)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table

from vislora.cli.app import app, console
from vislora.errors import ConfigError
from vislora.evaluate import ClinicalComparison, Comparison, Delta, points
from vislora.evaluate.classifier import compare_model
from vislora.evaluate.generative import GenerativeComparison, compare_generative_adapter
from vislora.evaluate.multilabel_comparison import MultilabelComparison, compare_multilabel_model, nan_text
from vislora.evaluate.prompted import compare_prompted_model
from vislora.run_config import EvalSection
from vislora.runs import GENERATIVE_TASKS, load_trained, load_trained_dual, read_task
from vislora.tasks.prompted import PROMPTED_TASK


@app.command("eval")
def evaluate(
    adapter: Annotated[Path, typer.Option(help="A trained adapter folder: RUN/adapter, RUN/best or a checkpoint.")],
    data: Annotated[str, typer.Option(help="Image folder, .csv/.jsonl manifest, or fashion-mnist:test; for a "
                                           "captioning or VQA adapter a COCO captions / LLaVA JSON or VQA / caption "
                                           "JSONL or CSV file.")],
    limit: Annotated[int | None, typer.Option(help="Evaluate a stratified random subset of this many images.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    label_column: Annotated[str, typer.Option(help="Manifest column holding the label.")] = "label",
    path_column: Annotated[str, typer.Option(help="Manifest column holding the image path.")] = "path",
    predictions: Annotated[Path | None, typer.Option(
        help="Write one CSV row per image (label, prediction, loss, metadata) here.")] = None,
    base_head: Annotated[str, typer.Option(
        help="Head of the base model: `trained` (the adapter's head on base features; what the adapters add) or "
             "`original` (the base model's own head).")] = "trained",
    tolerance: Annotated[float, typer.Option(
        help="A class or group whose accuracy drops by more than this (0.01 = 1 point) is a regression.")] = 0.01,
    latency_images: Annotated[int, typer.Option(
        help="Batch size of the latency test (base, unmerged, merged); 0 skips it.")] = 8,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the whole comparison as JSON here.")
                        ] = None,
    specificity: Annotated[float, typer.Option(
        help="Classifiers: report each class's sensitivity at this specificity (one-vs-rest).")] = 0.95,
    sensitivity: Annotated[float, typer.Option(
        help="Classifiers: report each class's specificity at this sensitivity.")] = 0.95,
    bootstrap: Annotated[int, typer.Option(
        help="Classifiers: bootstrap resamples (stratified by class) for the confidence intervals of AUROC, "
             "sensitivity and specificity; 0: no intervals.")] = 1000,
    ci: Annotated[float, typer.Option(help="Confidence level of the intervals.")] = 0.95,
    image_size: Annotated[int | None, typer.Option(
        help="Run the adapter at this input side instead of the one it was trained at (a warning names both; "
             "position embeddings are adapted, vislora.input_size).")] = None,
    device: Annotated[str, typer.Option(help="Classifiers and taggers: where the model runs: auto (cuda when "
                                              "available, else mps, else cpu), cpu, cuda, cuda:N, mps.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="Classifiers and taggers: float32, bfloat16 (CPU or GPU) or float16 "
                                            "(GPU only).")] = "float32",
    image_root: Annotated[Path | None, typer.Option(
        help="Captioning / VQA: the folder image paths are relative to (default: the data file's folder).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Captioning / VQA: most tokens generated per answer.")] = 32,
    num_beams: Annotated[int, typer.Option(help="Captioning / VQA: beams (1 = greedy decoding).")] = 1,
    examples: Annotated[int, typer.Option(
        help="Captioning / VQA: examples printed, base vs adapted (those whose score changed most).")] = 5,
) -> None:
    """Base vs adapted on the same DATA: accuracy, top-5, macro-F1, calibration (ECE), per class and per metadata
    group (e.g. a `group` column) with regressions flagged, embedding drift, and latency.

    A multilabel adapter (task.kind multilabel) gets mAP, micro/macro-F1 and the rare attributes' mAP, and per
    attribute AP and F1 at the thresholds saved with the adapter, base vs adapted; DATA is then a manifest with a
    list of labels per row, read with the adapter's separator. A prompted_multilabel adapter (a dual encoder) gets
    the same, its base being the dual encoder zero-shot at its own saved thresholds.

    A classifier also gets clinical metrics, base vs adapted: one-vs-rest AUROC per class and macro, sensitivity at
    --specificity and specificity at --sensitivity, with percentile bootstrap intervals (paired for the change).

    Example: vislora eval --adapter runs/fmnist/best --data fashion-mnist:test --limit 2000 --json eval.json
    Example: vislora eval --adapter runs/xray/best --data data/xray_test.csv --specificity 0.9 --bootstrap 2000
    Example: vislora eval --adapter runs/tags/best --data data/tags_test.csv --predictions tags.csv
    Example: vislora eval --adapter runs/fmnist/best --data fashion-mnist:test --image-size 112
    Example: vislora eval --adapter runs/fmnist/best --data fashion-mnist:test --device cuda --dtype bfloat16

    A captioning adapter gets BLEU-4 and CIDEr (pycocoevalcap), a VQA adapter exact match and VQAv2 soft accuracy
    (answers normalised as the VQA evaluation does), base vs adapted on the same images in one routed generate, and
    the examples whose score changed most; --limit takes the first N examples of the file.

    Example: vislora eval --adapter runs/vqa/best --data data/vqa_val.jsonl --limit 500 --json vqa.json
    """
    from rich.progress import track

    from vislora.devices import Placement
    from vislora.io import atomic_write_text

    def progress(items: Iterable, total: int) -> Iterable:
        return track(items, total=total, description="base + adapted", console=console, transient=True)

    kind = read_task(adapter).get("task")
    if kind in GENERATIVE_TASKS:
        if dtype != "float32":
            raise ConfigError(f"--dtype {dtype}: captioning and VQA adapters are evaluated in float32 only for now; "
                              "drop --dtype")
        generated = compare_generative_adapter(adapter, data, image_root=image_root, limit=limit, device=device,
                                               batch_size=batch_size, max_new_tokens=max_new_tokens,
                                               num_beams=num_beams, shown=examples)
        show_generative_comparison(generated)
        if json_out:
            atomic_write_text(json_out, json.dumps(generated.to_dict(), indent=2))
            console.print(f"comparison written to {json_out}")
        return
    placement = Placement.resolve(device, dtype)
    if kind == PROMPTED_TASK and placement != Placement.cpu():
        raise ConfigError(f"--device {device} --dtype {dtype}: a {PROMPTED_TASK} run is evaluated on the CPU in "
                          "float32 only for now; drop --device and --dtype")
    if kind == "multilabel":
        model, task = load_trained(adapter, image_size)
        comparison: Comparison | MultilabelComparison = compare_multilabel_model(
            placement.place(model), task, data, batch_size=batch_size, limit=limit, label_column=label_column,
            path_column=path_column, predictions=predictions, base_head=base_head, progress=progress,
            placement=placement)
        show_multilabel_comparison(comparison)
    elif kind == PROMPTED_TASK:
        comparison = compare_prompted_model(*load_trained_dual(adapter, image_size), data, batch_size=batch_size,
                                            limit=limit, label_column=label_column, path_column=path_column,
                                            predictions=predictions)
        show_multilabel_comparison(comparison)
    else:
        model, task = load_trained(adapter, image_size)
        comparison = compare_model(
            placement.place(model), task, data, batch_size=batch_size, limit=limit, label_column=label_column,
            path_column=path_column, predictions=predictions, base_head=base_head, tolerance=tolerance,
            latency_images=latency_images, progress=progress,
            clinical=_clinical_settings(specificity, sensitivity, bootstrap, ci), placement=placement)
        show_comparison(comparison)
    console.print(f"ran on {placement.describe()}" + (f"; {placement.unused_gpu()}" if placement.unused_gpu() else ""))
    if predictions:
        console.print(f"predictions written to {predictions}")
    if json_out:
        atomic_write_text(json_out, json.dumps(comparison.to_dict(), indent=2))
        console.print(f"comparison written to {json_out}")


def _clinical_settings(specificity: float, sensitivity: float, bootstrap: int, ci: float) -> EvalSection:
    try:
        return EvalSection(specificity=specificity, sensitivity=sensitivity, bootstrap=bootstrap, ci=ci)
    except ValidationError as exc:
        raise ConfigError("; ".join(f"--{err['loc'][0]}: {err['msg']} (got {err['input']!r})"
                                    for err in exc.errors())) from None


def show_comparison(comparison: Comparison) -> None:
    """Metrics, per-class and per-group tables, drift and latency on the console."""
    base, adapted = comparison.base, comparison.adapted
    console.print(f"accuracy {adapted.accuracy:.4f} (base {base.accuracy:.4f}, "
                  f"{100 * (adapted.accuracy - base.accuracy):+.1f} points) on {adapted.n} images"
                  + (f" ({comparison.skipped} corrupt skipped)" if comparison.skipped else ""))
    table = Table("metric", "base", "adapted", "change", title=escape(comparison.data))
    for name, key in (("accuracy", "accuracy"), ("top-5", "top5"), ("macro-F1", "macro_f1"), ("loss", "loss"),
                      ("ECE (calibration error)", "ece")):
        before, after = getattr(base, key), getattr(adapted, key)
        table.add_row(name, f"{before:.4f}", f"{after:.4f}", f"{after - before:+.4f}")
    console.print(table)
    console.print(_delta_table("class", comparison.per_class, comparison.tolerance))
    for column, deltas in comparison.per_group.items():
        console.print(_delta_table(column, deltas, comparison.tolerance))
    regressions = comparison.regressions
    if regressions:
        console.print(f"[red]{len(regressions)} regressions[/] (accuracy down by more than "
                      f"{points(comparison.tolerance)}): "
                      + ", ".join(f"{escape(d.name)} (p={d.p_value:.2g})" for d in regressions))
    drift = comparison.drift
    if drift is not None:
        console.print(f"embedding drift (cosine similarity of base and adapted features per image): mean "
                      f"{drift.mean:.4f}, median {drift.median:.4f}, p5 {drift.p5:.4f}, min {drift.min:.4f}")
    latency = comparison.latency
    if latency is not None:
        table = Table("model", "ms / batch", "images / s", title=f"latency, batch of {latency.batch_size} (median of "
                      f"{latency.repeats})")
        for name, seconds in (("base", latency.base), ("adapters unmerged", latency.unmerged),
                              ("adapters merged", latency.merged)):
            if seconds is None:
                table.add_row(name, "-", "cannot merge")
            else:
                table.add_row(name, f"{1000 * seconds:.1f}", f"{latency.throughput(seconds):.1f}")
        console.print(table)
        if latency.merged is not None:
            console.print(f"merged vs unmerged outputs: max |difference| {latency.merged_max_abs_diff:.2e}")
    if comparison.clinical is not None:
        show_clinical(comparison.clinical)


def show_clinical(clinical: ClinicalComparison) -> None:
    """Macro AUROC, then per class AUROC and the operating points, base vs adapted, with intervals."""
    base, adapted = clinical.base, clinical.adapted
    console.print(f"clinical metrics, one class against the rest; {escape(adapted.describe_intervals())}")
    console.print(f"macro AUROC {adapted.macro_auroc.text()} (base {base.macro_auroc.text()}, change "
                  f"{clinical.macro_change.text(signed=True)})")
    table = Table("class", "pos/neg", "AUROC base", "AUROC adapted", "change", title="AUROC per class")
    for b, a in zip(base.classes, adapted.classes, strict=True):
        table.add_row(escape(a.name), f"{a.positives}/{a.negatives}", b.auroc.text(), a.auroc.text(),
                      clinical.auroc_change[a.name].text(signed=True))
    console.print(table)
    table = Table("class", "sens base", "sens adapted", "thr", "spec base", "spec adapted", "thr",
                  title=f"sensitivity at specificity {adapted.specificity:g}, specificity at sensitivity "
                        f"{adapted.sensitivity:g} (thr: the adapted model's threshold)")
    for b, a in zip(base.classes, adapted.classes, strict=True):
        table.add_row(escape(a.name), b.sensitivity.text(), a.sensitivity.text(), a.at_specificity.threshold_text(),
                      b.specificity.text(), a.specificity.text(), a.at_sensitivity.threshold_text())
    console.print(table)
    if adapted.undefined:
        console.print("AUROC undefined (no positive or no negative image here): "
                      + escape(", ".join(adapted.undefined)))


def _delta_table(key: str, deltas: list[Delta], tolerance: float) -> Table:
    table = Table(escape(key), "n", "base", "adapted", "change", "lost/gained", "p (McNemar)", "",
                  title=escape(f"per {key}"))
    for d in deltas:
        table.add_row(escape(d.name), str(d.n), f"{d.base:.4f}", f"{d.adapted:.4f}", f"{d.delta:+.4f}",
                      f"{d.lost}/{d.gained}", f"{d.p_value:.3g}", "[red]regression[/]" if d.regression else "")
    return table


def show_multilabel_comparison(comparison: MultilabelComparison) -> None:
    """mAP, F1 and rare-attribute mAP, then AP and F1 per attribute, base vs adapted, on the console."""
    base, adapted = comparison.base, comparison.adapted
    console.print(f"mAP {nan_text(adapted.map)} (base {nan_text(base.map)}, "
                  f"{100 * (adapted.map - base.map):+.1f} points) on {adapted.n} images"
                  + (f" ({comparison.skipped} corrupt skipped)" if comparison.skipped else ""))
    console.print(f"base = {escape(comparison.baseline)}; thresholds {escape(comparison.thresholds)}")
    table = Table("metric", "base", "adapted", "change", title=escape(comparison.data))
    figures = [("mAP", "map"), ("micro-F1", "micro_f1"), ("macro-F1", "macro_f1")]
    if adapted.rare:
        figures.append((f"rare mAP ({len(adapted.rare)} attributes < {adapted.rare_below} training images)",
                        "rare_map"))
    for name, key in figures:
        before, after = getattr(base, key), getattr(adapted, key)
        table.add_row(name, nan_text(before), nan_text(after), nan_text(after - before, signed=True))
    console.print(table)
    rows = Table("attribute", "pos", "train", "thr", "AP base", "AP", "AP +/-", "F1 base", "F1",
                 title="per attribute: positives here and in training, threshold, base vs adapted")
    for d in comparison.per_attribute:
        rows.add_row(escape(d.name) + ("*" if d.rare else ""), str(d.positives),
                     "-" if d.train_positives is None else str(d.train_positives), f"{d.threshold:.2f}",
                     nan_text(d.base_ap, 3), nan_text(d.adapted_ap, 3), nan_text(d.ap_delta, 3, signed=True),
                     f"{d.base_f1:.3f}", f"{d.adapted_f1:.3f}")
    console.print(rows)
    if adapted.rare:
        console.print(f"* rare: fewer than {adapted.rare_below} training images ({escape(', '.join(adapted.rare))})")
    if adapted.no_positives:
        console.print("no positives in this data (left out of mAP): " + escape(", ".join(adapted.no_positives)))
    if comparison.drift is not None:
        drift = comparison.drift
        console.print(f"embedding drift (cosine similarity of base and adapted features per image): mean "
                      f"{drift.mean:.4f}, median {drift.median:.4f}, p5 {drift.p5:.4f}, min {drift.min:.4f}")


def show_generative_comparison(comparison: GenerativeComparison) -> None:
    """Metrics base vs adapted with their changes, then the examples shown, base vs adapted, on the console."""
    console.print(f"{comparison.task} on {comparison.n} examples of {escape(comparison.data)}; base = "
                  f"{escape(comparison.baseline)}" + (f"; prompt {escape(repr(comparison.prompt))}"
                                                      if comparison.prompt else ""))
    table = Table("metric", "base", "adapted", "change", title=escape(comparison.data))
    for label, before, after, change in comparison.metric_rows():
        table.add_row(label, f"{before:.4f}", f"{after:.4f}", f"{change:+.4f}")
    console.print(table)
    rows = Table("image", *(["question"] if comparison.task == "vqa" else []), "references", "base", "adapted",
                 f"{comparison.score} change", title="examples whose score changed most", show_lines=True)
    for row in comparison.shown():
        rows.add_row(escape(Path(row.image).name), *([escape(row.question or "")] if comparison.task == "vqa" else []),
                     escape(" | ".join(row.references[:3]) + (" ..." if len(row.references) > 3 else "")),
                     escape(row.base), escape(row.adapted), f"{row.change:+.3f}")
    console.print(rows)
