"""`vislora <command>`: a thin typer layer over the library.

Every module of this package adds its commands to the one `app` (vislora.cli.app) when it is imported, and
this file imports them all: a new command group is a new module here, with no edit to a shared file.
"""

import importlib
import pkgutil

from vislora.cli.app import app, console, run

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("app", "__main__"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["app", "console", "run"]
