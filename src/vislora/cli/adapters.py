"""`vislora presets` and `vislora targets`: the adapter config before anything is trained."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from vislora.backbones import load_base_model
from vislora.cli.app import ModelSpec, app, console, show_plan
from vislora.config import PRESETS, AdapterConfig
from vislora.model import inject


@app.command()
def presets() -> None:
    """List the task presets (rank, alpha, target roles) usable as --preset or AdapterConfig.from_preset."""
    table = Table("preset", "rank", "alpha", "targets", "dropout", title="task presets")
    for name, values in PRESETS.items():
        table.add_row(name, str(values["rank"]), str(values["alpha"]), ", ".join(values["targets"]),
                      str(values.get("dropout", AdapterConfig.model_fields["dropout"].default)))
    console.print(table)
    console.print("Roles: q k v (one pair per projection; slices of a fused qkv), qkv (as the model has it), "
                  "o, fc1, fc2, attention, mlp. Any other entry is a module-path suffix or re:<regex>.")


@app.command()
def targets(
    model: ModelSpec,
    preset: Annotated[str | None, typer.Option(help="Start from a task preset (see `vislora presets`).")] = None,
    target: Annotated[list[str] | None, typer.Option(
        "--target", "-t", help="Role, path suffix or re:<regex>; repeat for several. Overrides the preset.")] = None,
    rank: Annotated[int | None, typer.Option(help="Rank r (overrides the preset).")] = None,
    alpha: Annotated[float | None, typer.Option(help="Alpha (overrides the preset).")] = None,
    layers: Annotated[list[int] | None, typer.Option(
        "--layer", help="Adapt only this block index (negative counts from the end); repeatable.")] = None,
    config: Annotated[Path | None, typer.Option(help="Adapter config YAML/JSON (instead of flags).")] = None,
    pretrained: Annotated[bool, typer.Option(help="Download pretrained weights (needs the hub).")] = False,
) -> None:
    """Show which modules an adapter config hits in MODEL, and what it costs, without training anything.

    Example: vislora targets timm:vit_base_patch16_224 --preset few_shot --layer -1 --layer -2
    """
    cfg = _config(preset, target, rank, alpha, layers, config)
    adapted = inject(load_base_model(model, pretrained=pretrained), cfg)
    show_plan(adapted)


def _config(preset: str | None, target: list[str] | None, rank: int | None, alpha: float | None,
            layers: list[int] | None, config: Path | None) -> AdapterConfig:
    overrides = {k: v for k, v in {"targets": target, "rank": rank, "alpha": alpha, "layers": layers}.items() if v}
    if config is not None:
        return AdapterConfig.parse({**AdapterConfig.load(config).model_dump(), **overrides})
    if preset is not None:
        return AdapterConfig.from_preset(preset, **overrides)
    return AdapterConfig.parse(overrides)
