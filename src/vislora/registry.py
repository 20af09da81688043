"""A versioned adapter registry on disk: add, promote, roll back, prune; safe under concurrent CLI calls.

Layout under the root folder::

    index.json            every version's record and each name's promotion history (rewritten atomically)
    .lock                 file lock held by every change (filelock), so concurrent `vislora registry` calls queue
    <name>/<version>/     a copy of the adapter folder (adapter_config.json, adapter_model.safetensors, task.json)

A version is immutable once added: its files' sha256 are recorded and checked again by `resolve`.
`promote` makes a version the one served; `rollback` returns to the one promoted before it. `prune` keeps
the newest `keep_last` versions of each name and never deletes a version younger than `min_age_days`
(30 by default), the promoted version, or the previously promoted one.

The stable API for other components (e.g. the server) is `Registry(root).resolve(name, "promoted") -> Path`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from torch import nn

from vislora.errors import RegistryError
from vislora.export.common import is_dual, load_exportable
from vislora.io import atomic_write_text
from vislora.runs import load_trained_dual

logger = logging.getLogger(__name__)

FORMAT = 1
MIN_AGE_DAYS = 30
_HASH_CHUNK = 1 << 20
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_\-]{0,63}")  # also a valid adapter name in AdaptedModel



@dataclass
class AdapterVersion:
    """One registered adapter version (a row of index.json)."""

    name: str
    version: int
    created: str  # ISO 8601, UTC
    base: str | None
    base_fingerprint: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    source: str = ""
    note: str = ""

    @property
    def created_at(self) -> datetime:
        return datetime.fromisoformat(self.created)


def fingerprint(model: nn.Module, exclude: tuple[str, ...] = ()) -> str:
    """sha256 over a model's state dict: every tensor's name, shape, dtype and bytes (names under `exclude` skipped).

    Two models have the same fingerprint only if they hold the same weights, so an adapter is only served
    over the base it was trained on.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if any(name == p or name.startswith(p + ".") for p in exclude):
            continue
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(data.shape)}|{data.dtype}\n".encode())
        raw = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""  # a 0-d tensor too
        digest.update(hashlib.sha256(raw).digest())
    return digest.hexdigest()


def base_fingerprint(adapter_dir: Path, base: str | None = None) -> tuple[str | None, str]:
    """(base model spec, fingerprint of the base weights the adapter applies to, heads it trains excluded); a
    dual-encoder run's base is both towers with their projections."""
    if is_dual(adapter_dir):
        adapted, task = load_trained_dual(adapter_dir)
        spec = task["model"]["spec"]
    else:
        item = load_exportable(adapter_dir, base)
        adapted, spec = item.adapted, item.base
    saved = tuple(name for adapter in adapted.plans.values() for name in adapter.modules_to_save)
    model = adapted.unload(merge=False)
    return spec, fingerprint(model, exclude=saved)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def adapter_files(folder: Path) -> list[Path]:
    """The files of an adapter folder that the registry copies and hashes: every file below it but hidden ones."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith("."))


def file_hashes(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of `adapter_files(folder)`, as a version's record holds them (`files`)."""
    folder = Path(folder)
    return {str(f.relative_to(folder)): sha256_file(f) for f in adapter_files(folder)}


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Registry:
    """Versioned adapters under `root`. Every change holds `root/.lock` and rewrites index.json atomically."""

    def __init__(self, root: str | Path, clock: Callable[[], datetime] = _utcnow, lock_timeout: float = 60) -> None:
        self.root = Path(root)
        self.clock = clock
        self.lock_timeout = lock_timeout

    def _locked(self) -> FileLock:
        """The registry's file lock (held across processes); readers need none, index.json is replaced whole."""
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / ".lock"), timeout=self.lock_timeout)

    # ---------------------------------------------------------------- reading
    def _read(self) -> dict[str, Any]:
        index = self.root / "index.json"
        if not index.is_file():
            return {"format": FORMAT, "adapters": {}}
        data = json.loads(index.read_text())
        if data.get("format") != FORMAT:
            raise RegistryError(f"{index} has format {data.get('format')!r}; this vislora reads format {FORMAT}")
        return data

    def _write(self, data: dict[str, Any]) -> None:
        atomic_write_text(self.root / "index.json", json.dumps(data, indent=2, sort_keys=True) + "\n")

    def names(self) -> list[str]:
        return sorted(self._read()["adapters"])

    def versions(self, name: str | None = None) -> list[AdapterVersion]:
        """Every version (of `name`, or of all names), oldest first."""
        adapters = self._read()["adapters"]
        names = [name] if name else sorted(adapters)
        rows = [row for n in names for row in self._entry(adapters, n)["versions"].values()]
        return [AdapterVersion(**row) for row in sorted(rows, key=lambda r: (r["name"], r["version"]))]

    def promoted(self, name: str) -> int | None:
        history = self._entry(self._read()["adapters"], name)["history"]
        return history[-1] if history else None

    def get(self, name: str, version: int | str = "promoted") -> AdapterVersion:
        """A version by number, or "promoted", or "latest"."""
        entry = self._entry(self._read()["adapters"], name)
        number = self._number(name, entry, version)
        return AdapterVersion(**entry["versions"][str(number)])

    def resolve(self, name: str, version: int | str = "promoted", verify: bool = True) -> Path:
        """The folder holding adapter `name` at `version` ("promoted", "latest" or a number), hashes checked."""
        record = self.get(name, version)
        folder = self.root / name / str(record.version)
        if verify:
            self._verify(record, folder)
        return folder

    # ---------------------------------------------------------------- changing
    def add(self, name: str, adapter_dir: str | Path, metrics: Mapping[str, float] | None = None,
            base: str | None = None, note: str = "", promote: bool = False) -> AdapterVersion:
        """Copy `adapter_dir` in as the next version of `name` (1, 2, ...); the base fingerprint is computed."""
        if not _NAME.fullmatch(name):
            raise RegistryError(f"adapter name {name!r} is not allowed; use a letter then letters, digits, '_' or '-'")
        adapter_dir = Path(adapter_dir)
        base_spec, print_ = base_fingerprint(adapter_dir, base)  # outside the lock: it loads the base model
        metrics = dict(metrics) if metrics is not None else _run_metrics(adapter_dir)
        with self._locked():
            data = self._read()
            entry = data["adapters"].setdefault(name, {"versions": {}, "history": []})
            version = self._next_version(name, entry)
            folder = self.root / name / str(version)
            files = self._copy_in(adapter_dir, folder)
            record = AdapterVersion(name, version, self.clock().isoformat(), base_spec, print_, metrics, files,
                                    str(adapter_dir.resolve()), note)
            entry["versions"][str(version)] = asdict(record)
            if promote:
                entry["history"].append(version)
            self._write(data)
        return record

    def promote(self, name: str, version: int | str = "latest") -> AdapterVersion:
        """Make `version` the promoted one; the version promoted before becomes the rollback target."""
        with self._locked():
            data = self._read()
            entry = self._entry(data["adapters"], name)
            number = self._number(name, entry, version)
            self._verify(AdapterVersion(**entry["versions"][str(number)]), self.root / name / str(number))
            if entry["history"][-1:] != [number]:
                entry["history"].append(number)
                self._write(data)
            return AdapterVersion(**entry["versions"][str(number)])

    def rollback(self, name: str) -> AdapterVersion:
        """Promote again the version promoted before the current one; returns it."""
        with self._locked():
            data = self._read()
            entry = self._entry(data["adapters"], name)
            if len(entry["history"]) < 2:
                current = entry["history"][-1] if entry["history"] else None
                raise RegistryError(f"{name} has no earlier promoted version to roll back to (promoted: {current}); "
                                    f"promote a version with `vislora registry promote {name} VERSION`")
            entry["history"].pop()
            self._write(data)
            return AdapterVersion(**entry["versions"][str(entry["history"][-1])])

    def prune(self, keep_last: int = 3, min_age_days: float = MIN_AGE_DAYS,
              dry_run: bool = False) -> list[AdapterVersion]:
        """Delete versions beyond the newest `keep_last` of each name, except young, promoted and previous ones."""
        if keep_last < 0 or min_age_days < MIN_AGE_DAYS:
            raise RegistryError(f"retention keeps versions younger than {MIN_AGE_DAYS} days at least (got "
                                f"min_age_days={min_age_days}) and keep_last >= 0 (got {keep_last})")
        cutoff = self.clock() - timedelta(days=min_age_days)
        with self._locked():
            data = self._read()
            removed = []
            for entry in data["adapters"].values():
                protected = set(entry["history"][-2:])
                numbers = sorted(int(v) for v in entry["versions"])
                for number in numbers[:max(len(numbers) - keep_last, 0)]:
                    record = AdapterVersion(**entry["versions"][str(number)])
                    if number in protected or record.created_at > cutoff:
                        continue
                    removed.append(record)
                    if not dry_run:
                        del entry["versions"][str(number)]
                        entry["history"] = _without(entry["history"], number)
            if not dry_run and removed:
                self._write(data)  # the index forgets them first: a crash leaves only unreferenced folders
                for record in removed:
                    shutil.rmtree(self.root / record.name / str(record.version), ignore_errors=True)
            return removed

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _entry(adapters: dict[str, Any], name: str) -> dict[str, Any]:
        if name not in adapters:
            known = ", ".join(sorted(adapters)) or "none yet"
            raise RegistryError(f"no adapter named {name!r} in the registry (known: {known}); add one with "
                                f"`vislora registry add {name} RUN/adapter`")
        return adapters[name]

    @staticmethod
    def _number(name: str, entry: dict[str, Any], version: int | str) -> int:
        numbers = sorted(int(v) for v in entry["versions"])
        if version == "promoted":
            if not entry["history"]:
                raise RegistryError(f"{name} has no promoted version; run `vislora registry promote {name} VERSION` "
                                    f"(versions: {numbers})")
            return entry["history"][-1]
        if version == "latest":
            if not numbers:
                raise RegistryError(f"{name} has no versions left")
            return numbers[-1]
        number = int(version) if str(version).isdigit() else None
        if number not in numbers:
            raise RegistryError(f"{name} has no version {version!r}; versions: {numbers} (or 'promoted', 'latest')")
        return number

    def _next_version(self, name: str, entry: dict[str, Any]) -> int:
        on_disk = [int(p.name) for p in (self.root / name).glob("*") if p.name.isdigit()]
        return max([0, *map(int, entry["versions"]), *on_disk]) + 1  # a crashed add's folder is never reused

    def _copy_in(self, source: Path, folder: Path) -> dict[str, str]:
        staging = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.partial")
        files = adapter_files(source)
        try:
            for file in files:
                target = staging / file.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, target)
            hashes = file_hashes(staging)
            os.rename(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return hashes

    @staticmethod
    def _verify(record: AdapterVersion, folder: Path) -> None:
        for relative, expected in record.files.items():
            path = folder / relative
            if not path.is_file() or sha256_file(path) != expected:
                state = "is missing" if not path.is_file() else "was modified"
                raise RegistryError(f"{path} {state} since {record.name} v{record.version} was registered "
                                    f"(sha256 {expected[:12]}...); re-add the adapter as a new version")


def _without(history: list[int], number: int) -> list[int]:
    """`history` minus `number`, with the repeats that leaves side by side collapsed."""
    out: list[int] = []
    for v in history:
        if v != number and out[-1:] != [v]:
            out.append(v)
    return out


def _run_metrics(adapter_dir: Path) -> dict[str, float]:
    """The final held-out metrics of the run that wrote `adapter_dir` (its summary.json), if any."""
    summary = adapter_dir.parent / "summary.json"
    if adapter_dir.name != "adapter" or not summary.is_file():
        return {}
    final = json.loads(summary.read_text()).get("final") or {}
    return {k: float(v) for k, v in final.items()}
