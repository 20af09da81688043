"""`vislora <command>`: a thin typer layer over the library."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table

from vislora import __version__
from vislora.backbones import load_base_model
from vislora.config import PRESETS, AdapterConfig
from vislora.errors import VisloraError
from vislora.model import AdaptedModel, inject, load_adapter
from vislora.parameters import parameter_report
from vislora.targets import TargetPlan

app = typer.Typer(
    help="Low-rank adapters for vision transformers: choose targets, inject, merge, save PEFT-compatible files.",
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
    _show(adapted, adapted.plans["default"])


@app.command()
def demo(
    model: Annotated[str, typer.Option(help="Base model spec.")] = "timm:vit_base_patch16_224",
    preset: Annotated[str, typer.Option(help="Task preset.")] = "image_classification",
    out: Annotated[Path | None, typer.Option(help="Where to save the demo adapter (default: a temp dir).")] = None,
) -> None:
    """Inject adapters into a ViT, print targets and parameter report, check merge and save/load exactness."""
    console.rule(f"[bold]vislora demo[/] — {model}, preset {preset}")
    torch.manual_seed(0)
    base = load_base_model(model)
    pristine = copy.deepcopy(base)
    adapted = inject(base, AdapterConfig.from_preset(preset))
    _show(adapted, adapted.plans["default"])
    with torch.no_grad():  # stand-in for training: give B values so the adapter changes the output
        for layer in adapted.layers().values():
            for param in layer.lora_B.values():
                param.normal_(std=0.02)
    images = torch.randn(2, 3, *_input_size(base))
    with torch.inference_mode():
        adapted_out = adapted(images)
        with adapted.disabled():
            base_out = adapted(images)
        adapted.merge()
        merged_out = adapted(images)
        adapted.unmerge()
    console.print(f"adapter changes the logits by up to {(adapted_out - base_out).abs().max():.4f}")
    console.print(f"merged vs unmerged: max |diff| = {(merged_out - adapted_out).abs().max():.2e}")
    folder = out or Path(tempfile.mkdtemp(prefix="vislora-demo-")) / "adapter"
    adapted.save_adapter(folder)
    reloaded = load_adapter(pristine, folder)
    with torch.inference_mode():
        reload_diff = (reloaded(images) - adapted_out).abs().max()
    size = sum(f.stat().st_size for f in folder.iterdir())
    console.print(f"saved PEFT-compatible adapter to {folder} ({size / 1024:.1f} KiB); "
                  f"reloaded max |diff| = {reload_diff:.2e}")


def _input_size(model: torch.nn.Module) -> tuple[int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224))[1:])


def _config(preset: str | None, target: list[str] | None, rank: int | None, alpha: float | None,
            layers: list[int] | None, config: Path | None) -> AdapterConfig:
    overrides = {k: v for k, v in {"targets": target, "rank": rank, "alpha": alpha, "layers": layers}.items() if v}
    if config is not None:
        return AdapterConfig.parse({**AdapterConfig.load(config).model_dump(), **overrides})
    if preset is not None:
        return AdapterConfig.from_preset(preset, **overrides)
    return AdapterConfig.parse(overrides)


def _show(model: AdaptedModel, plan: TargetPlan) -> None:
    table = Table("module", "slices", "in", "out", "rank", "alpha", "scale", "params",
                  title=f"{len(plan.targets)} adapted weights")
    for t in plan.targets:
        table.add_row(t.path, ",".join(t.slices) or "all", str(t.in_features), str(t.out_features),
                      str(t.rank), f"{t.alpha:g}", f"{t.scale:g}", f"{t.n_params:,}")
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
        console.print(f"[red]error:[/] {exc}")
        raise SystemExit(2) from None
