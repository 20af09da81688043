"""Tiny trained runs for the search tests, built once per session: a classifier run (the serve tests' tiny timm ViT)
and a dual-encoder run (the VLM tests' tiny DINOv2 + BERT pair), each with a second version of its adapter (the same
run's adapter with other weights), and a folder of synthetic colour images to index.

Not a conftest.py (see tests/serve/serving.py); tests/vlm's fixtures are imported from their folder.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

import vislora
from synthetic_images import image_folder, tiny_train_config
from vislora.run_config import TrainConfig
from vislora.runs import load_trained, load_trained_dual
from vislora.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "vlm"))
from dual_fixtures import dual_train_config, save_towers

_RUNS: dict = {}


def build_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """{"classifier", "classifier_v2", "dual", "dual_v2": adapter folders, "images": image folder}."""
    if not _RUNS:
        _RUNS.update(_build(tmp_path_factory))
    return _RUNS


def second_version(adapter: Path, out: Path, seed: int, dual: bool) -> Path:
    """A copy of `adapter` with every adapter tensor moved by seeded noise, inside the same run (a random-init base is
    rebuilt from the run's seed, read beside the folder)."""
    model, _ = (load_trained_dual if dual else load_trained)(adapter)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter_parameters("default"):
            param.add_(torch.randn(param.shape, generator=gen) * 0.3)
    vislora.save_adapter(model, out, "default")
    shutil.copy(adapter / "task.json", out / "task.json")
    return out


def _build(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("search")
    images = image_folder(root / "images", per_class=4)
    classifier = Trainer(TrainConfig.parse(tiny_train_config(root / "cls", images, optim={"max_steps": 2}))
                         ).fit().adapter_dir
    towers = save_towers(root / "towers")
    dual = Trainer(TrainConfig.parse(dual_train_config(root / "dual", towers, images,
                                                       optim={"batch_size": 6, "max_steps": 2}))).fit().adapter_dir
    return {"classifier": classifier, "classifier_v2": second_version(classifier, root / "cls" / "v2", 11, False),
            "dual": dual, "dual_v2": second_version(dual, root / "dual" / "v2", 12, True), "images": images}
