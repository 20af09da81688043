"""`vislora clip eval`: score a trained dual-encoder adapter (contrastive or few-shot run) on any data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from vislora.cli.app import app, console

clip_app = typer.Typer(help="Dual encoders (CLIP-style): score trained image-text adapters.", no_args_is_help=True)
app.add_typer(clip_app, name="clip")


@clip_app.command("eval")
def clip_eval(
    adapter: Annotated[Path, typer.Option(help="A contrastive/few-shot run's adapter/ or best/ folder.")],
    data: Annotated[str, typer.Option(help="Image folder, .csv/.jsonl manifest (a caption column adds retrieval "
                                           "recall), or fashion-mnist:test.")],
    limit: Annotated[int | None, typer.Option(help="Score a stratified random subset of this many images.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    template: Annotated[list[str] | None, typer.Option(
        help="Prompt template ('{}' = class name), repeatable; default: the run's task.templates.")] = None,
    device: Annotated[str, typer.Option(help="Where the towers run: auto (cuda when available, else mps, else "
                                              "cpu), cpu, cuda, cuda:N, mps.")] = "cpu",
) -> None:
    """Prompt-classifier accuracy (templates ensembled) and image<->text recall@1/5/10 of a trained dual encoder.

    The run's frozen adapters (adapter.frozen) are loaded under it, as in training.

    Example: vislora clip eval --adapter runs/fewshot-fashion-mnist/adapter --data fashion-mnist:test --limit 1000
    """
    from vislora.evaluate import evaluate_dual

    result = evaluate_dual(adapter, data, batch_size=batch_size, limit=limit, templates=template or None,
                           device=device)
    table = Table("metric", "value", title=f"{result.n} images" + (f" ({result.skipped} skipped)"
                                                                    if result.skipped else ""))
    for name, value in result.metrics().items():
        table.add_row(name, f"{value:.4f}")
    console.print(table)
