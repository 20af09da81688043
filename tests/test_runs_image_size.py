"""An adapter trained at one input side, opened at another (`load_trained(..., image_size=N)`, `vislora eval
--image-size N`): a warning names both sides, the base's position embeddings are resampled as timm does it, and the
returned task describes the new side."""

import json
import re
import warnings

import pytest
import torch
from typer.testing import CliRunner

from synthetic_images import image_folder, tiny_train_config
from vislora.cli import app
from vislora.errors import VisloraWarning
from vislora.run_config import TrainConfig
from vislora.runs import load_trained
from vislora.train.trainer import Trainer

runner = CliRunner()


@pytest.fixture(scope="module")
def run_32px(tmp_path_factory):
    """(adapter folder, image folder) of a tiny timm run trained at 32 px (random base, rebuilt from the seed)."""
    root = tmp_path_factory.mktemp("size")
    folder = image_folder(root / "images", per_class=4)
    config = tiny_train_config(root / "run", folder, folder, optim={"max_steps": 2})
    return Trainer(TrainConfig.parse(config)).fit().adapter_dir, folder


def test_an_adapter_trained_at_32_px_runs_at_64_px_with_a_warning(run_32px):
    adapter, _ = run_32px
    with pytest.warns(VisloraWarning, match=r"trained at 32 px and runs at 64 px"):
        model, task = load_trained(adapter, image_size=64)
    assert task["input_spec"].size == task["input"]["size"] == 64
    assert (task["input"]["native_size"], task["input"]["position_embeddings"]) == (32, "timm-resample")
    reference, _ = load_trained(adapter)  # the 32-px model, then timm's own resize of its position embeddings
    reference.base_model.set_input_size(img_size=(64, 64))
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # at the trained size: no warning
        _, same = load_trained(adapter, image_size=32)
    assert same["input_spec"].size == 32 and same["input"]["position_embeddings"] == "native"


def test_eval_runs_an_adapter_at_another_size_from_the_shell(tmp_path, run_32px):
    adapter, folder = run_32px
    out = tmp_path / "eval.json"
    with pytest.warns(VisloraWarning, match=r"trained at 32 px and runs at 48 px"):
        result = runner.invoke(app, ["eval", "--adapter", str(adapter), "--data", str(folder), "--image-size", "48",
                                     "--latency-images", "0", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert re.search(r"accuracy [\d.]+ \(base [\d.]+", result.output)
    assert json.loads(out.read_text())["adapted"]["n"] == 12
