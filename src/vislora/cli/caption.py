"""`vislora caption`: alt text for image files from a captioning adapter, resumable (vislora.alt_text)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from vislora.cli.app import app, console


@app.command(no_args_is_help=True)
def caption(
    images: Annotated[list[Path], typer.Argument(
        help="Image files, folders (searched recursively) or .txt files listing image paths (one a line).",
        show_default=False)],
    adapter: Annotated[Path, typer.Option(help="A captioning or VQA run's adapter folder (RUN/adapter, RUN/best).",
                                          show_default=False)],
    out: Annotated[Path, typer.Option(help="JSONL file of captions; rerunning with it skips the images it holds.",
                                      show_default=False)],
    prompt: Annotated[str | None, typer.Option(
        help="Instruction given with each image (default: the prompt the run trained with).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per generate call.")] = 8,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest caption, in tokens.")] = 30,
    beams: Annotated[int, typer.Option(min=1, help="Beam search width (1: greedy).")] = 1,
    device: Annotated[str, typer.Option(help="Where the model runs: auto (cuda when available, else mps, else cpu), "
                                             "cpu, cuda, cuda:N or mps.")] = "auto",
) -> None:
    """Write alt text: one caption per image, as JSONL rows {"image", "alt", "adapter", "prompt", "tokens"}.

    Resumable: images already captioned in --out are skipped, and each batch is appended in one fsynced write, so
    an interrupted run (Ctrl-C, a crash, a killed job) leaves a valid file; rerun the same command to finish it.
    An image that cannot be read gets a row {"image", "error"}, the run goes on, and the next run retries it.

    Example: vislora caption photos/ --adapter runs/alt/best --out alt.jsonl

    Example: vislora caption list.txt extra.jpg --adapter runs/alt/best --out alt.jsonl --beams 3 --max-new-tokens 40
    """
    from vislora.alt_text import caption_adapter

    columns = (TextColumn("caption"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("caption", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        summary = caption_adapter(adapter, images, out, prompt=prompt, batch_size=batch_size,
                                  max_new_tokens=max_new_tokens, num_beams=beams, device=device,
                                  progress=progress)
    console.print(str(summary), markup=False, highlight=False)
