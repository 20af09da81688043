"""Training: the Accelerate-based trainer, its tasks, schedules, stages, checkpoints and gradient monitor.

The run config schema is vislora.run_config; opening a finished run is vislora.runs, and scoring it
vislora.evaluate. Import from the submodules (`vislora.train.trainer`, ...): this package stays light so the CLI
starts fast.
"""
