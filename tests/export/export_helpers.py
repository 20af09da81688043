"""Shared pieces of the export tests: tiny trained runs (built once per session), and a way to run code where
vislora cannot be imported.

Not a conftest.py: a second conftest module would shadow tests/conftest.py for other folders' imports.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers

from synthetic_images import image_folder, tiny_train_config
from vislora.export import export_onnx_dir
from vislora.run_config import TrainConfig
from vislora.train.trainer import Trainer

TINY_DINOV2 = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
               "image_size": 32, "patch_size": 8}
TIMM = {"spec": "timm:vit_tiny_patch16_224", "pretrained": False,
        "kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}}
PRELUDE = """import sys, json
sys.modules['vislora'] = None
try:
    import vislora
except ImportError:
    pass
else:
    raise SystemExit('vislora is importable')
"""


@functools.cache
def session_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="vislora-export-tests-"))
    atexit.register(shutil.rmtree, root, True)
    return root


@functools.cache
def data_dirs() -> dict[str, Path]:
    """32-px PNG folders, 3 classes: train (8 per class) and val (4 per class)."""
    root = session_root() / "data"
    return {"train": image_folder(root / "train", per_class=8), "val": image_folder(root / "val", per_class=4, seed=1)}


@functools.cache
def dinov2_dir() -> Path:
    """A tiny randomly initialised Dinov2Model saved with save_pretrained (loadable as hf:<dir>, same weights)."""
    folder = session_root() / "tiny-dinov2"
    torch.manual_seed(0)
    transformers.Dinov2Model(transformers.Dinov2Config(**TINY_DINOV2)).save_pretrained(folder)
    return folder


@functools.cache
def dinov2_run() -> Path:
    """Adapter folder of a real run: LoRA on q, v of the tiny DINOv2 + a linear head on the CLS token."""
    return train(session_root() / "runs" / "dinov2", data_dirs(), {"spec": f"hf:{dinov2_dir()}"})


@functools.cache
def int8_export():
    """One fp32 + INT8 export of the tiny DINOv2 run, calibrated on its training images, scored on val (INT8 settings
    for the CPU running the tests)."""
    return export_onnx_dir(dinov2_run(), session_root() / "onnx-int8", int8=True, calibration=data_dirs()["train"],
                           latency_batch=4)


def train(out: Path, data: dict[str, Path], model: dict, val: bool = True, steps: int = 6) -> Path:
    """Train a tiny run; returns its adapter folder. (6 steps at lr 5e-3: the tiny DINOv2 scores 8/12 on val, so
    accuracies compared in the tests are neither 0 nor 1.)"""
    config = tiny_train_config(out, data["train"], data["val"] if val else None)
    config["model"] = model
    config["optim"].update(max_steps=steps, lr_adapter=5e-3, lr_head=5e-3)
    torch.manual_seed(0)
    return Trainer(TrainConfig.parse(config)).fit().adapter_dir


def run_without_vislora(script: str, **paths: Path) -> dict:
    """Run `script` in a fresh interpreter where `import vislora` fails; it prints one JSON object."""
    args = [sys.executable, "-c", PRELUDE + script, *(f"{k}={v}" for k, v in paths.items())]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def save_array(path: Path, tensor: torch.Tensor) -> Path:
    np.save(path, tensor.detach().numpy())
    return path
