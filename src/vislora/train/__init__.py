"""Training: config, Accelerate-based trainer, schedules, checkpoints."""

