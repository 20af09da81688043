"""Training: config, Accelerate-based trainer, schedules, checkpoints, evaluation of trained adapters.

Import from the submodules (`vislora.train.trainer`, `vislora.train.config`, ...): this package stays
light so the CLI starts fast.
"""
