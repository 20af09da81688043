"""Least exposure: what a client (a request without the admin token) may learn about the server.

Server file paths (adapter folders, index folders, the registry and adapter root) are the admin's. A client's
view of an adapter holds the fields `expose.adapter_fields` names (no `source` or `path` by default), and every
error message a client gets has the server's known paths replaced by what they are, e.g.
`/srv/indexes/cats/vectors.f32` -> `<index cats>/vectors.f32`; the admin gets messages as they are.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import Request

from vislora.serve.config import ADAPTER_FIELDS
from vislora.serve.dependencies import is_admin
from vislora.serve.sources import REGISTRY

PRIVATE_PATHS = "private_paths"  # request.state attribute: more {path: what it is} a router knows of


def adapter_fields(request: Request) -> tuple[str, ...]:
    """The fields of a loaded adapter the requester may read: every one for the admin, else `expose`'s."""
    return ADAPTER_FIELDS if is_admin(request) else tuple(request.app.state.config.expose.adapter_fields)


def detail_for(request: Request, detail: str) -> str:
    """An error message as the requester may read it: as it is for the admin, else without server paths."""
    return detail if is_admin(request) else redact(detail, server_paths(request))


def server_paths(request: Request) -> dict[str, str]:
    """{path: what it is} for the paths this server knows: its adapters' folders, its indexes, the registry, the
    adapter root and a base model read from a folder (each as configured and resolved), plus those a router put
    on `request.state`."""
    config, engine = request.app.state.config, request.app.state.engine
    named = [(f"<adapter {record.name}>", record.path) for record in engine.adapters()]
    named += [(f"<adapter {name}>", source) for name, source in config.adapters.items()]
    named += [(f"<index {name}>", folder) for name, folder in config.indexes.items()]
    named += [("<registry>", config.registry), ("<adapter_root>", config.adapter_root)]
    local = engine.base.spec.partition(":")[2]  # hf:/models/vit: a folder of the server's; hf:org/id: a hub id
    named += [("<base model>", local)] if local and Path(local).expanduser().exists() else []
    paths = {variant: label for label, folder in named if folder and not folder.startswith(REGISTRY)
             for variant in _spellings(folder)}
    return paths | getattr(request.state, PRIVATE_PATHS, {})


def redact(text: str, paths: dict[str, str]) -> str:
    """`text` with every path of `paths` replaced by its label, longest paths first (an adapter folder inside
    the adapter root is named as the adapter)."""
    for path in sorted(paths, key=len, reverse=True):
        text = text.replace(path, paths[path])
    return text


def _spellings(folder: str) -> set[str]:
    """A folder as configured, expanded and resolved (messages quote any of them); never the filesystem root."""
    given = Path(folder).expanduser()
    return {s for s in (folder, str(given), str(given.resolve())) if s.strip("/")}
