"""A tiny trained multilabel run (colour tags, one rare tag), shared by the eval, report and serve tests."""

from __future__ import annotations

from pathlib import Path

from synthetic_images import tag_manifest, tiny_train_config
from vislora.run_config import TrainConfig
from vislora.train.rundir import TrainResult
from vislora.train.trainer import Trainer


def train_tiny_multilabel(root: Path, steps: int = 6) -> tuple[TrainResult, Path]:
    """(result, val manifest) of a multilabel run on 24 colour-tag images where 'yellow' is on 2 only (rare below
    5 training images), validated on 16 others."""
    train = tag_manifest(root / "data", n=24, seed=0, name="train.csv", rare="yellow")
    val = tag_manifest(root / "data", n=16, seed=1, name="val.csv")
    config = tiny_train_config(root / "run", train, val, optim={"batch_size": 8, "max_steps": steps,
                                                                "lr_adapter": 3e-3, "lr_head": 3e-2})
    config["task"] = {"kind": "multilabel", "multilabel": {"rare_below": 5}}
    return Trainer(TrainConfig.parse(config)).fit(), val
