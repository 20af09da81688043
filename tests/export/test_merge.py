import json

import pytest
import torch
import transformers
from export_helpers import (
    TIMM,
    TINY_DINOV2,
    data_dirs,
    dinov2_dir,
    dinov2_run,
    run_without_vislora,
    save_array,
    train,
)

import vislora
from vislora.export import MERGE_ATOL, ExportError, load_exportable, merge_adapter
from vislora.export import merge as merge_module
from vislora.export.common import TensorOutput

LOAD_HF = """
import numpy as np, torch
from transformers import AutoModelForImageClassification
args = dict(a.split("=", 1) for a in sys.argv[1:])
model = AutoModelForImageClassification.from_pretrained(args["out"]).eval()
x = torch.from_numpy(np.load(args["x"]))
with torch.no_grad():
    logits = model(pixel_values=x).logits.numpy()
print(json.dumps({"diff": float(np.abs(logits - np.load(args["ref"])).max()), "labels": model.config.id2label}))
"""

LOAD_TIMM = """
import numpy as np, timm, torch
args = dict(a.split("=", 1) for a in sys.argv[1:])
model = timm.create_model("local-dir:" + args["out"], pretrained=True).eval()
x = torch.from_numpy(np.load(args["x"]))
with torch.no_grad():
    logits = model(x).numpy()
print(json.dumps({"diff": float(np.abs(logits - np.load(args["ref"])).max()),
                  "labels": model.pretrained_cfg.get("label_names")}))
"""


def adapted_outputs(adapter_dir, tmp_path, seed=0):
    """(x, adapted logits) saved for a process without vislora; the base is rebuilt with the same seed."""
    torch.manual_seed(seed)
    item = load_exportable(adapter_dir)
    x = torch.randn(3, 3, item.spec.size, item.spec.size, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        reference = item.adapted(x)
    base = item.adapted.unload(merge=False)
    with torch.inference_mode():
        assert (base(x) - reference).abs().max() > 1e-3  # the adapter changes the outputs: the test can fail
    return save_array(tmp_path / "x.npy", x), save_array(tmp_path / "ref.npy", reference)


def test_dinov2_classifier_merges_into_a_transformers_folder_loadable_without_vislora(tmp_path):
    x, ref = adapted_outputs(dinov2_run(), tmp_path)
    result = merge_adapter(dinov2_run(), tmp_path / "merged")

    assert result.layout == "transformers:Dinov2ForImageClassification"
    assert result.max_abs_diff <= MERGE_ATOL and result.reload_max_abs_diff <= MERGE_ATOL
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "vislora_merge.json"} <= {
        p.name for p in result.out.iterdir()}
    loaded = run_without_vislora(LOAD_HF, out=result.out, x=x, ref=ref)
    assert loaded["diff"] <= MERGE_ATOL  # merged (plain transformers) == adapted (vislora), |diff| <= 1e-4
    assert loaded["labels"] == {"0": "class0", "1": "class1", "2": "class2"}


@pytest.mark.parametrize("head", ["auto", "linear"])
def test_timm_model_merges_into_a_timm_folder_loadable_without_vislora(tmp_path, head):
    adapter = train(tmp_path / "run", data_dirs(), {**TIMM, "head": head}, val=False, steps=2)
    x, ref = adapted_outputs(adapter, tmp_path)
    torch.manual_seed(0)  # pretrained=False: the same random base as adapted_outputs saw
    result = merge_adapter(adapter, tmp_path / "merged")

    assert result.layout == "timm"
    config = json.loads((result.out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 3
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    loaded = run_without_vislora(LOAD_TIMM, out=result.out, x=x, ref=ref)
    assert loaded["diff"] <= MERGE_ATOL
    assert loaded["labels"] == ["class0", "class1", "class2"]


def test_bare_adapter_over_a_hugging_face_model_needs_base_and_saves_the_merged_backbone(tmp_path):
    torch.manual_seed(0)
    base = transformers.Dinov2Model.from_pretrained(dinov2_dir()).eval()
    adapted = vislora.inject(base, vislora.AdapterConfig(rank=4, alpha=8, targets=["q", "v"]))
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    vislora.save_adapter(adapted, tmp_path / "adapter")
    x = torch.randn(2, 3, TINY_DINOV2["image_size"], TINY_DINOV2["image_size"])
    with torch.inference_mode():
        expected = adapted(pixel_values=x).last_hidden_state

    with pytest.raises(ExportError, match=r"no task.json.*--base hf:"):
        merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    result = merge_adapter(tmp_path / "adapter", tmp_path / "merged", base=f"hf:{dinov2_dir()}")
    assert result.layout == "transformers"
    merged = transformers.AutoModel.from_pretrained(result.out).eval()
    with torch.inference_mode():
        assert (merged(pixel_values=x).last_hidden_state - expected).abs().max() <= MERGE_ATOL


def test_other_hugging_face_classifiers_save_backbone_plus_head(tmp_path, monkeypatch):
    # a backbone without a ForImageClassification mapping (forced here) gets backbone/ + head.safetensors
    item = load_exportable(dinov2_run())
    monkeypatch.setattr(item.adapted.base_model.backbone.config, "model_type", "other")
    monkeypatch.setattr(merge_module, "load_exportable", lambda *a, **k: item)
    with torch.inference_mode():
        expected = item.adapted(item.example(2, seed=5))
    result = merge_adapter(dinov2_run(), tmp_path / "merged")
    assert result.layout == "transformers+head" and (result.out / "head.safetensors").is_file()
    reloaded = merge_module._reload(result.layout, result.out, "cls")
    with torch.inference_mode():
        assert (reloaded(item.example(2, seed=5)) - expected).abs().max() <= MERGE_ATOL


def test_merge_refuses_a_mismatched_base_a_non_adapter_folder_and_an_existing_output(tmp_path):
    with pytest.raises(ExportError, match=r"was trained on 'hf:.*' \(task.json\) but --base is 'hf:other'"):
        merge_adapter(dinov2_run(), tmp_path / "a", base="hf:other")
    with pytest.raises(ExportError, match="not an adapter folder"):
        merge_adapter(tmp_path, tmp_path / "b")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"already exists.*--overwrite"):
        merge_adapter(dinov2_run(), tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_a_failed_merge_leaves_no_folder_and_overwrite_swaps_whole(tmp_path, monkeypatch):
    first = merge_adapter(dinov2_run(), tmp_path / "merged")
    before = (first.out / "model.safetensors").read_bytes()

    def broken(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(merge_module, "_reload", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        merge_adapter(dinov2_run(), tmp_path / "merged", overwrite=True)
    with pytest.raises(RuntimeError, match="disk full"):
        merge_adapter(dinov2_run(), tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert (first.out / "model.safetensors").read_bytes() == before  # the old folder is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temp folders left behind


def test_tensor_output_reads_hf_backbone_outputs():
    model = transformers.Dinov2Model.from_pretrained(dinov2_dir()).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(TensorOutput(model, hf_backbone=True)(x), model(pixel_values=x).last_hidden_state)
