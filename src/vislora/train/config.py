"""`vislora demo`'s budget. The run config schema itself, TrainConfig, lives in vislora.run_config."""

from vislora.run_config import TrainConfig

__all__ = ["DEMO_DEFAULTS", "TrainConfig"]  # TrainConfig: train/demo.py reads it from here

# under 5 minutes on 2 CPU cores (see vislora.train.demo)
DEMO_DEFAULTS = {"steps": 150, "batch_size": 32, "train_images": 2000, "test_images": 1000, "image_size": 112}
