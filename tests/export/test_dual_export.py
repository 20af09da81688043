"""Shipping dual-encoder runs: merge (loads without vislora), ONNX towers (equal to PyTorch), Triton repository
(parsed as Triton's ModelConfig), and the refusals of what is not supported."""

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from dual_export_helpers import clip_run, pair_run, timm_few_shot_run, train_dual
from export_helpers import run_without_vislora, save_array
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from typer.testing import CliRunner

from vislora.cli import app
from vislora.errors import ExportError
from vislora.export import MERGE_ATOL, ONNX_ATOL, export_onnx_dir, export_triton, load_exportable, merge_adapter
from vislora.export.dual import load_dual_exportable
from vislora.export.dual_merge import _writer
from vislora.registry import Registry
from vislora.runs import load_trained_dual
from vislora.tasks.clip import text_classifier

TEXTS = ["a photo of a red picture", "blue", "a green picture of the long caption", "una foto"]

LOAD_MERGED = """
import numpy as np, torch, torch.nn.functional as F
from pathlib import Path
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer
args = dict(a.split("=", 1) for a in sys.argv[1:])
out = Path(args["out"])
meta = json.loads((out / "vislora_merge.json").read_text())
x = torch.from_numpy(np.load(args["x"]))
texts = json.loads(args["texts"])
with torch.no_grad():
    if meta["layout"].startswith("transformers:"):
        model = AutoModel.from_pretrained(out).eval()
        tokens = AutoTokenizer.from_pretrained(out)(texts, padding=True, truncation=True, return_tensors="pt",
                                                    max_length=meta["tokenizer"]["max_length"])
        image = model.get_image_features(pixel_values=x)
        text = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        image, text = [t if torch.is_tensor(t) else t.pooler_output for t in (image, text)]
        scale = model.logit_scale.exp().item()
    else:
        if meta["vision"]["format"] == "timm":
            import timm
            vision = timm.create_model("local-dir:" + str(out / "vision"), pretrained=True).eval()
            pooled = vision.forward_head(vision.forward_features(x), pre_logits=True)
        else:
            vision = AutoModel.from_pretrained(out / "vision").eval()
            assert meta["vision"]["pooling"] == "cls"
            pooled = vision(pixel_values=x).pooler_output
        text_model = AutoModel.from_pretrained(out / "text").eval()
        settings = meta["text_tower"]["tokenizer"]
        tokens = AutoTokenizer.from_pretrained(out / "text")(texts, padding=True, truncation=True,
                                                             max_length=settings["max_length"], return_tensors="pt")
        hidden = text_model(**tokens).last_hidden_state
        assert meta["text_tower"]["pooling"] == "mean"
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        sentence = (hidden * mask).sum(1) / mask.sum(1)
        proj = load_file(out / "projections.safetensors")
        image, text = pooled @ proj["vision_proj"].T, sentence @ proj["text_proj"].T
        scale = proj["log_logit_scale"].exp().item()
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
ref = np.load(args["ref"], allow_pickle=True).item()
print(json.dumps({"image": float(np.abs(image.numpy() - ref["image"]).max()),
                  "text": float(np.abs(text.numpy() - ref["text"]).max()), "scale": scale}))
"""


def adapted_embeddings(adapter_dir, tmp_path):
    """(x.npy, ref.npy, logit scale) of the adapted model; checks that the adapters change both towers."""
    model, task = load_trained_dual(adapter_dir)
    size = task["input"]["size"]
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(7))
    tokens = model.base_model.tokenize(TEXTS)
    with torch.inference_mode():
        image, _ = model(images=x)
        _, text = model(**tokens)
        with model.disabled():
            base_image, _ = model(images=x)
            _, base_text = model(**tokens)
        scale = model.base_model.logit_scale().item()
    assert (base_image - image).abs().max() > 1e-3 and (base_text - text).abs().max() > 1e-3  # the test can fail
    ref = tmp_path / "ref.npy"
    np.save(ref, np.array({"image": image.numpy(), "text": text.numpy()}, dtype=object), allow_pickle=True)
    return save_array(tmp_path / "x.npy", x), ref, scale


@pytest.mark.parametrize("run, layout", [(pair_run, "dual_encoder"), (timm_few_shot_run, "dual_encoder"),
                                         (clip_run, "transformers:CLIPModel")],
                         ids=["hf-dinov2+bert", "timm+bert-few-shot", "hf-clip"])
def test_merged_dual_encoder_loads_without_vislora_with_the_adapted_embeddings(tmp_path, run, layout):
    x, ref, scale = adapted_embeddings(run(), tmp_path)
    result = merge_adapter(run(), tmp_path / "merged")

    assert result.layout == layout
    assert result.max_abs_diff <= MERGE_ATOL and result.reload_max_abs_diff <= MERGE_ATOL
    meta = json.loads((result.out / "vislora_merge.json").read_text())
    assert meta["logit_scale"] == pytest.approx(scale) and meta["class_names"] == ["red", "green", "blue"]
    loaded = run_without_vislora(LOAD_MERGED, out=result.out, x=x, ref=ref, texts=json.dumps(TEXTS))
    assert loaded["image"] <= MERGE_ATOL and loaded["text"] <= MERGE_ATOL  # plain libraries == adapted (vislora)
    assert loaded["scale"] == pytest.approx(scale, rel=1e-5)  # the trained temperature travels with the weights
    if layout == "dual_encoder":
        files = {p.relative_to(result.out).as_posix() for p in result.out.rglob("*") if p.is_file()}
        assert {"vision/config.json", "vision/model.safetensors", "text/config.json", "text/model.safetensors",
                "text/tokenizer.json", "projections.safetensors", "vislora_merge.json"} <= files


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    return export_onnx_dir(pair_run(), tmp_path_factory.mktemp("onnx") / "out")


def test_onnx_towers_equal_pytorch_at_any_batch_and_caption_length(onnx_export):
    from transformers import AutoTokenizer

    out = onnx_export.out
    meta = json.loads((out / "export.json").read_text())
    assert meta["kind"] == "dual_encoder" and meta["text"]["tokens"] == "dynamic"
    assert [i["name"] for i in meta["text"]["inputs"]] == ["input_ids", "attention_mask"]
    model, _ = load_trained_dual(pair_run())
    assert meta["logit_scale"] == pytest.approx(model.base_model.logit_scale().item())
    image = ort.InferenceSession(str(out / "image.onnx"), providers=["CPUExecutionProvider"])
    text = ort.InferenceSession(str(out / "text.onnx"), providers=["CPUExecutionProvider"])
    tokenizer = AutoTokenizer.from_pretrained(out / meta["text"]["tokenizer"]["folder"])
    for batch, texts in ((1, TEXTS[1:2]), (5, TEXTS), (2, TEXTS[:2])):
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        tokens = tokenizer(texts, padding=True, truncation=True, max_length=meta["text"]["tokenizer"]["max_length"],
                           return_tensors="np")
        with torch.inference_mode():
            expected_image, _ = model(images=x)
            _, expected_text = model(input_ids=torch.from_numpy(tokens["input_ids"]),
                                     attention_mask=torch.from_numpy(tokens["attention_mask"]))
        (got_image,) = image.run(["image_embeds"], {"input": x.numpy()})
        (got_text,) = text.run(["text_embeds"], {"input_ids": tokens["input_ids"],
                                                 "attention_mask": tokens["attention_mask"]})
        assert got_image.shape == (batch, 16) and got_text.shape == (len(texts), 16)
        np.testing.assert_allclose(got_image, expected_image.numpy(), atol=ONNX_ATOL, rtol=1e-3)
        np.testing.assert_allclose(got_text, expected_text.numpy(), atol=ONNX_ATOL, rtol=1e-3)
    assert onnx_export.check.worst <= ONNX_ATOL


def test_onnx_export_ships_the_zero_shot_classifier_of_the_run(onnx_export):
    out = onnx_export.out
    classifier = np.load(out / "zero_shot_classifier.npy")
    model, task = load_trained_dual(pair_run())
    with torch.inference_mode():
        expected = text_classifier(model.base_model, task["class_names"], task["templates"])
    np.testing.assert_allclose(classifier, expected.numpy(), atol=1e-5)
    assert (out / "labels.txt").read_text().split() == ["class0", "class1", "class2"]


def parse(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_triton_repository_holds_an_image_and_a_text_model_that_triton_parses(tmp_path):
    result = export_triton(pair_run(), tmp_path / "models", "clip", max_batch_size=4)
    assert result.validated_with_protobuf
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["clip_image", "clip_text"]
    image, text = parse(result.model_dirs["image"] / "config.pbtxt"), parse(result.model_dirs["text"] / "config.pbtxt")
    assert (image.name, image.platform, image.max_batch_size) == ("clip_image", "onnxruntime_onnx", 4)
    assert [(i.name, list(i.dims), i.data_type) for i in image.input] == [("input", [3, 32, 32],
                                                                          model_config_pb2.TYPE_FP32)]
    assert [(i.name, list(i.dims), i.data_type) for i in text.input] == [
        ("input_ids", [-1], model_config_pb2.TYPE_INT64), ("attention_mask", [-1], model_config_pb2.TYPE_INT64)]
    assert [(o.name, list(o.dims)) for o in image.output] == [("image_embeds", [16])]
    assert [(o.name, list(o.dims)) for o in text.output] == [("text_embeds", [16])]
    assert (result.model_dirs["text"] / "tokenizer" / "tokenizer.json").is_file()
    session = ort.InferenceSession(str(result.model_dirs["text"] / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    for batch, tokens in ((1, 3), (4, 9)):
        (y,) = session.run(["text_embeds"], {"input_ids": np.full((batch, tokens), 5, dtype=np.int64),
                                             "attention_mask": np.ones((batch, tokens), dtype=np.int64)})
        assert y.shape == (batch, 16)
    assert not list(tmp_path.glob(".clip_*"))  # no staging folder left beside the repository


def test_cli_exports_both_towers_of_a_dual_run(tmp_path, monkeypatch):
    from vislora.cli.app import console

    monkeypatch.setattr(console, "width", 400)  # a long tmp path (pytest-xdist's) must not wrap a file name
    runner = CliRunner()
    result = runner.invoke(app, ["export", "onnx", "--adapter", str(clip_run()), "--out", str(tmp_path / "onnx")])
    assert result.exit_code == 0, result.output
    assert "image.onnx" in result.output and "text.onnx" in result.output
    assert {"image.onnx", "text.onnx", "export.json", "tokenizer"} <= {p.name for p in (tmp_path / "onnx").iterdir()}
    result = runner.invoke(app, ["merge", "--adapter", str(clip_run()), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0 and "transformers:CLIPModel" in result.output, result.output


def test_a_run_on_a_prepared_base_is_refused_by_name(tmp_path):
    folder = shutil.copytree(pair_run(), tmp_path / "prepared")
    task = json.loads((folder / "task.json").read_text())
    (folder / "task.json").write_text(json.dumps({**task, "prepared_base": True}))
    for call in (lambda: merge_adapter(folder, tmp_path / "m"), lambda: export_onnx_dir(folder, tmp_path / "o"),
                 lambda: export_triton(folder, tmp_path / "r", "x")):
        with pytest.raises(ExportError, match=r"prepared in Python.*on a prepared base is not supported"):
            call()
    assert not (tmp_path / "m").exists() and not (tmp_path / "o").exists() and not (tmp_path / "r").exists()


def test_molora_int8_open_clip_and_the_classifier_loader_are_refused_by_name(tmp_path):
    molora = train_dual("molora", adapter={"method": "molora", "molora": {"experts": 2, "top_k": 1}},
                        optim={"batch_size": 6, "max_steps": 1})
    with pytest.raises(ExportError, match=r"adapter 'default' \(molora\) cannot be merged into the towers.*mixture"):
        merge_adapter(molora, tmp_path / "m")
    with pytest.raises(ExportError, match=r"INT8 \(--int8\) is not supported for dual-encoder runs"):
        export_onnx_dir(pair_run(), tmp_path / "o", int8=True)
    with pytest.raises(ExportError, match=r"INT8 \(--int8\) is not supported for dual-encoder runs"):
        export_triton(pair_run(), tmp_path / "r", "x", int8=True)
    with pytest.raises(ExportError, match=r"dual-encoder run.*load_dual_exportable"):
        load_exportable(pair_run())
    result = CliRunner().invoke(app, ["export", "onnx", "--adapter", str(pair_run()), "--out", str(tmp_path / "c"),
                                      "--int8", "--calibration", str(tmp_path)])
    assert isinstance(result.exception, ExportError) and "INT8 (--int8) is not supported" in str(result.exception)


def test_open_clip_models_are_refused_by_merge_with_the_way_out():
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    from vislora.dual_encoder import OpenClipDualEncoder
    from vislora.tokenize import OpenClipCaptionTokenizer

    clip = open_clip.model.CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16,
                                                                       patch_size=8, image_size=32),
                                text_cfg=CLIPTextCfg(context_length=12, vocab_size=49408, width=32, heads=2,
                                                     layers=1))
    model = OpenClipDualEncoder(clip, OpenClipCaptionTokenizer(open_clip.get_tokenizer("ViT-B-32"), 12))
    with pytest.raises(ExportError, match=r"OpenClipDualEncoder.*open_clip models export ONNX instead"):
        _writer(model)


def test_base_must_match_the_run(tmp_path):
    with pytest.raises(ExportError, match=r"was trained on 'hf:.*' \(task.json\) but --base is 'hf:other'"):
        load_dual_exportable(pair_run(), base="hf:other")


def test_the_registry_keeps_dual_encoder_runs_with_the_fingerprint_of_their_base(tmp_path):
    registry = Registry(tmp_path / "registry")
    first = registry.add("pair", pair_run())
    other_seed = registry.add("pair", train_dual("pair-seed-1", run={"seed": 1}))
    other_base = registry.add("few", timm_few_shot_run())
    assert (first.version, other_seed.version) == (1, 2)
    assert first.base_fingerprint == other_seed.base_fingerprint  # another adapter on the same towers
    assert first.base_fingerprint != other_base.base_fingerprint  # another image tower
    model, _ = load_trained_dual(registry.resolve("pair", 2))
    assert model.eval()(images=torch.zeros(1, 3, 32, 32))[0].shape == (1, 16)
