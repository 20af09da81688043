"""`python -m vislora.cli`, and `accelerate launch -m vislora.cli train ...`."""

from vislora.cli import run

run()
