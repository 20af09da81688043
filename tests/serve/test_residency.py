"""Adapter residency: N loaded adapters cost their own tensors' bytes and nothing more (no copy of the file's
tensors, of the base, or of one another stays behind), and unloading gives every byte back.

Memory is counted independently of the engine: every tensor alive in the process (gc), by distinct storage.
"""

import gc
import warnings
import weakref

import pytest
import torch
from safetensors import safe_open
from serving import build_served, is_traced, make_engine

from vislora.formats import WEIGHTS_FILE

COPIES = 4  # each served adapter file loaded under this many names


@pytest.fixture
def served(tmp_path_factory):
    return build_served(tmp_path_factory)


def storages() -> dict[int, int]:
    """{data pointer: bytes} of the storage of every tensor alive in this process."""
    gc.collect()
    found = {}
    with warnings.catch_warnings():  # isinstance() on some torch module objects warns of their deprecation
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor) and not is_traced(obj)]
    for tensor in tensors:
        storage = tensor.untyped_storage()
        found[storage.data_ptr()] = storage.nbytes()
    return found


def file_bytes(folder) -> int:
    """Bytes of the tensors in an adapter's weights file."""
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as handle:
        return sum(handle.get_tensor(key).nbytes for key in handle.keys())  # noqa: SIM118 (not a dict)


def test_loaded_adapters_cost_their_own_bytes_and_unloading_returns_them(served):
    engine = make_engine(served, names=("a0",))
    sources = {f"x{i}": served["dirs"][f"a{i % 6}"] for i in range(6 * COPIES)}
    try:
        before = storages()
        records = [engine.load(name, folder) for name, folder in sources.items()]
        added = {ptr: size for ptr, size in storages().items() if ptr not in before}
        own = {name: engine.model.adapter_state(name) for name in sources}
        pointers = [t.untyped_storage().data_ptr() for state in own.values() for t in state.values()]

        assert len(set(pointers)) == len(pointers)  # no adapter shares a tensor with another (or with itself)
        assert set(pointers) <= set(added)  # ... nor with the base model: each of its tensors is new
        assert sum(added.values()) == sum(r.bytes for r in records)  # and nothing else stayed: the file's tensors,
        assert len(added) == len(pointers)  # the checked copy, the safetensors buffers are all gone
        assert [r.bytes for r in records] == [sum(t.nbytes for t in own[n].values()) for n in sources]
        assert engine.metrics.snapshot()["memory"]["adapter_bytes"] == sum(r.bytes for r in records) + \
            next(a.bytes for a in engine.adapters() if a.name == "a0")
        for record, folder in zip(records, sources.values(), strict=True):
            assert record.bytes <= file_bytes(folder)  # q/v slices kept as (2, d, r) blocks, not the file's
            # block-diagonal (3d, 2r) B: memory holds less than the file

        pixels = torch.stack([engine.preprocess(served["images"][i]) for i in range(6)])
        answers = [engine.submit(p, f"x{i}").result(60) for i, p in enumerate(pixels)]
        for i, output in enumerate(answers):
            assert torch.allclose(output.logits, served["refs"][f"a{i}"].logits[i], atol=1e-5, rtol=0)
        batch_bytes = pixels.nbytes
        alive = [weakref.ref(t) for state in own.values() for t in state.values()]
        del pixels, answers, output, own
        for name in sources:
            engine.unload(name)
        left = {ptr: size for ptr, size in storages().items() if ptr not in before}
        assert [ref for ref in alive if ref() is not None] == []  # every tensor of the unloaded adapters is freed,
        assert sum(left.values()) <= 1.1 * batch_bytes, left  # and their routing stacks: what stays is the batch
        # worker's last batch (pixels, outputs), until its next one
    finally:
        engine.close()
