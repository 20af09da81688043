"""Where the served base model and adapters come from: a base config, or the task.json `vislora train` writes.

An adapter directory from `vislora train` names its base model, classes and input transform in task.json; the
server builds its base from the first such adapter (as `vislora eval` does) and checks every later adapter was
trained on the same base with the same input transform, so no request is preprocessed for the wrong model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vislora.data.tiling import image_spec
from vislora.data.transforms import InputSpec, model_input_spec
from vislora.dual_encoder import build_dual_encoder
from vislora.errors import AdapterFileError, ConfigError
from vislora.formats import ADAPTER_FILES, CONFIG_FILE, PICKLE_SUFFIXES, WEIGHTS_FILE
from vislora.input_size import fit_input_size, spec_with_size
from vislora.runs import (
    DUAL_TASKS,
    GENERATIVE_TASKS,
    TASK_FILE,
    check_rebuildable,
    input_spec,
    model_spec,
    resized_spec,
    run_seed,
)
from vislora.serve.config import BaseSection
from vislora.tasks.classification import build_classifier
from vislora.tasks.tiled import build_tiled_classifier
from vislora.vlm import Vlm, build_vlm

logger = logging.getLogger(__name__)

REGISTRY = "registry:"


@dataclass(frozen=True)
class AdapterSource:
    """An adapter directory and what it says about itself."""

    path: Path  # the adapter folder
    reference: str  # as given: a directory or registry:NAME@VERSION
    task: dict[str, Any] | None  # task.json, when `vislora train` wrote the directory
    digest: str  # sha256 of the weights file, first 16 hex digits: which file a response came from
    base_fingerprint: str | None = None  # registry adapters: the base weights they were registered against

    @property
    def classes(self) -> list[str] | None:
        return list(self.task["classes"]) if self.task else None


def locate(reference: str | Path, registry: str | Path | None = None) -> tuple[Path, str | None]:
    """(adapter folder, base fingerprint) `reference` names: a directory (no fingerprint), or
    `registry:NAME[@VERSION]` (VERSION a number, "latest" or "promoted", the default) resolved in the registry at
    `registry`, its file hashes checked."""
    text = str(reference)
    if not text.startswith(REGISTRY):
        return Path(reference).expanduser(), None
    if registry is None:
        raise ConfigError(f"{text!r} names a registry adapter, but no registry is set; give `registry: ROOT` in the "
                          "serve config (or --registry ROOT)")
    from vislora.registry import Registry

    name, _, version = text.removeprefix(REGISTRY).partition("@")
    store = Registry(registry)
    record = store.get(name, version or "promoted")
    return store.resolve(name, record.version), record.base_fingerprint


def open_source(reference: str | Path, registry: str | Path | None = None) -> AdapterSource:
    """Read an adapter's task.json and weights digest (a directory or a registry reference, see `locate`);
    nothing is loaded into a model yet."""
    path, base_print = locate(reference, registry)
    if path.suffix in PICKLE_SUFFIXES:
        raise AdapterFileError(f"refusing {path}: pickle files can run code when loaded; serve safetensors adapter "
                               "directories (vislora and PEFT write them)")
    folder = path.parent if path.suffix == ".safetensors" else path
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():  # the folder's other files are not listed: they may be anyone's
        raise AdapterFileError(f"{folder} is not an adapter directory: " + (
            f"{WEIGHTS_FILE} is missing ({ADAPTER_FILES})" if folder.is_dir() else "the folder does not exist"))
    task_file = folder / TASK_FILE
    task = None
    if task_file.is_file():
        try:
            task = json.loads(task_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterFileError(f"{task_file} is not valid JSON ({exc}); the file is corrupt or truncated") from None
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    return AdapterSource(folder, str(reference), task, digest, base_print)


def base_from_task(task: dict[str, Any]) -> BaseSection:
    """The base model section an adapter's task.json describes (a classifier's classes become the head width)."""
    kind = task.get("task", "classification")
    if kind in GENERATIVE_TASKS:
        return generative_base(task)
    model = task["model"]
    common = {"spec": model["spec"], "pretrained": model.get("pretrained", True),
              "pooling": model.get("pooling", "cls"), "kwargs": model.get("kwargs", {}),
              "image_size": task["input"]["size"]}
    if kind in DUAL_TASKS:
        check_rebuildable(task, "this adapter", fix="serve it from a DualEngine built on that model in Python "
                          "(DualEngine(AdaptedModel(model), ...))")
        return BaseSection(kind="dual_encoder", text=model.get("text"), embed_dim=model.get("embed_dim", 256),
                           text_pooling=model.get("text_pooling", "mean"), **common)
    if kind not in ("classification", "multilabel"):
        raise AdapterFileError(f"this adapter was trained for the {kind!r} task; the server serves classification, "
                               f"multilabel, dual-encoder ({', '.join(DUAL_TASKS)}) and generative "
                               f"({', '.join(GENERATIVE_TASKS)}) adapters")
    return BaseSection(head=model.get("head", "auto"), num_classes=len(task["classes"]), tiling=task.get("tiling"),
                       **common)


VLM_OPTIONS = ("connector_hidden", "seed", "max_length", "system")  # build_vlm's options a task.json `vlm` records


def generative_base(task: dict[str, Any]) -> BaseSection:
    """The generative base a captioning or VQA adapter's task.json `vlm` record describes."""
    check_rebuildable(task, "this adapter", fix="serve it from a GenerativeEngine built on that model in Python")
    record = task.get("vlm") or {}
    if "spec" not in record:
        raise AdapterFileError(f"this {task.get('task')!r} adapter's task.json has no `vlm` record naming its base; "
                               "give base.spec and base.lm (kind: generative) in the serve config")
    return BaseSection(kind="generative", spec=record["spec"], lm=record.get("lm"), image_size=record.get("image_size"),
                       kwargs={key: record[key] for key in VLM_OPTIONS if record.get(key) is not None})


def build_vlm_base(section: BaseSection) -> Vlm:
    """The generative VLM a `kind: generative` base section describes (vislora.vlm.build_vlm)."""
    unknown = sorted(set(section.kwargs) - set(VLM_OPTIONS))
    if unknown:
        raise ConfigError(f"base.kwargs {unknown} are not options of a generative base; it takes {list(VLM_OPTIONS)}")
    return build_vlm(section.spec, section.lm, image_size=section.image_size, **section.kwargs)


def frozen_folders(source: AdapterSource) -> list[Path]:
    """The adapters a dual-encoder run was trained over (task.json `frozen`, kept active beneath it): relative
    paths are read from the working directory, as training read them."""
    folders = [Path(folder).expanduser() for folder in ((source.task or {}).get("frozen") or {}).values()]
    missing = [str(folder) for folder in folders if not folder.is_dir()]
    if missing:
        raise AdapterFileError(f"{source.path} was trained over the frozen adapters {missing} (task.json `frozen`), "
                               "which are not there; put them back, or fix the paths in task.json")
    return folders


def build_base(section: BaseSection, trained: AdapterSource | None = None) -> tuple[nn.Module, str | None, InputSpec]:
    """(model in eval mode, path of its classification head (None for a dual encoder), input transform spec) for
    the base section. Read from a `trained` adapter, the spec is its task.json's (serving preprocesses exactly as
    evaluation did) and a randomly initialised base is rebuilt from its run's seed, as `vislora eval` does."""
    recorded = model_spec(trained.task) if trained and trained.task else None
    with torch.random.fork_rng(devices=[]):
        if trained is not None and not section.pretrained:
            torch.manual_seed(run_seed(trained.path))
        elif not section.pretrained:
            logger.warning("base model %s built with random weights (pretrained: false): adapters trained on another "
                           "random draw of it will not reproduce their results", section.spec)
        if section.kind == "dual_encoder":
            model, head = _dual_encoder(section), None
        else:
            model, head = _classifier(section, recorded.native_size if recorded else None)
    backbone = model.vision_tower if head is None else getattr(model, "backbone", model)
    if head is None:
        fit_input_size(backbone, section.image_size)
    spec = spec_with_size(recorded or model_input_spec(backbone, section.image_size), backbone)
    return model.eval(), head, image_spec(spec, section.tiling)  # a tiled base takes whole images


def _classifier(section: BaseSection, native_size: int | None) -> tuple[nn.Module, str]:
    if section.tiling is None:
        return build_classifier(section.spec, section.num_classes, section.pretrained, section.head, section.pooling,
                                section.image_size, native_size=native_size, **section.kwargs)
    model = build_tiled_classifier(section.spec, section.num_classes, section.tiling, section.pretrained,
                                   section.head, section.pooling, section.image_size, native_size=native_size,
                                   **section.kwargs)
    return model, model.head_path


def _dual_encoder(section: BaseSection) -> nn.Module:
    return build_dual_encoder(section.spec, section.text, pretrained=section.pretrained, embed_dim=section.embed_dim,
                              vision_pooling=section.pooling, text_pooling=section.text_pooling, **section.kwargs)


def check_base_weights(name: str, source: AdapterSource, base_print: str | None, head: str | None
                       ) -> None:
    """Refuse a registry adapter registered against other base weights than the served base's (the registry's
    fingerprint leaves out the modules the adapter trains in full; compared when those are just the head)."""
    if source.base_fingerprint is None or base_print is None:
        return
    saved = json.loads((source.path / CONFIG_FILE).read_text()).get("modules_to_save") or []
    if list(saved) != ([head] if head else []):
        logger.info("adapter %r trains %s in full: its base fingerprint is not compared", name, saved)
        return
    if source.base_fingerprint != base_print:
        raise AdapterFileError(f"adapter {name!r} ({source.reference}) was registered against other base weights "
                               f"(fingerprint {source.base_fingerprint[:12]}...) than this server's base "
                               f"({base_print[:12]}...); serve it from the base it was trained on")


def check_fits(name: str, source: AdapterSource, base: BaseSection, spec: InputSpec) -> None:
    """Refuse an adapter trained on another base model, with another head width or another input transform; one
    trained at another input size runs at the server's, with a VisloraWarning naming both sizes."""
    if source.task is None:
        return  # a bare PEFT/vislora directory: load_adapter checks its shapes against the model
    theirs = base_from_task(source.task)
    if theirs.kind != base.kind:
        raise AdapterFileError(f"adapter {name!r} ({source.path}) is a {theirs.kind} adapter ({source.task['task']!r} "
                               f"task) but this server's base is a {base.kind}; serve it from a server built on its "
                               "base")
    fields = ("kind", "spec", "pretrained", "pooling", "kwargs", *(
        ("text", "embed_dim", "text_pooling") if base.kind == "dual_encoder" else ("head", "num_classes", "tiling")))
    differ = {f: (getattr(theirs, f), getattr(base, f)) for f in fields if getattr(theirs, f) != getattr(base, f)}
    trained = input_spec(source.task)
    if trained.preprocessing() != spec.preprocessing():
        differ["input transform"] = (trained.preprocessing(), spec.preprocessing())
    if differ:
        listed = "; ".join(f"{f}: adapter {a!r}, server {b!r}" for f, (a, b) in differ.items())
        raise AdapterFileError(f"adapter {name!r} ({source.path}) was trained for another base model than this "
                               f"server's ({listed}); serve it from a server built on its base")
    resized_spec(trained, spec.size, f"adapter {name!r} ({source.path})")
