"""`vislora eval --device --dtype`: the comparison runs where it is told, in the dtype it is told."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from synthetic_images import class_image, csv_manifest, tiny_train_config
from vislora.cli import app
from vislora.data.datasets import collate
from vislora.devices import Placement
from vislora.evaluate.classifier import open_eval_data
from vislora.evaluate.collect import collect
from vislora.run_config import TrainConfig
from vislora.runs import load_trained
from vislora.train.trainer import Trainer

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained classifier run and a 12-image manifest."""
    root = tmp_path_factory.mktemp("eval-devices")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        class_image(i % 3, rng).save(root / f"{i}.png")
        rows.append({"path": f"{i}.png", "label": f"c{i % 3}"})
    manifest = csv_manifest(root, rows)
    config = TrainConfig.parse(tiny_train_config(root / "run", manifest, optim={"max_steps": 1}))
    return Trainer(config).fit().adapter_dir, manifest


def test_eval_in_bfloat16_runs_and_agrees_with_float32(run, tmp_path):
    adapter, manifest = run
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", "--adapter", str(adapter), "--data", str(manifest), "--device", "cpu",
                                 "--dtype", "bfloat16", "--latency-images", "0", "--bootstrap", "0", "--json",
                                 str(out)])
    assert result.exit_code == 0, result.output
    assert "ran on cpu bfloat16" in result.output
    adapted = json.loads(out.read_text())["adapted"]
    with torch.no_grad():  # float32 by hand: the whole classifier on the same images
        model, task = load_trained(adapter)
        batch = collate([open_eval_data(task, manifest)[i] for i in range(12)])
        loss = F.cross_entropy(model(batch["image"]).double(), batch["label"]).item()
    assert adapted["n"] == 12
    assert adapted["loss"] == pytest.approx(loss, abs=0.01)  # observed 2.8e-4
    assert adapted["loss"] != pytest.approx(loss, abs=1e-6)  # computed in bfloat16, not float32


def test_collect_sends_images_to_the_placement_and_answers_float32(run):
    adapter, manifest = run
    model, task = load_trained(adapter)
    batch = collate([open_eval_data(task, manifest)[i] for i in range(6)])
    placement = Placement.resolve("cpu", "bfloat16")
    got = collect(placement.place(model), [batch], placement=placement)
    with torch.no_grad():
        expected = model(batch["image"].to(torch.bfloat16)).float()  # the whole classifier, by hand
    assert got.adapted.logits.dtype is torch.float32 and got.adapted.logits.device.type == "cpu"
    assert torch.equal(got.adapted.logits, expected)


@pytest.mark.parametrize(("args", "message"), [
    (["--device", "gpu:0"], "unknown device 'gpu:0': use auto, cpu, cuda, cuda:N or mps"),
    (["--device", "cpu", "--dtype", "float16"], "dtype float16 on the CPU is refused"),
])
def test_eval_refuses_bad_devices_and_dtypes(run, args, message):
    adapter, manifest = run
    result = runner.invoke(app, ["eval", "--adapter", str(adapter), "--data", str(manifest), *args])
    assert result.exit_code != 0
    assert message in str(result.exception)


@pytest.mark.gpu
def test_eval_on_cuda_agrees_with_the_cpu(run, tmp_path):
    adapter, manifest = run
    losses = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.json"
        result = runner.invoke(app, ["eval", "--adapter", str(adapter), "--data", str(manifest), "--device", device,
                                     "--latency-images", "2", "--bootstrap", "0", "--json", str(out)])
        assert result.exit_code == 0, result.output
        losses[device] = json.loads(out.read_text())["adapted"]["loss"]
    assert losses["cuda"] == pytest.approx(losses["cpu"], abs=1e-3)
