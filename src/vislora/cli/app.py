"""The typer app every command module registers on, the console they print to, and the entry point."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vislora.errors import VisloraError
from vislora.model import AdaptedModel
from vislora.parameters import parameter_report
from vislora.version import __version__

app = typer.Typer(
    help="Low-rank adapters for vision transformers: audit data, choose targets, train, evaluate, save "
         "PEFT-compatible files.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()

ModelSpec = Annotated[str, typer.Argument(help="timm:<name> (bare names are timm), hf:<id or path>, or "
                                               "open_clip:<name>. Example: timm:vit_base_patch16_224")]


def _version(value: bool) -> None:
    if value:
        console.print(f"vislora {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """vislora: adapt large vision models with LoRA on one GPU or a laptop CPU."""


def show_plan(model: AdaptedModel, name: str = "default") -> None:
    """The resolved targets of adapter `name`, what each holds, and the parameter report."""
    plan, counts = model.plans[name], model.parameter_counts(name)
    table = Table("module", "slices", "in", "out", "rank", "alpha", "scale", "params",
                  title=f"{len(plan.targets)} adapted weights")
    for t in plan.targets:
        table.add_row(t.path, ",".join(t.slices) or "all", str(t.in_features), str(t.out_features),
                      str(t.rank), f"{t.alpha:g}", f"{t.scale:g}", f"{counts[t.path]:,}")
    console.print(table)
    for name, count in plan.counts().items():
        console.print(f"  {count:>4} x {name}", markup=False)
    if plan.modules_to_save:
        console.print(f"  trained in full and saved: {', '.join(plan.modules_to_save)}")
    console.print(str(parameter_report(model)))


def run() -> None:
    """Entry point that turns VisloraError into a one-line message and exit code 2."""
    try:
        app()
    except VisloraError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}")  # a message's [...] is text, not markup
        raise SystemExit(2) from None
