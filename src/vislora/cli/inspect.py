"""`vislora inspect`: adapter diagnostics (norms, singular values, effective rank, rank use) and a health verdict."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from vislora.cli.app import app, console
from vislora.diagnostics import Diagnosis, GroupSummary, LayerDiagnostics, Stats
from vislora.targets import block_prefix

STATUS_STYLE = {"healthy": "green", "attention": "yellow", "untrained": "red", "broken": "bold red"}


@app.command()
def inspect(
    adapter: Annotated[Path, typer.Argument(help="Adapter directory (vislora or PEFT layout), e.g. runs/x/adapter.")],
    base: Annotated[str | None, typer.Option(
        help="The base model, for ||W|| and relative change: a spec (timm:<name>, hf:<id or dir>, open_clip:<name>, "
             "asset:dinov2-small), or `auto` for the model recorded in the adapter's task.json (`vislora train` "
             "runs).")] = None,
    threshold: Annotated[float, typer.Option(help="Energy share for the energy rank (0.9 = 90% of sum s^2).")] = 0.9,
    as_json: Annotated[bool, typer.Option("--json", help="Print the diagnosis as JSON instead of tables.")] = False,
    pretrained: Annotated[bool, typer.Option(help="Load the base model's pretrained weights (timm/open_clip "
                                                  "download them).")] = True,
) -> None:
    """Diagnose an adapter: per-layer norms, singular values of scale*BA, effective rank, rank use, verdict.

    Reads the adapter files alone; with --base also ||delta_W|| / ||W|| per layer. The verdict (healthy,
    attention, untrained, broken) comes with the numbers behind it and what to change.

    Example: vislora inspect runs/fmnist/adapter --base auto
    """
    from vislora.diagnostics import diagnose, inspect_adapter

    if base == "auto":
        from vislora.runs import load_trained

        diagnosis = diagnose(load_trained(adapter)[0], threshold=threshold)
        diagnosis.adapter, diagnosis.source = adapter.name, str(adapter)
    else:
        diagnosis = inspect_adapter(adapter, _base_model(base, pretrained) if base else None, threshold)
    if as_json:
        typer.echo(json.dumps(diagnosis.to_dict(), indent=2))
        return
    show_diagnosis(diagnosis)


def _base_model(spec: str, pretrained: bool) -> object:
    from vislora.assets import resolve_model_spec
    from vislora.backbones import load_base_model

    return load_base_model(resolve_model_spec(spec), pretrained=pretrained)


def show_diagnosis(diagnosis: Diagnosis) -> None:
    """Per-layer tables (one per block stack), summaries per module type and per depth, and the verdict.

    Fits an 80-column terminal: each row names its block by index and the module by its path inside the block
    (the stack's path is the table's title), and no cell is ever wrapped; `--json` has every figure.
    """
    relative = any(layer.relative_norm is not None for layer in diagnosis.layers)
    console.print(f"[bold]{escape(diagnosis.source)}[/]: {len(diagnosis.layers)} low-rank pairs, "
                  "dW = scale*B@A with singular values s")
    for stack, layers in _by_stack(diagnosis.layers).items():
        console.print(_layer_table(stack, layers, relative, diagnosis.threshold))
    for key, groups in (("module type", diagnosis.by_module), ("depth", diagnosis.by_depth)):
        console.print(_summary_table(key, groups, relative))
    verdict = diagnosis.verdict
    console.print(f"verdict: [{STATUS_STYLE.get(verdict.status, 'bold')}]{verdict.status}[/]")
    for reason in verdict.reasons:
        console.print(f"  - {reason}", markup=False)
    for advice in verdict.recommendations:
        console.print(f"  -> {advice}", markup=False)


def _by_stack(layers: list[LayerDiagnostics]) -> dict[str, list[tuple[str, str, LayerDiagnostics]]]:
    """(block index, path inside the block, layer) per block stack (`backbone.encoder.layer.N`); layers outside
    every stack keep their whole path, under "outside the blocks"."""
    stacks: dict[str, list[tuple[str, str, LayerDiagnostics]]] = defaultdict(list)
    for layer in layers:
        prefix = block_prefix(layer.path)
        if prefix is None:
            stacks["outside the blocks"].append(("-", layer.path, layer))
        else:
            stack, _, index = prefix.rpartition(".")
            stacks[f"{stack}.N" if stack else "N"].append((index, layer.path[len(prefix) + 1:], layer))
    return stacks


def _layer_table(stack: str, rows: list[tuple[str, str, LayerDiagnostics]], relative: bool, threshold: float
                 ) -> Table:
    table = Table(title=escape(stack), box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    table.add_column("N" if stack != "outside the blocks" else "", justify="right", no_wrap=True)
    table.add_column("module", no_wrap=True)
    for column in ("rank", "||dW||", *(["||dW||\n/||W||"] if relative else []), "eff.\nrank",
                   f"r@{threshold:.0%}", "use"):
        table.add_column(escape(column), justify="right", no_wrap=True)
    table.add_column("top s", justify="right")  # three numbers: a narrow terminal wraps between them
    for index, module, layer in rows:
        top = " ".join(f"{s:.2g}" for s in layer.singular_values[:3])
        table.add_row(index, escape(module), str(layer.rank), _num(layer.delta_norm),
                      *([_num(layer.relative_norm)] if relative else []), f"{layer.effective_rank:.2f}",
                      str(layer.energy_rank), f"{layer.utilisation:.2f}", top or "-")
    return table


def _summary_table(key_name: str, groups: dict[str, GroupSummary], relative: bool) -> Table:
    table = Table(title=f"per {key_name}", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    for column in (key_name, "layers", "utilisation\nmean ± std", "utilisation\nrange", "eff. rank\nmean",
                   *(["||dW||/||W||\nmean"] if relative else [])):
        table.add_column(escape(column), no_wrap=True, justify="left" if column == key_name else "right")
    for key, group in groups.items():
        u = group.utilisation
        table.add_row(escape(key), str(group.layers), _mean_std(u), f"{u.min:.2f}-{u.max:.2f}" if u else "-",
                      _num(group.effective_rank.mean if group.effective_rank else None),
                      *([_num(group.relative_norm.mean if group.relative_norm else None)] if relative else []))
    return table


def _mean_std(stats: Stats | None) -> str:
    return f"{stats.mean:.2f} ± {stats.std:.2f}" if stats else "-"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
