import json
import multiprocessing
from datetime import datetime, timedelta, timezone

import pytest
import torch
import transformers

import vislora
from vislora.errors import RegistryError
from vislora.registry import AdapterVersion, Registry, fingerprint

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
        "image_size": 32, "patch_size": 8}


class Clock:
    """A settable clock for the registry: versions can be created 'days ago'."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    transformers.Dinov2Model(transformers.Dinov2Config(**TINY)).save_pretrained(folder)
    return folder


def make_adapter(base_dir, out, seed):
    """A bare adapter over the saved base (no task.json): registering it needs base=hf:<dir>."""
    base = transformers.Dinov2Model.from_pretrained(base_dir)
    model = vislora.inject(base, vislora.AdapterConfig(rank=2, alpha=4, targets=["q", "v"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
    vislora.save_adapter(model, out)
    return out


@pytest.fixture(scope="module")
def adapters(base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(base_dir, root / f"a{i}", seed=i) for i in range(3)]


def registry_with(tmp_path, base_dir, adapters, clock=None, count=2):
    registry = Registry(tmp_path / "registry", clock=clock or Clock())
    for i in range(count):
        registry.add("fmnist", adapters[i % len(adapters)], metrics={"accuracy": 0.8 + i / 100},
                     base=f"hf:{base_dir}")
    return registry


def test_add_records_hashes_metrics_and_the_base_fingerprint(tmp_path, base_dir, adapters):
    registry = registry_with(tmp_path, base_dir, adapters)
    first, second = registry.versions("fmnist")
    assert (first.version, second.version) == (1, 2) and second.metrics == {"accuracy": 0.81}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(first.files)
    assert first.created == NOW.isoformat() and first.base == f"hf:{base_dir}"
    expected = fingerprint(transformers.Dinov2Model.from_pretrained(base_dir))  # computed independently
    assert first.base_fingerprint == second.base_fingerprint == expected
    assert registry.resolve("fmnist", 2) == tmp_path / "registry" / "fmnist" / "2"
    assert registry.get("fmnist", "latest").version == 2
    index = json.loads((tmp_path / "registry" / "index.json").read_text())
    assert index["adapters"]["fmnist"]["versions"]["1"]["files"] == first.files


def test_fingerprint_changes_with_any_weight_and_ignores_excluded_modules(base_dir):
    model = transformers.Dinov2Model.from_pretrained(base_dir)
    before = fingerprint(model)
    with torch.no_grad():
        model.layernorm.weight[0] += 1e-3
    assert fingerprint(model) != before
    assert fingerprint(model, exclude=("layernorm",)) == fingerprint(
        transformers.Dinov2Model.from_pretrained(base_dir), exclude=("layernorm",))


def test_metrics_default_to_the_runs_final_held_out_metrics(tmp_path, base_dir, adapters):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(adapters[0], run / "adapter")
    (run / "summary.json").write_text(json.dumps({"final": {"accuracy": 0.86, "loss": 0.4}}))
    record = Registry(tmp_path / "registry").add("fmnist", run / "adapter", base=f"hf:{base_dir}")
    assert record.metrics == {"accuracy": 0.86, "loss": 0.4}


def test_promote_and_rollback(tmp_path, base_dir, adapters):
    registry = registry_with(tmp_path, base_dir, adapters, count=3)
    with pytest.raises(RegistryError, match="no promoted version"):
        registry.resolve("fmnist")
    registry.promote("fmnist", 1)
    registry.promote("fmnist", 3)
    assert registry.resolve("fmnist").name == "3" and registry.promoted("fmnist") == 3
    assert registry.rollback("fmnist").version == 1
    assert registry.resolve("fmnist", "promoted").name == "1"
    with pytest.raises(RegistryError, match="no earlier promoted version to roll back to"):
        registry.rollback("fmnist")
    with pytest.raises(RegistryError, match=r"has no version 7; versions: \[1, 2, 3\]"):
        registry.promote("fmnist", 7)
    with pytest.raises(RegistryError, match="no adapter named 'cats'"):
        registry.resolve("cats")


def test_resolve_refuses_files_changed_after_registration(tmp_path, base_dir, adapters):
    registry = registry_with(tmp_path, base_dir, adapters, count=1)
    weights = registry.resolve("fmnist", 1) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match=r"adapter_model\.safetensors was modified"):
        registry.resolve("fmnist", 1)
    with pytest.raises(RegistryError, match="was modified"):
        registry.promote("fmnist", 1)
    weights.unlink()
    with pytest.raises(RegistryError, match="is missing"):
        registry.resolve("fmnist", 1)
    assert registry.resolve("fmnist", 1, verify=False).is_dir()


def test_retention_keeps_young_promoted_and_previous_versions(tmp_path, base_dir, adapters):
    clock = Clock()
    clock.now = NOW - timedelta(days=40)
    registry = registry_with(tmp_path, base_dir, adapters, clock, count=4)  # v1-v4 are 40 days old
    clock.now = NOW - timedelta(days=10)
    registry.add("fmnist", adapters[0], base=f"hf:{base_dir}")  # v5: 10 days old
    clock.now = NOW
    registry.add("fmnist", adapters[1], base=f"hf:{base_dir}")  # v6: new
    registry.promote("fmnist", 1)
    registry.promote("fmnist", 2)  # promoted v2, previous v1

    assert [r.version for r in registry.prune(keep_last=0, dry_run=True)] == [3, 4]
    assert [r.version for r in registry.versions("fmnist")] == [1, 2, 3, 4, 5, 6]  # dry run: nothing deleted
    removed = registry.prune(keep_last=0)
    assert [r.version for r in removed] == [3, 4]
    assert [r.version for r in registry.versions("fmnist")] == [1, 2, 5, 6]
    assert not (tmp_path / "registry" / "fmnist" / "3").exists() and registry.resolve("fmnist").name == "2"
    assert registry.rollback("fmnist").version == 1
    clock.now = NOW + timedelta(days=60)
    assert [r.version for r in registry.prune(keep_last=1)] == [2, 5]  # v1 promoted now, v6 newest
    with pytest.raises(RegistryError, match="younger than 30 days"):
        registry.prune(min_age_days=7)


def test_an_interrupted_add_never_reuses_its_version_number(tmp_path, base_dir, adapters):
    registry = registry_with(tmp_path, base_dir, adapters, count=1)
    (tmp_path / "registry" / "fmnist" / "2").mkdir()  # a crash after the copy, before the index write
    (tmp_path / "registry" / "fmnist" / ".3.abcd.partial").mkdir()  # a crash during the copy
    record = registry.add("fmnist", adapters[1], base=f"hf:{base_dir}")
    assert record.version == 3 and [r.version for r in registry.versions()] == [1, 3]


def test_bad_names_are_refused(tmp_path, base_dir, adapters):
    with pytest.raises(RegistryError, match=r"adapter name '\.\./x' is not allowed"):
        Registry(tmp_path).add("../x", adapters[0], base=f"hf:{base_dir}")


def _add_many(root, adapter, base, n, results):
    registry = Registry(root)
    results.extend([registry.add("fmnist", adapter, base=base).version for _ in range(n)])


def test_concurrent_adds_from_several_processes_keep_the_index_whole(tmp_path, base_dir, adapters):
    context = multiprocessing.get_context("fork")
    with context.Manager() as manager:
        results = manager.list()
        workers = [context.Process(target=_add_many, args=(tmp_path / "registry", adapters[i % 3], f"hf:{base_dir}",
                                                           3, results)) for i in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(120)
        assert [w.exitcode for w in workers] == [0] * 4
        versions = sorted(results)
    assert versions == list(range(1, 13))
    registry = Registry(tmp_path / "registry")
    assert [r.version for r in registry.versions("fmnist")] == versions
    for record in registry.versions("fmnist"):
        registry.resolve("fmnist", record.version)  # every version's files are whole and match their hashes
    assert isinstance(registry.get("fmnist", 12), AdapterVersion)
