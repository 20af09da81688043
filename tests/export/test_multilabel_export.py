"""Merge and ONNX export of a multilabel tagger: logits out as for classifiers, attributes and thresholds carried."""

import json

import numpy as np
import pytest
import torch

from conftest import require_module
from multilabel_run import train_tiny_multilabel
from vislora.export import export_onnx_dir, merge_adapter
from vislora.runs import load_trained


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny_multilabel(tmp_path_factory.mktemp("ml"), steps=2)[0]


def test_merged_folder_carries_attributes_and_thresholds(run, tmp_path):
    result = merge_adapter(run.adapter_dir, tmp_path / "merged")
    task = json.loads((run.adapter_dir / "task.json").read_text())
    saved = json.loads((tmp_path / "merged" / "vislora_merge.json").read_text())
    assert result.max_abs_diff < 1e-4 and saved["classes"] == task["classes"]
    assert saved["task"] == {"task": "multilabel", "attributes": task["attributes"], "thresholds": task["thresholds"]}


def test_onnx_export_gives_the_taggers_logits_and_its_thresholds(run, tmp_path):
    ort = require_module("onnxruntime")
    export_onnx_dir(run.adapter_dir, tmp_path / "onnx")
    meta = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert meta["task"]["thresholds"]["values"] == json.loads((run.adapter_dir / "task.json").read_text())[
        "thresholds"]["values"]
    model, _ = load_trained(run.adapter_dir)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    (onnx_logits,) = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(onnx_logits, model(pixels).numpy(), atol=1e-4)
    assert onnx_logits.shape == (2, 4)
