"""`vislora report`: HTML report, plots and model card of a finished training run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vislora.cli.app import app, console


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `vislora train` (run.output_dir).")],
    data: Annotated[str | None, typer.Option(
        help="Before/after data (image folder, manifest, fashion-mnist:test); default: the run's data.val.")] = None,
    limit: Annotated[int | None, typer.Option(
        help="Evaluate a stratified subset of this many images (default with the run's data: its val_limit).")
    ] = None,
    adapter: Annotated[str, typer.Option(help="Folder of the run to report on: adapter (final), best, or "
                                              "checkpoints/step-N.")] = "adapter",
    out: Annotated[Path | None, typer.Option(help="Where to write the report (default: RUN_DIR/report).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    latency_images: Annotated[int, typer.Option(help="Batch size of the latency test; 0 skips it.")] = 8,
    max_new_tokens: Annotated[int, typer.Option(
        help="Captioning / VQA runs: most tokens generated per caption or answer.")] = 32,
) -> None:
    """Write RUN_DIR/report/: report.html (self-contained, plots embedded), MODEL_CARD.md (Hugging Face style),
    the PNG plots, evaluation.json and diagnostics.json.

    Plots: training curves, before/after per class, confusion matrices, embedding drift, rank utilisation
    (layer x module type), parameter efficiency. A contrastive or few-shot run (dual encoder) reports zero-shot
    accuracy, recall@1/5/10 both ways and image-embedding drift, base vs adapted. A captioning or VQA run reports
    BLEU-4 and CIDEr, or exact match and VQAv2 soft accuracy, base vs adapted, with sample images and their
    captions or answers before and after (--data: a captioning / VQA data file).

    Example: vislora report runs/fashion-mnist-dinov2 --adapter best
    """
    from rich.progress import track

    from vislora.report import write_report

    files = write_report(run_dir, data=data, limit=limit, adapter=adapter, out=out, batch_size=batch_size,
                         latency_images=latency_images, max_new_tokens=max_new_tokens,
                         progress=lambda items, total: track(items, total=total, description="base + adapted",
                                                             console=console, transient=True))
    console.print(f"model card: {files.model_card}")
    console.print(f"report: {files.html}")
