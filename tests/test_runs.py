"""Opening a trained run: task.json carries what rebuilding the model needs, so an adapter works away from its run
directory; what cannot be opened is refused with the reason."""

import json
import shutil

import pytest
import torch

from synthetic_images import image_folder, tiny_train_config
from vislora.errors import AdapterFileError
from vislora.run_config import TrainConfig
from vislora.runs import (
    check_rebuildable,
    dual_encoder_args,
    load_trained,
    load_trained_dual,
    read_task,
    run_config,
    run_seed,
)
from vislora.train.trainer import Trainer


def test_an_adapter_copied_out_of_its_run_rebuilds_the_same_random_base(tmp_path):
    folder = image_folder(tmp_path / "images", per_class=4)
    config = tiny_train_config(tmp_path / "run", folder, run={"seed": 7}, optim={"max_steps": 2})
    result = Trainer(TrainConfig.parse(config)).fit()
    assert json.loads((result.adapter_dir / "task.json").read_text())["seed"] == 7
    moved = shutil.copytree(result.adapter_dir, tmp_path / "registry" / "v1")  # no config.yaml beside or above it
    x = torch.randn(2, 3, 32, 32)
    in_run, _ = load_trained(result.adapter_dir)
    away, _ = load_trained(moved)
    with torch.no_grad():
        torch.testing.assert_close(away(x), in_run(x), rtol=0, atol=0)
    assert run_config(result.adapter_dir) == TrainConfig.parse(config) and run_config(moved) is None
    with pytest.raises(AdapterFileError, match=r"not a dual-encoder .*says 'classification'.*runs\.load_trained"):
        load_trained_dual(moved)


def test_the_seed_comes_from_task_json_else_from_the_run_config(tmp_path):
    run = tmp_path / "run"
    config = TrainConfig.parse(tiny_train_config(run, tmp_path / "images", run={"seed": 11}))
    config.save(run / "config.yaml")
    for folder, task in ((run / "adapter", {"seed": 3}), (run / "checkpoints" / "step-2", {}),
                         (tmp_path / "alone", {})):
        folder.mkdir(parents=True)
        (folder / "task.json").write_text(json.dumps(task))
    assert run_seed(run / "adapter") == 3
    assert run_seed(run / "checkpoints" / "step-2") == 11  # a task.json written before it carried the seed
    with pytest.raises(AdapterFileError, match=r"no `seed` and no config.yaml is beside or above the folder"):
        run_seed(tmp_path / "alone")


def test_what_cannot_be_opened_is_refused_with_the_reason(tmp_path):
    with pytest.raises(AdapterFileError, match=r"has no task.json: it was not written by `vislora train`"):
        read_task(tmp_path)
    (tmp_path / "task.json").write_text('{"task": ')
    with pytest.raises(AdapterFileError, match="is not valid JSON"):
        read_task(tmp_path)
    (tmp_path / "task.json").write_text(json.dumps({"task": "contrastive", "model": {"spec": "x"}}))
    with pytest.raises(AdapterFileError, match=r"is a 'contrastive' run, not a classifier"):
        load_trained(tmp_path)
    with pytest.raises(AdapterFileError, match=r"prepared in Python .* vislora\.load_adapter\(model, folder\)"):
        check_rebuildable({"prepared_base": True}, tmp_path)
    check_rebuildable({"prepared_base": False}, tmp_path)


def test_a_task_json_model_section_maps_to_the_dual_encoder_arguments():
    model = {"spec": "timm:vit_tiny_patch16_224", "text": "hf:text", "pretrained": False, "pooling": "mean",
             "kwargs": {"depth": 2}, "embed_dim": 16, "text_pooling": "cls", "head": "auto"}
    assert dual_encoder_args(model) == {"spec": "timm:vit_tiny_patch16_224", "text": "hf:text", "pretrained": False,
                                        "embed_dim": 16, "vision_pooling": "mean", "text_pooling": "cls", "depth": 2}
    assert dual_encoder_args({"spec": "open_clip:ViT-B-32"}) == {
        "spec": "open_clip:ViT-B-32", "text": None, "pretrained": True, "embed_dim": 256, "vision_pooling": "cls",
        "text_pooling": "mean"}
