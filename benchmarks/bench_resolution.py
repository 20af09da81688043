"""High resolution, measured (issue #16): input size, mixed-resolution training and tiling, on real weights and images.

DINOv2 ViT-S/14 (the bundled asset; it interpolates its position embeddings to any input size) and Fashion-MNIST,
scored on held-out test images. Every configuration runs in a fresh Python process, so its peak memory (peak
resident set, /proc VmHWM; on a GPU also the CUDA peak allocated) is its own.

A. The demo setup (vislora.train.demo.demo_config: LoRA r=8 on q and v plus the head, the head starting from the
   linear probe, LP-FT) at 56, 112 and 224 px: linear probe and LoRA test accuracy, seconds per step, peak memory,
   with ratios to 56 px. LoRA's step is the median wall time between the ends of consecutive optimizer steps; the
   probe's "step" is its frozen forward passes plus the fit, per batch of images. Every size trains on the same
   images; a step costs more the more tokens it has (16x as many at 224 px as at 56), so the steps shrink with the
   size (printed).
B. Mixing resolutions: LoRA trained at 112 px only (A's 112 px run) vs on a mix of 56, 112 and 224 px
   (data.image_sizes: each step's batch at one of them), the same steps from the same probe, both evaluated on the
   test images at 56, 112 and 224 px (vislora.runs.load_trained(..., image_size=N)).
C. Tiling: 4x4 Fashion-MNIST mosaics at 448 px (112 px cells; benchmarks/mosaics.py), "which of the 10 classes does
   it hold" (task.kind multilabel). LoRA on the mosaic resized to 112 px vs on its 16 tiles of 112 px (each at
   --tile-input px) aggregated by --aggregate (data.tiling); test mAP, micro/macro F1 and per-class F1 at the
   thresholds each run tuned on the validation mosaics. Then one mosaic's inference at 448, 896 and 1792 px: the
   whole image through the interpolating backbone vs tiled (tiles_per_step fixed), peak memory and seconds.

    python benchmarks/bench_resolution.py --out resolution.json     # sized for ~20 min on 2 quiet cores
    python benchmarks/bench_resolution.py --quick --parts A         # a smoke test of the script, < 2 min
    python benchmarks/bench_resolution.py --work runs/res           # keep the runs; a rerun reuses finished jobs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from vislora.assets import FASHION_MNIST_CLASSES
from vislora.data.datasets import collate
from vislora.data.transforms import InputSpec, SampleTransform, build_transform
from vislora.evaluate.classifier import open_eval_data
from vislora.evaluate.multilabel import multilabel_metrics
from vislora.evaluate.multilabel_comparison import open_multilabel_data
from vislora.model import AdaptedModel
from vislora.run_config import TrainConfig
from vislora.runs import load_trained
from vislora.tasks.classification import predict_rows, summarize
from vislora.tasks.multilabel import attribute_scores, saved_attributes, saved_thresholds
from vislora.tasks.tiled import TiledClassifier
from vislora.train.callbacks import TrainerCallback
from vislora.train.demo import demo_config, linear_probe
from vislora.train.schedule import parameter_groups
from vislora.train.trainer import Trainer
from vislora.train.view import TrainerView

sys.path.insert(0, str(Path(__file__).parent))
from mosaics import CELL, make_mosaics

SIZES = (56, 112, 224)
NATIVE = 112  # part B's single-resolution run
MOSAIC_GRID, MOSAIC_SCALE = 4, 4  # 4x4 mosaics of 28 px items, enlarged 4x: 448 px canvases of 112 px cells
CANVAS = MOSAIC_GRID * CELL * MOSAIC_SCALE
TILE = CANVAS // MOSAIC_GRID
FULL = {"train_images": 600, "test_images": 300, "batch_size": 32, "steps": "56:100,112:50,224:15",
        "mosaics": "320,100,200", "tagger_steps": 24, "tagger_batch": 16, "memory_sizes": "448,896,1792"}
QUICK = {"train_images": 32, "test_images": 32, "batch_size": 4, "steps": "56:3,112:2,224:2",
         "mosaics": "16,8,8", "tagger_steps": 2, "tagger_batch": 4, "memory_sizes": "448,896"}


# ------------------------------------------------------------------------------------------ in the child process
def peak_memory(loaded: float) -> dict[str, float | None]:
    """This process's peak resident memory so far, the resident memory `loaded` it had once its model and data were
    loaded, and on a GPU its CUDA peak allocated (all MiB)."""
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"peak_rss_mib": proc_status("VmHWM"), "loaded_rss_mib": loaded, "cuda_peak_mib": cuda}


def proc_status(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


class StepTimer(TrainerCallback):
    """Wall time between the ends of consecutive optimizer steps: each a whole step (data, forward, backward,
    update, logging)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, trainer: TrainerView, taken: bool) -> None:
        self.ends.append(time.perf_counter())

    def median(self) -> float:
        gaps = [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)]
        return statistics.median(gaps) if gaps else float("nan")


def classifier_config(job: dict[str, Any]) -> TrainConfig:
    """The demo's run at `job`'s size, steps and image counts, plus its extra data keys (data.image_sizes); no
    progress bar, no gradient monitor (its per-layer norms would count in the step time)."""
    config = demo_config(Path(job["dir"]) / "run", job["steps"], job["batch_size"], job["train_images"],
                         job["test_images"], job["size"], job["seed"]).model_dump(mode="json")
    config["data"].update(job.get("data", {}))
    config["run"].update(progress=False, monitor_gradients=False)
    return TrainConfig.parse(config)


def tagger_config(job: dict[str, Any]) -> TrainConfig:
    """Multilabel LoRA r=8 on q and v plus the head (from scratch, so at the head's default rate) on the mosaics;
    tiled when `job` has a tiling section."""
    manifests = job["manifests"]
    data = {"train": manifests["train"], "val": manifests["val"], "image_size": job["size"]}
    if job.get("tiling"):
        data["tiling"] = job["tiling"]
    return TrainConfig.parse({
        "model": {"spec": "asset:dinov2-small"},
        "task": {"kind": "multilabel"},
        "adapter": {"targets": ["q", "v"], "rank": 8, "alpha": 16},
        "data": data,
        "optim": {"batch_size": job["batch_size"], "max_steps": job["steps"], "lr_adapter": 3e-3, "lr_head": 1e-2,
                  "warmup_steps": 5},
        "run": {"output_dir": str(Path(job["dir"]) / "run"), "seed": job["seed"], "progress": False},
    })


def probe_job(job: dict[str, Any]) -> dict[str, Any]:
    """The linear probe at one size; its head is saved for the LoRA runs that start from it."""
    trainer = Trainer(classifier_config(job))
    loaded = proc_status("VmRSS")
    started = time.perf_counter()
    probe = linear_probe(trainer, trainer.train_data, trainer.val_data)
    seconds = time.perf_counter() - started
    save_file({"weight": probe.weight, "bias": probe.bias}, str(Path(job["dir"]) / "probe.safetensors"))
    images = len(trainer.train_data) + len(trainer.val_data)
    return {"accuracy": probe.accuracy, "seconds": seconds, "step_s": seconds * job["batch_size"] / images,
            "train_images": len(trainer.train_data), "test_images": len(trainer.val_data), **peak_memory(loaded)}


def lora_job(job: dict[str, Any]) -> dict[str, Any]:
    """LoRA from the probe's head (LP-FT), trained and scored on the test images by the trainer."""
    timer = StepTimer()
    trainer = Trainer(classifier_config(job), callbacks=[timer])
    loaded = proc_status("VmRSS")
    probe = load_file(job["probe"])
    _, head = parameter_groups(trainer.adapted)
    with torch.no_grad():
        head[0].copy_(probe["weight"])
        head[1].copy_(probe["bias"])
    result = trainer.fit()
    return {"accuracy": result.final["accuracy"], "step_s": timer.median(), "train_s": result.seconds,
            "steps": result.steps, "adapter_dir": str(result.adapter_dir), **peak_memory(loaded)}


def accuracy_job(job: dict[str, Any]) -> dict[str, Any]:
    """A trained classifier's test accuracy with its input at each of `job`'s sizes."""
    accuracy = {}
    for size in job["sizes"]:
        model, task = load_trained(job["adapter_dir"], image_size=size)
        check_size(task["input_spec"], size)
        dataset = open_eval_data(task, "fashion-mnist:test", job["test_images"], seed=job["seed"])
        loader = torch.utils.data.DataLoader(dataset, batch_size=64, collate_fn=collate, generator=torch.Generator())
        rows, _ = predict_rows(model, loader)
        accuracy[str(size)] = summarize(rows, task["classes"]).accuracy
    return {"accuracy": accuracy}


def check_size(spec: InputSpec, size: int) -> None:
    if spec.size != size:
        raise RuntimeError(f"load_trained(..., image_size={size}) gave an input transform of {spec.size} px; the "
                           "figures at other sizes would be wrong")


def open_tagger(adapter_dir: str, tiled: bool, size: int) -> tuple[AdaptedModel, InputSpec, dict[str, Any]]:
    """A trained tagger rebuilt from its adapter folder, the transform of its input at `size` px, and its task.json.

    Untiled: the backbone interpolates its position embeddings to `size`. Tiled: the model of the tiling work
    (vislora.tasks.tiled.TiledClassifier) cuts the whole image, `size` px on a side, into tiles itself. This is the
    one place that knows how a tiled run is opened; adjust it here if that API differs."""
    if not tiled:
        model, task = load_trained(adapter_dir, image_size=size)
        check_size(task["input_spec"], size)
        return model, task["input_spec"], task
    model, task = load_trained(adapter_dir)
    if not any(isinstance(module, TiledClassifier) for module in model.modules()):
        raise RuntimeError(f"load_trained({adapter_dir}) did not rebuild a TiledClassifier for a tiled run; the tiled "
                           "figures would measure an untiled model")
    return model, dataclasses.replace(task["input_spec"], size=size), task


def tagger_job(job: dict[str, Any]) -> dict[str, Any]:
    """A multilabel run on the mosaics (resized or tiled), then its test figures at the thresholds it tuned on the
    validation mosaics."""
    timer = StepTimer()
    trainer = Trainer(tagger_config(job), callbacks=[timer])
    loaded = proc_status("VmRSS")
    result = trainer.fit()
    figures = {"step_s": timer.median(), "train_s": result.seconds, "steps": result.steps,
               "adapter_dir": str(result.adapter_dir), **peak_memory(loaded)}
    model, spec, task = open_tagger(figures["adapter_dir"], bool(job.get("tiling")), job["eval_size"])
    dataset = open_multilabel_data(task, job["manifests"]["test"])
    dataset.transform = SampleTransform(build_transform(spec, train=False), job["seed"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=job["batch_size"], collate_fn=collate,
                                         generator=torch.Generator())
    attributes = saved_attributes(task)
    scores, targets = [], []
    with torch.inference_mode():
        for batch in loader:
            scores.append(attribute_scores(model(batch["image"]).float(), attributes))
            targets.append(batch["label"])
    metrics = multilabel_metrics(torch.cat(scores), torch.cat(targets), list(attributes.names), saved_thresholds(task),
                                 train_counts=task["train_counts"])
    return {**figures, "map": metrics.map, "micro_f1": metrics.micro_f1, "macro_f1": metrics.macro_f1,
            "test_mosaics": metrics.n, "ap": {a.name: a.ap for a in metrics.per_attribute},
            "f1": {a.name: a.f1 for a in metrics.per_attribute}}


def memory_job(job: dict[str, Any]) -> dict[str, Any]:
    """One mosaic's inference at `job`'s size, untiled or tiled: resident memory once the model is loaded, the peak,
    and the seconds of the forward pass."""
    model, spec, _ = open_tagger(job["adapter_dir"], job["tiled"], job["size"])
    picture = Image.open(job["picture"]).convert("RGB")
    pixels = build_transform(spec, train=False)(picture)[None]  # [1, 3, size, size]
    loaded = proc_status("VmRSS")
    started = time.perf_counter()
    with torch.inference_mode():
        model(pixels)
    return {"seconds": time.perf_counter() - started, **peak_memory(loaded)}


JOBS = {"probe": probe_job, "lora": lora_job, "accuracy": accuracy_job, "tagger": tagger_job, "memory": memory_job}


def child(job: dict[str, Any]) -> None:
    """Run one job and write what it measured to its folder's result.json."""
    torch.manual_seed(job["seed"])
    figures = JOBS[job["kind"]](job)
    (Path(job["dir"]) / "result.json").write_text(json.dumps({"job": job, **figures}, indent=2))


# ------------------------------------------------------------------------------------------ in the parent
def measured(work: Path, name: str, job: dict[str, Any]) -> dict[str, Any]:
    """What `job` measured, run in a fresh Python process (its peak memory its own); a job already run with the
    same settings in this work folder is read back instead."""
    folder = work / name
    job = {**job, "dir": str(folder)}
    result = folder / "result.json"
    if result.is_file() and json.loads(result.read_text())["job"] == job:
        return json.loads(result.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], check=True)
    print(f"  {name}: {time.perf_counter() - started:.0f} s", flush=True)
    return json.loads(result.read_text())


def classifier_job(args: argparse.Namespace, kind: str, size: int, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "size": size, "steps": args.steps[size], "batch_size": args.batch_size,
            "train_images": args.train_images, "test_images": args.test_images, "seed": args.seed, **extra}


def probed_lora(args: argparse.Namespace, work: Path, size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The probe and the LoRA run (from the probe) at one size."""
    probe = measured(work, f"probe-{size}", classifier_job(args, "probe", size))
    lora = measured(work, f"lora-{size}", classifier_job(
        args, "lora", size, probe=str(work / f"probe-{size}" / "probe.safetensors")))
    return probe, lora


def part_a(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    runs = {size: probed_lora(args, work, size) for size in SIZES}
    probe = runs[SIZES[0]][0]
    cuda = probe["cuda_peak_mib"] is not None
    print(f"\nA. input size: DINOv2 ViT-S/14 on Fashion-MNIST, {probe['train_images']} training and "
          f"{probe['test_images']} test images at each size, batch {args.batch_size}; x: ratio to {SIZES[0]} px")
    print(f"{'method':<9} {'px':>4} {'steps':>6} {'accuracy':>9} {'step s':>8} {'x':>6} {'peak RSS MiB':>13} "
          f"{'x':>5} {'over loaded':>12} {'x':>5}" + ("  CUDA peak MiB" if cuda else ""))
    figures = {}
    for index, method in enumerate(("probe", "LoRA r=8")):
        base = runs[SIZES[0]][index]
        for size in SIZES:
            run = runs[size][index]
            ratios = {"step": run["step_s"] / base["step_s"], "peak": run["peak_rss_mib"] / base["peak_rss_mib"],
                      "working": working(run) / working(base)}
            print(f"{method:<9} {size:>4} {run.get('steps', '-'):>6} {run['accuracy']:>9.4f} {run['step_s']:>8.3f} "
                  f"{ratios['step']:>6.2f} {run['peak_rss_mib']:>13.0f} {ratios['peak']:>5.2f} "
                  f"{working(run):>12.0f} {ratios['working']:>5.2f}"
                  + (f"  {run['cuda_peak_mib']:>13.0f}" if cuda else ""))
            figures[f"{method} {size}"] = {**run, "ratios": ratios}
    print("probe step: its frozen forward passes plus the fit, per batch of images; LoRA step: median optimizer step\n"
          "over loaded: peak minus the resident memory once model and data were loaded")
    return figures


def working(run: dict[str, Any]) -> float:
    """MiB a run's peak resident memory rose above what it held once its model and data were loaded."""
    return run["peak_rss_mib"] - run["loaded_rss_mib"]


def part_b(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    _, native = probed_lora(args, work, NATIVE)
    mixed = measured(work, "lora-mixed", classifier_job(
        args, "lora", NATIVE, probe=str(work / f"probe-{NATIVE}" / "probe.safetensors"),
        data={"image_sizes": list(SIZES)}))
    runs = {"native": native, "mixed": mixed}
    accuracy = {name: measured(work, f"accuracy-{name}", {
        "kind": "accuracy", "adapter_dir": run["adapter_dir"], "sizes": list(SIZES),
        "test_images": args.test_images, "seed": args.seed})["accuracy"] for name, run in runs.items()}
    print(f"\nB. mixed resolutions: LoRA r=8, {args.steps[NATIVE]} steps of {args.batch_size} from the {NATIVE} px "
          f"probe, trained at {NATIVE} px only vs at {'/'.join(map(str, SIZES))} px (a size per step); test accuracy")
    print(f"{'eval px':>7} {f'{NATIVE} only':>10} {'mixed':>8} {'points':>7}")
    for size in map(str, SIZES):
        a, b = accuracy["native"][size], accuracy["mixed"][size]
        print(f"{size:>7} {a:>10.4f} {b:>8.4f} {100 * (b - a):>+7.1f}")
    print(f"training: {NATIVE} px only {native['train_s']:.0f} s, mixed {mixed['train_s']:.0f} s")
    return {"steps": args.steps[NATIVE], "accuracy": accuracy, "train_s": {k: v["train_s"] for k, v in runs.items()}}


def part_c(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    train, val, test = args.mosaics
    manifests = {k: str(v) for k, v in make_mosaics(work / "mosaics", train, val, test, grid=MOSAIC_GRID, rare=(),
                                                     seed=args.seed, coarse=False, scale=MOSAIC_SCALE).items()}
    common = {"kind": "tagger", "manifests": manifests, "steps": args.tagger_steps, "batch_size": args.tagger_batch,
              "seed": args.seed}
    tiling = {"size": TILE, "overlap": 0, "aggregate": args.aggregate, "tiles_per_step": args.tiles_per_step,
              "image_size": CANVAS}
    runs = {"resized": measured(work, "tagger-resized", {**common, "size": NATIVE, "eval_size": NATIVE}),
            "tiled": measured(work, "tagger-tiled", {**common, "size": args.tile_input, "tiling": tiling,
                                                     "eval_size": CANVAS})}
    print_tagging(args, runs, (train, val, test))
    picture = str(Path(manifests["test"]).parent / "test" / "00000.png")
    modes = {"whole": "resized", "tiled": "tiled"}  # the whole image goes through the resized run's model
    memory = {f"{mode} {size}": measured(work, f"memory-{mode}-{size}", {
        "kind": "memory", "adapter_dir": runs[run]["adapter_dir"], "tiled": mode == "tiled", "size": size,
        "picture": picture, "seed": args.seed}) for size in args.memory_sizes for mode, run in modes.items()}
    print(f"\none mosaic's inference (batch 1): the whole image through the backbone vs {TILE} px tiles at "
          f"{args.tile_input} px input, {args.tiles_per_step} per backbone call; MiB over the loaded model in ()")
    print(f"{'px':>5} {'whole: peak RSS':>16} {'(+)':>8} {'s':>7} {'tiled: peak RSS':>16} {'(+)':>8} {'s':>7}")
    for size in args.memory_sizes:
        cells = [(m["peak_rss_mib"], working(m), m["seconds"])
                 for m in (memory[f"whole {size}"], memory[f"tiled {size}"])]
        print(f"{size:>5} " + " ".join(f"{p:>16.0f} {f'(+{d:.0f})':>8} {s:>7.2f}" for p, d, s in cells))
    return {"runs": runs, "tiling": tiling, "memory": memory}


def print_tagging(args: argparse.Namespace, runs: dict[str, dict[str, Any]], counts: tuple[int, int, int]) -> None:
    resized, tiled = runs["resized"], runs["tiled"]
    print(f"\nC. tiling: {MOSAIC_GRID}x{MOSAIC_GRID} mosaics at {CANVAS} px, {'/'.join(map(str, counts))} "
          f"train/val/test, LoRA r=8, {args.tagger_steps} steps of {args.tagger_batch}: resized to {NATIVE} px vs "
          f"{MOSAIC_GRID**2} tiles of {TILE} px at {args.tile_input} px, {args.aggregate} aggregation")
    print(f"{'':<14} {'resized':>9} {'tiled':>9} {'points':>7}")
    for key, label in (("map", "mAP"), ("micro_f1", "micro F1"), ("macro_f1", "macro F1")):
        print(f"{label:<14} {resized[key]:>9.4f} {tiled[key]:>9.4f} {100 * (tiled[key] - resized[key]):>+7.1f}")
    for name in FASHION_MNIST_CLASSES:
        a, b = resized["f1"][name], tiled["f1"][name]
        print(f"F1 {name:<11} {a:>9.4f} {b:>9.4f} {100 * (b - a):>+7.1f}")
    for label, a, b, digits in (("step s", resized["step_s"], tiled["step_s"], 3),
                                ("train peak MiB", resized["peak_rss_mib"], tiled["peak_rss_mib"], 0),
                                ("  over loaded", working(resized), working(tiled), 0)):
        print(f"{label:<14} {a:>9.{digits}f} {b:>9.{digits}f} {b / a:>6.2f}x")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="A,B,C", help="comma-separated parts to run (A, B, C)")
    parser.add_argument("--quick", action="store_true", help="tiny numbers, to check the script (< 2 min)")
    parser.add_argument("--out", type=Path, help="write every figure here as JSON")
    parser.add_argument("--work", type=Path, help="keep the runs here (default: a temporary folder); a rerun with "
                        "the same settings reuses the jobs that finished")
    parser.add_argument("--train-images", type=int, help=f"A, B: training images (default {FULL['train_images']})")
    parser.add_argument("--test-images", type=int, help=f"A, B: test images (default {FULL['test_images']})")
    parser.add_argument("--batch-size", type=int, help=f"A, B (default {FULL['batch_size']})")
    parser.add_argument("--steps", help=f"A, B: steps per size, px:steps (default {FULL['steps']}; B runs the "
                        f"{NATIVE} px count)")
    parser.add_argument("--mosaics", help=f"C: train,val,test mosaics (default {FULL['mosaics']})")
    parser.add_argument("--tagger-steps", type=int, help=f"C: steps of each run (default {FULL['tagger_steps']})")
    parser.add_argument("--tagger-batch", type=int, help=f"C: mosaics per step (default {FULL['tagger_batch']})")
    parser.add_argument("--tile-input", type=int, default=56, choices=(56, 112), help="C: model input of a tile, px")
    parser.add_argument("--aggregate", default="max", choices=("mean", "max", "attention"),
                        help="C: how tile outputs make the mosaic's")
    parser.add_argument("--tiles-per-step", type=int, default=16, help="C: tiles per backbone call")
    parser.add_argument("--memory-sizes", help=f"C: mosaic sides of the memory figure (default {FULL['memory_sizes']})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.parts = [p.strip().upper() for p in args.parts.split(",") if p.strip()]
    if set(args.parts) - {"A", "B", "C"}:
        parser.error(f"--parts takes A, B and C, got {','.join(args.parts)}")
    args.steps = {int(k): int(v) for k, v in (pair.split(":") for pair in args.steps.split(","))}
    if set(args.steps) != set(SIZES):
        parser.error(f"--steps needs a count for each of {SIZES}, got {args.steps}")
    args.mosaics = tuple(int(n) for n in args.mosaics.split(","))
    args.memory_sizes = [int(n) for n in args.memory_sizes.split(",")]
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    started = time.perf_counter()
    parts = {"A": part_a, "B": part_b, "C": part_c}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"steps per size: {', '.join(f'{s} px {n}' for s, n in args.steps.items())} (batch {args.batch_size})")
        figures = {part: parts[part](args, work) for part in args.parts}
    wall = time.perf_counter() - started
    print(f"\nwall time: {wall:.0f} s")
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k not in ("out", "work", "child")}
        args.out.write_text(json.dumps({"settings": settings, **figures, "wall_s": wall}, indent=2, default=str))
        print(f"figures written to {args.out}")


if __name__ == "__main__":
    main()
