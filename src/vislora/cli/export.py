"""`vislora merge`, `vislora export onnx|triton` and `vislora registry ...`: shipping an adapter from the shell."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from vislora.cli.app import app, console

Adapter = Annotated[Path, typer.Option(help="A trained adapter folder (RUN/adapter, RUN/best) or any adapter folder "
                                            "with --base.")]
Base = Annotated[str | None, typer.Option(help="Base model spec, only for an adapter folder without task.json "
                                               "(e.g. hf:facebook/dinov2-small).")]
Overwrite = Annotated[bool, typer.Option(help="Replace an existing output folder (swapped in whole).")]
Int8 = Annotated[bool, typer.Option("--int8", help="Also write a static INT8 model, calibrated on --calibration.")]
Calibration = Annotated[str | None, typer.Option(
    help="Calibration images like the training data: a folder (flat or one subfolder per class), a .csv/.jsonl "
         "manifest, or fashion-mnist:train.")]
EvalData = Annotated[str | None, typer.Option(
    help="Labelled held-out images for the fp32 vs INT8 accuracy report (default: the run's data.val).")]
CalibrationLimit = Annotated[int, typer.Option(help="Calibrate on a stratified random subset of this many images.")]
EvalLimit = Annotated[int | None, typer.Option(help="Score a stratified random subset of this many held-out images "
                                                    "(default: the run's data.val_limit, else all).")]
Int8Target = Annotated[str, typer.Option(
    "--int8-target", help="The CPU the INT8 model will run on: auto (this one), vnni (x86 with AVX-VNNI/AVX-512 VNNI/"
                          "AMX), avx512 or avx2 (x86 without VNNI: 7-bit weights so the kernels do not saturate), "
                          "arm64, portable (unknown or mixed CPUs: 7-bit weights).")]
Threads = Annotated[int | None, typer.Option(help="onnxruntime intra-op threads for the report (default: all).")]
Device = Annotated[str, typer.Option(help="Where onnxruntime runs the export's checks: auto (CUDA when onnxruntime "
                                          "offers it), cpu, cuda, cuda:N; a missing CUDA provider falls back to the "
                                          "CPU with a warning. The ONNX file is the same; the INT8 report stays on "
                                          "the CPU.")]
Root = Annotated[Path, typer.Option("--root", envvar="VISLORA_REGISTRY",
                                    help="Registry folder (or set VISLORA_REGISTRY).")]


@contextlib.contextmanager
def _progress(title: str) -> Iterator[Any]:
    """A spinner naming the current step; each step is also printed."""
    with console.status(title) as status:
        def log(message: str) -> None:
            console.print(message, markup=False, highlight=False)
            status.update(message)

        yield log


@app.command()
def merge(
    adapter: Adapter,
    out: Annotated[Path, typer.Option(help="Folder for the merged model (must not exist unless --overwrite).")],
    base: Base = None,
    overwrite: Overwrite = False,
) -> None:
    """Merge an adapter into its base weights and save a standalone model in timm's or transformers' format.

    The folder loads without vislora: `timm.create_model("local-dir:OUT", pretrained=True)` for timm models,
    `AutoModelForImageClassification.from_pretrained("OUT")` for DINOv2 classifiers. A contrastive or few-shot run
    (dual encoder) becomes a CLIP/SigLIP `save_pretrained` folder, or for a vislora pairing vision/ + text/ in their
    libraries' formats with projections.safetensors (vislora_merge.json says how to pool). A captioning or VQA run
    becomes a transformers LLaVA folder (`LlavaForConditionalGeneration` + `AutoProcessor`, with the tokenizer's
    `<image>` token and chat template; README.md and vislora_generation.json say how to build prompts). Outputs are
    checked against the adapted model before the folder is renamed into place.

    Example: vislora merge --adapter runs/demo/adapter --out runs/demo/merged
    """
    from vislora.export import merge_adapter

    with console.status("merging ..."):
        result = merge_adapter(adapter, out, base=base, overwrite=overwrite)
    console.print(str(result), markup=False, highlight=False)


export_app = typer.Typer(help="Export a trained adapter for deployment: ONNX (+ INT8), Triton repository.",
                         no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("onnx")
def export_onnx(
    adapter: Adapter,
    out: Annotated[Path, typer.Option(help="Output folder: model.onnx, model.int8.onnx, int8_report.json, ...")],
    base: Base = None,
    int8: Int8 = False,
    calibration: Calibration = None,
    eval_data: EvalData = None,
    calibration_limit: CalibrationLimit = 128,
    eval_limit: EvalLimit = None,
    batch: Annotated[int, typer.Option(help="The larger batch size timed in the INT8 report.")] = 8,
    int8_target: Int8Target = "auto",
    threads: Threads = None,
    overwrite: Overwrite = False,
    device: Device = "cpu",
    dynamic_size: Annotated[bool, typer.Option(
        "--dynamic-size", help="Also make height and width dynamic (multiples of the patch), checked at the trained "
                               "size and twice it; for timm ViTs and Hugging Face ViT/DINOv2/CLIP/SigLIP.")] = False,
) -> None:
    """Merge, export ONNX with a dynamic batch axis, check it against PyTorch; with --int8, quantize and report.

    The INT8 report gives accuracy fp32 vs INT8 on held-out images and latency p50/p95 at batch 1 and
    --batch, measured in the same run. Calibration and evaluation images are checked before any work.
    A contrastive or few-shot run writes both towers, image.onnx and text.onnx, with its tokenizer and
    export.json (no --int8 for these yet).

    Example: vislora export onnx --adapter runs/demo/adapter --out onnx --int8 --calibration fashion-mnist:train
    """
    from vislora.export import export_onnx_dir
    from vislora.export.dual import DualOnnxExport

    with _progress("exporting ...") as log:
        result = export_onnx_dir(adapter, out, base=base, int8=int8, calibration=calibration, eval_data=eval_data,
                                 calibration_limit=calibration_limit, eval_limit=eval_limit, latency_batch=batch,
                                 threads=threads, overwrite=overwrite, dynamic_size=dynamic_size, log=log,
                                 int8_target=int8_target, device=device)
    if isinstance(result, DualOnnxExport):
        for line in result.lines():
            console.print(line, markup=False, highlight=False)
        return
    console.print(f"max |merged - adapted| {result.merge_max_abs_diff:.2e}; wrote {result.model}"
                  + (f" and {result.int8}" if result.int8 else ""), markup=False, highlight=False)
    if result.report:
        for line in result.report.lines():
            console.print(line, markup=False, highlight=False)


@export_app.command("triton")
def export_triton(
    adapter: Adapter,
    repo: Annotated[Path, typer.Option(help="Triton model repository (created if missing).")],
    name: Annotated[str, typer.Option(help="Model name: the folder REPO/NAME and the name clients call.")],
    base: Base = None,
    int8: Annotated[bool, typer.Option("--int8", help="Add the INT8 model as version 2 (fp32 is 1).")] = False,
    calibration: Calibration = None,
    eval_data: EvalData = None,
    calibration_limit: CalibrationLimit = 128,
    eval_limit: EvalLimit = None,
    max_batch_size: Annotated[int, typer.Option(help="Triton max_batch_size (dynamic batching up to it).")] = 8,
    int8_target: Int8Target = "auto",
    threads: Threads = None,
    overwrite: Overwrite = False,
    device: Device = "cpu",
    triton_gpus: Annotated[str | None, typer.Option(
        help="Serve on GPUs: one Triton instance (KIND_GPU) on each GPU listed, e.g. 0,1, or `all` (every GPU "
             "Triton sees); default: one CPU instance.")] = None,
) -> None:
    """Write a Triton model repository entry: config.pbtxt, 1/model.onnx, optionally 2/model.onnx (INT8).

    config.pbtxt is checked by parsing it into Triton's ModelConfig protobuf, and every version is run with
    onnxruntime at batch 1 and max_batch_size, before the folder is renamed into the repository.
    A contrastive or few-shot run becomes two models, NAME_image and NAME_text (its tokenizer in
    NAME_text/tokenizer/).

    Example: vislora export triton --adapter runs/demo/adapter --repo models --name fmnist
    --int8 --calibration fashion-mnist:train

    Example (GPU instances on GPUs 0 and 1): vislora export triton --adapter runs/demo/adapter --repo models
    --name fmnist --triton-gpus 0,1
    """
    from vislora.export import export_triton as build
    from vislora.export.dual_triton import DualTritonExport
    from vislora.export.triton_config import parse_gpus

    with _progress("exporting ...") as log:
        result = build(adapter, repo, name, base=base, int8=int8, calibration=calibration, eval_data=eval_data,
                       calibration_limit=calibration_limit, eval_limit=eval_limit, max_batch_size=max_batch_size,
                       threads=threads, overwrite=overwrite, log=log, int8_target=int8_target, device=device,
                       gpus=parse_gpus(triton_gpus))
    if isinstance(result, DualTritonExport):
        for line in result.lines():
            console.print(line, markup=False, highlight=False)
        console.print(f"serve it with: tritonserver --model-repository {repo}", markup=False, highlight=False)
        return
    versions = ", ".join(f"{v} ({kind})" for v, kind in result.versions.items())
    checked = "parsed as Triton's ModelConfig" if result.validated_with_protobuf else "checked field by field"
    console.print(f"wrote {result.model_dir} with versions {versions}; config.pbtxt {checked}",
                  markup=False, highlight=False)
    if result.report:
        for line in result.report.lines():
            console.print(line, markup=False, highlight=False)
    console.print(f"serve it with: tritonserver --model-repository {repo}", markup=False, highlight=False)


registry_app = typer.Typer(help="Versioned adapters: add, promote, roll back, prune (kept 30 days at least).",
                           no_args_is_help=True)
app.add_typer(registry_app, name="registry")


def _metrics(values: list[str] | None) -> dict[str, float] | None:
    if not values:
        return None
    from vislora.errors import RegistryError

    out = {}
    for item in values:
        key, _, value = item.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            raise RegistryError(f"--metric {item!r} is not key=number; e.g. --metric accuracy=0.86") from None
    return out


@registry_app.command("add")
def registry_add(
    name: Annotated[str, typer.Argument(help="Adapter name, e.g. fmnist.")],
    adapter: Annotated[Path, typer.Argument(help="Adapter folder to copy in (RUN/adapter, RUN/best, ...).")],
    root: Root = Path("registry"),
    metric: Annotated[list[str] | None, typer.Option(
        help="key=value, repeatable (default: the run's final held-out metrics from summary.json).")] = None,
    base: Base = None,
    note: Annotated[str, typer.Option(help="Free text kept with the version.")] = "",
    promote: Annotated[bool, typer.Option(help="Promote the new version at once.")] = False,
) -> None:
    """Register an adapter folder as the next version of NAME (files hashed, base model fingerprinted).

    Example: vislora registry add fmnist runs/demo/adapter --promote
    """
    from vislora.registry import Registry

    record = Registry(root).add(name, adapter, metrics=_metrics(metric), base=base, note=note, promote=promote)
    console.print(f"{name} v{record.version} registered in {root}" + (" and promoted" if promote else ""),
                  markup=False, highlight=False)


@registry_app.command("list")
def registry_list(
    name: Annotated[str | None, typer.Argument(help="Only this adapter's versions.")] = None,
    root: Root = Path("registry"),
) -> None:
    """List registered versions: created, metrics, base fingerprint, which one is promoted.

    Example: vislora registry list fmnist
    """
    from vislora.registry import Registry

    registry = Registry(root)
    table = Table("name", "version", "created (UTC)", "metrics", "base", "fingerprint", "state", title=str(root))
    promoted = {n: registry.promoted(n) for n in registry.names()}
    for record in registry.versions(name):
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in record.metrics.items())
        state = "promoted" if promoted.get(record.name) == record.version else ""
        table.add_row(record.name, str(record.version), record.created[:19], metrics, record.base or "",
                      (record.base_fingerprint or "")[:12], state)
    console.print(table)


@registry_app.command("promote")
def registry_promote(
    name: Annotated[str, typer.Argument(help="Adapter name.")],
    version: Annotated[str, typer.Argument(help="Version number, or 'latest'.")] = "latest",
    root: Root = Path("registry"),
) -> None:
    """Make VERSION the promoted (served) version of NAME; the current one becomes the rollback target.

    Example: vislora registry promote fmnist 3
    """
    from vislora.registry import Registry

    record = Registry(root).promote(name, version)
    console.print(f"{name} v{record.version} promoted", markup=False, highlight=False)


@registry_app.command("rollback")
def registry_rollback(
    name: Annotated[str, typer.Argument(help="Adapter name.")],
    root: Root = Path("registry"),
) -> None:
    """Promote again the version that was promoted before the current one.

    Example: vislora registry rollback fmnist
    """
    from vislora.registry import Registry

    record = Registry(root).rollback(name)
    console.print(f"{name} rolled back to v{record.version}", markup=False, highlight=False)


@registry_app.command("prune")
def registry_prune(
    root: Root = Path("registry"),
    keep_last: Annotated[int, typer.Option(help="Newest versions of each name always kept.")] = 3,
    min_age_days: Annotated[float, typer.Option(help="Never delete a version younger than this (>= 30).")] = 30,
    dry_run: Annotated[bool, typer.Option(help="List what would be deleted, delete nothing.")] = False,
) -> None:
    """Delete old versions: never the newest KEEP_LAST, the promoted, the previously promoted, or any < 30 days old.

    Example: vislora registry prune --keep-last 5 --dry-run
    """
    from vislora.registry import Registry

    removed = Registry(root).prune(keep_last=keep_last, min_age_days=min_age_days, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    listed = ", ".join(f"{r.name} v{r.version}" for r in removed) or "nothing"
    console.print(f"{verb}: {listed}", markup=False, highlight=False)


@registry_app.command("resolve")
def registry_resolve(
    name: Annotated[str, typer.Argument(help="Adapter name.")],
    version: Annotated[str, typer.Argument(help="'promoted', 'latest' or a number.")] = "promoted",
    root: Root = Path("registry"),
) -> None:
    """Print the folder of NAME at VERSION after checking its files' sha256 (for scripts and servers).

    Example: ADAPTER=$(vislora registry resolve fmnist promoted)
    """
    from vislora.registry import Registry

    print(Registry(root).resolve(name, version))
