"""Files: atomic writes (a temp file in the same folder, fsynced, renamed over the target), and config files read
as mappings with `key.path=value` overrides applied."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from vislora.errors import ConfigError


def _read_umask() -> int:
    current = os.umask(0)  # the only way to read the umask is to set it; done once, at import, not per write
    os.umask(current)
    return current


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it is fsynced and renamed onto `path`.

    On any error the temp file is removed and `path` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; the result should read like any file the user writes
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp_path)` and move the result onto `path` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def fsync(path: str | Path) -> None:
    """Flush a file's data, or a folder's entries (after a rename into it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_mapping(path: str | Path, what: str, hint: str) -> dict[str, Any]:
    """The mapping in a YAML (or .json) file, or a ConfigError naming the file, what is wrong and `hint`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist; {hint}")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from None
    if not isinstance(data or {}, dict):
        raise ConfigError(f"{path} must hold a mapping ({hint}), found {type(data).__name__}")
    return data or {}


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`["optim.max_steps=100", "adapter.targets=[q, v]"]` applied to a nested mapping (copied); values are YAML."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value (example: --set optim.max_steps=200)")
        node = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    return data
