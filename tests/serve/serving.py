"""Served adapters for the serve tests: one trained by the real Trainer, others derived from it with fixed seeds,
and offline references computed without the engine (a separately loaded model per adapter).

Not a conftest.py: a second conftest module would shadow tests/conftest.py for the `from conftest import ...` of
other test folders. Each test module declares `served` as a fixture calling `build_served`, cached per session.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

import vislora
from synthetic_images import class_image, image_folder, tiny_train_config
from vislora.data.transforms import build_transform
from vislora.run_config import TrainConfig
from vislora.runs import load_trained
from vislora.serve import Engine, ServeConfig, build_engine
from vislora.train.trainer import Trainer

N_ADAPTERS = 6


@dataclass(frozen=True)
class Reference:
    """An adapter's offline outputs on the shared test images."""

    logits: torch.Tensor  # (images, classes)
    features: torch.Tensor  # (images, width)
    classes: list[str]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def derive(trained: Path, out: Path, seed: int) -> Path:
    """A copy of the trained adapter with every adapter tensor (pairs and head copy) drawn from `seed`, written
    inside the run directory (a random-init base is rebuilt from the run's seed, found beside the adapter)."""
    torch.manual_seed(0)  # the tiny base is random init: every build must draw the same weights
    model, _ = load_trained(trained)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter_parameters("default"):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    vislora.save_adapter(model, out, "default")
    shutil.copy(trained / "task.json", out / "task.json")
    return out


@torch.no_grad()
def offline(adapter_dir: Path | None, pixels: torch.Tensor, trained: Path) -> Reference:
    """Logits and pooled features computed on a freshly loaded model, with no engine involved."""
    torch.manual_seed(0)
    model, task = load_trained(adapter_dir or trained)
    if adapter_dir is None:  # the base model: the same classifier without its adapter
        model.delete_adapter("default")
    base = model.base_model
    features = base.forward_head(base.forward_features(pixels), pre_logits=True)
    return Reference(model(pixels), features, task["classes"])


_SERVED: dict = {}  # one build per test session


def build_served(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Built once per session: see _build."""
    if not _SERVED:
        _SERVED.update(_build(tmp_path_factory))
    return _SERVED


def _build(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """(adapter dirs by name, test images as PNG bytes, offline references by adapter name, None = base)."""
    root = tmp_path_factory.mktemp("serve")
    folder = image_folder(root / "images", per_class=4)
    cfg = TrainConfig.parse(tiny_train_config(root / "run", folder, optim={"max_steps": 2}))
    trained = Trainer(cfg).fit().adapter_dir
    dirs = {f"a{i}": derive(trained, root / "run" / f"a{i}", seed=100 + i) for i in range(N_ADAPTERS)}
    rng = np.random.default_rng(7)
    images = [png(class_image(i % 3, rng, size=40)) for i in range(8)]
    task = json.loads((trained / "task.json").read_text())
    _, loaded_task = load_trained(trained)
    transform = build_transform(loaded_task["input_spec"], train=False)
    pixels = torch.stack([transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
    refs = {name: offline(path, pixels, trained) for name, path in dirs.items()}
    refs[None] = offline(None, pixels, trained)
    return {"dirs": dirs, "images": images, "refs": refs, "task": task, "trained": trained}


def serve_config(served, names=("a0", "a1", "a2"), **fields) -> ServeConfig:
    """A ServeConfig over the served adapters named; `fields` are top-level config entries (an `adapters` entry
    replaces `names`)."""
    return ServeConfig.parse({"adapters": {n: str(served["dirs"][n]) for n in names}, **fields})


def make_engine(served, names=("a0", "a1", "a2"), **fields) -> Engine:
    torch.manual_seed(0)  # the same random base weights as the offline references
    return build_engine(serve_config(served, names, **fields))


def assert_matches(output_logits, output_features, ref: Reference, image: int, atol: float = 1e-5) -> None:
    """One served sample equals the offline result for its adapter. Batches of other sizes may sum in another
    order, so equality is to float32 rounding (observed differences ~5e-7), far below any adapter's effect (> 0.1)."""
    assert torch.allclose(output_logits, ref.logits[image], atol=atol, rtol=0), (output_logits, ref.logits[image])
    if output_features is not None:
        assert torch.allclose(output_features, ref.features[image], atol=atol, rtol=0)


@contextlib.contextmanager
def live_server(app) -> Iterator[str]:
    """Run `app` with uvicorn on a free loopback port in a background thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:  # waiting for the socket to listen, not standing in for work
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start within 30 s")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def is_traced(tensor: torch.Tensor) -> bool:
    """True for a tensor without real storage (a FakeTensor or FunctionalTensor an earlier torch.compile/export test in
    the same process left alive): memory accounting skips it."""
    try:
        tensor.untyped_storage().data_ptr()
    except RuntimeError:
        return True
    return False
