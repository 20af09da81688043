import copy
import functools
import json
import math
import os
import re

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import vislora
from conftest import randomize_adapters, tiny_hf_clip, tiny_hf_vit, tiny_open_clip_tower, tiny_timm
from vislora import AdapterConfig, AdapterFileError
from vislora.formats import CONFIG_FILE, EXTRA_FILE, WEIGHTS_FILE

CLIP_INPUTS = {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
               "input_ids": torch.randint(2, 100, (2, 6), generator=torch.Generator().manual_seed(0))}
FAMILIES = {
    "timm_vit": (tiny_timm, {"x": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}),
    "hf_vit": (tiny_hf_vit, {"pixel_values": CLIP_INPUTS["pixel_values"]}),
    "hf_clip": (tiny_hf_clip, CLIP_INPUTS),
    "open_clip": (tiny_open_clip_tower, {"x": torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))}),
}


def out(model, inputs):
    result = model(**inputs)
    if torch.is_tensor(result):
        return result
    return result.logits_per_image if hasattr(result, "logits_per_image") else result.logits


PEFT_MHA_BUG = "the installed PEFT adds the MultiheadAttention out_proj delta twice (huggingface/peft#3774)"


@functools.cache
def peft_doubles_mha_out_proj() -> bool:
    """Probe the installed PEFT for the MHA out_proj double-delta bug."""
    torch.manual_seed(0)
    wrapper = torch.nn.Module()
    wrapper.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    wrapper.forward = lambda x: wrapper.attn(x, x, x, need_weights=False)[0]
    reference = copy.deepcopy(wrapper.attn)
    model = peft.get_peft_model(wrapper, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["attn"]))
    out_proj = model.base_model.model.attn.base_layer.out_proj
    with torch.no_grad():
        out_proj.lora_B["default"].weight.normal_()
        reference.out_proj.weight += out_proj.get_delta_weight("default")
    x = torch.randn(1, 3, 8)
    return not torch.allclose(model(x), reference(x, x, x, need_weights=False)[0], atol=1e-5)


def hand_merged(base, folder):
    """An independent reference: W += scale * B @ A for every pair in a PEFT-layout file."""
    config = json.loads((folder / CONFIG_FILE).read_text())
    tensors = load_file(folder / WEIGHTS_FILE)
    with torch.no_grad():
        for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
            path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            a, b = tensors[key], tensors[key.replace("lora_A", "lora_B")]
            module_path = path.replace(".base_layer.out_proj", "")
            rank = next((v for k, v in config["rank_pattern"].items() if re.match(rf"(.*\.)?({k})$", module_path)),
                        config["r"])
            alpha = next((v for k, v in config["alpha_pattern"].items()
                          if re.match(rf"(.*\.)?({k})$", module_path)), config["lora_alpha"])
            scale = alpha / (math.sqrt(rank) if config["use_rslora"] else rank)
            module = base.get_submodule(path.replace(".base_layer.", "."))
            weight = module.in_proj_weight if isinstance(module, torch.nn.MultiheadAttention) else module.weight
            weight += scale * b @ a
    return base


def adapted_and_saved(tmp_path, family, cfg):
    factory, inputs = FAMILIES[family]
    model = vislora.inject(factory(), cfg)
    randomize_adapters(model)
    vislora.save_adapter(model, tmp_path / "adapter")
    return out(model, inputs), tmp_path / "adapter"


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("targets", [["qkv", "o"], ["q", "v", "fc1"], ["q", "k", "v", "o", "fc2"]])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_loads_what_we_save_with_identical_outputs(tmp_path, family, targets, use_rslora, request):
    cfg = AdapterConfig(rank=4, alpha=8, targets=targets, use_rslora=use_rslora)
    expected, folder = adapted_and_saved(tmp_path, family, cfg)
    factory, inputs = FAMILIES[family]
    torch.testing.assert_close(out(hand_merged(factory(), folder), inputs), expected, rtol=1e-4, atol=1e-5)
    if family == "open_clip" and "o" in targets and peft_doubles_mha_out_proj():
        request.applymarker(pytest.mark.xfail(strict=True, reason=PEFT_MHA_BUG))
    reference = peft.PeftModel.from_pretrained(factory(), folder).eval()
    torch.testing.assert_close(out(reference, inputs), expected, rtol=1e-5, atol=1e-5)
    ours = vislora.load_adapter(factory(), folder, name="again")
    torch.testing.assert_close(out(ours, inputs), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("family", "peft_targets"),
    [
        ("timm_vit", ["attn.qkv", "attn.proj", "mlp.fc2"]),
        ("hf_vit", ["q_proj", "v_proj"]),
        ("hf_clip", ["q_proj", "v_proj", "out_proj", "fc1"]),
        ("open_clip", ["attn", "c_fc"]),
    ],
)
def test_we_load_what_peft_saves_with_identical_outputs(tmp_path, family, peft_targets, request):
    factory, inputs = FAMILIES[family]
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=peft_targets, rank_pattern={"fc1": 2, "c_fc": 2},
                             alpha_pattern={"fc1": 3, "c_fc": 3})
    reference = peft.get_peft_model(factory(), config).eval()
    randomize_adapters(reference)
    reference.save_pretrained(tmp_path)
    ours = vislora.load_adapter(factory(), tmp_path, name="from_peft")
    assert ours.active_adapters == ("from_peft",)
    torch.testing.assert_close(out(ours, inputs), out(hand_merged(factory(), tmp_path), inputs),
                               rtol=1e-4, atol=1e-5)
    if family == "open_clip" and peft_doubles_mha_out_proj():
        request.applymarker(pytest.mark.xfail(strict=True, reason=PEFT_MHA_BUG))
    torch.testing.assert_close(out(ours, inputs), out(reference, inputs), rtol=1e-5, atol=1e-5)


def test_slices_are_written_as_stacked_rank_lora(tmp_path):
    _, folder = adapted_and_saved(tmp_path, "timm_vit", AdapterConfig(rank=4, alpha=8, targets=["q", "v"]))
    tensors = load_file(folder / WEIGHTS_FILE)
    a = tensors["base_model.model.blocks.0.attn.qkv.lora_A.weight"]
    b = tensors["base_model.model.blocks.0.attn.qkv.lora_B.weight"]
    assert a.shape == (8, 32) and b.shape == (96, 8)
    assert b[32:64].abs().max() == 0 and b[:32, 4:].abs().max() == 0 and b[64:, :4].abs().max() == 0
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["rank_pattern"][r"^blocks\.0\.attn\.qkv"] == 8
    assert config["alpha_pattern"][r"^blocks\.0\.attn\.qkv"] == 16  # scale 8/4 = 16/8


def test_modules_to_save_round_trip_with_peft(tmp_path):
    factory, inputs = FAMILIES["timm_vit"]
    cfg = AdapterConfig(rank=4, alpha=8, targets=["qkv"], modules_to_save=["head"])
    model = vislora.inject(factory(), cfg)
    randomize_adapters(model)
    with torch.no_grad():
        model.base_model.head.copies["default"].weight.normal_()
    vislora.save_adapter(model, tmp_path)
    reference = peft.PeftModel.from_pretrained(factory(), tmp_path).eval()
    torch.testing.assert_close(out(reference, inputs), out(model, inputs), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out(vislora.load_adapter(factory(), tmp_path), inputs), out(model, inputs))


def test_second_adapter_loads_beside_the_first(tmp_path, images):
    _, folder = adapted_and_saved(tmp_path, "timm_vit", AdapterConfig(rank=4, alpha=8, targets=["qkv"]))
    model = vislora.inject(tiny_timm(), AdapterConfig(rank=2, alpha=2, targets=["fc1"]), name="mine")
    vislora.load_adapter(model, folder, name="loaded")
    assert model.adapters == ("mine", "loaded") and model.active_adapters == ("mine",)
    model.set_active(["mine", "loaded"])
    assert model(images).shape == (2, 5)


# ---------------------------------------------------------------- bad input
def assert_untouched(model, before):
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert model.state_dict().keys() == before


@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_pickle_files_are_refused(tmp_path, suffix, vit):
    torch.save({"x": torch.zeros(1)}, tmp_path / f"adapter_model{suffix}")
    (tmp_path / CONFIG_FILE).write_text("{}")
    for target in (tmp_path, tmp_path / f"adapter_model{suffix}"):
        with pytest.raises(AdapterFileError, match="refusing to load a pickle"):
            vislora.load_adapter(vit, target)


def test_adapter_for_another_model_is_refused_and_model_untouched(tmp_path):
    _, folder = adapted_and_saved(tmp_path, "timm_vit", AdapterConfig(rank=4, alpha=8, targets=["qkv", "o"]))
    wider = tiny_timm(embed_dim=48, depth=3, num_heads=3)
    before = wider.state_dict().keys()
    with pytest.raises(AdapterFileError, match=r"does not fit this model, nothing was loaded.*"
                                               r"4 missing from the file: blocks.2.attn.proj.*8 wrong shape"):
        vislora.load_adapter(wider, folder)
    assert_untouched(wider, before)


def test_unknown_targets_are_refused(tmp_path):
    _, folder = adapted_and_saved(tmp_path, "timm_vit", AdapterConfig(rank=4, alpha=8, targets=["qkv"]))
    hf = tiny_hf_vit()
    before = hf.state_dict().keys()
    (folder / EXTRA_FILE).unlink()  # a plain PEFT adapter naming timm modules
    with pytest.raises(AdapterFileError, match="trained on another one"):
        vislora.load_adapter(hf, folder)
    assert_untouched(hf, before)


def test_slice_file_with_weight_outside_its_slices_is_refused_and_model_untouched(tmp_path, vit):
    _, folder = adapted_and_saved(tmp_path, "timm_vit", AdapterConfig(rank=4, alpha=8, targets=["q", "v"]))
    tensors = load_file(folder / WEIGHTS_FILE)
    key = "base_model.model.blocks.1.attn.qkv.lora_B.weight"  # [3d, 2r]: k rows must be zero
    tensors[key][32:64] = 1.0
    save_file(tensors, folder / WEIGHTS_FILE)
    before = vit.state_dict().keys()
    with pytest.raises(AdapterFileError, match=r"blocks.1.attn.qkv: lora_B has weights outside the q/k/v slices"):
        vislora.load_adapter(vit, folder)
    assert_untouched(vit, before)
    model = vislora.inject(vit, AdapterConfig(rank=2, alpha=2, targets=["fc1"]), name="mine")
    mine = model.state_dict().keys()
    with pytest.raises(AdapterFileError, match="outside the q/k/v slices"):
        vislora.check_adapter(model, folder)
    with pytest.raises(AdapterFileError, match="outside the q/k/v slices"):
        vislora.load_adapter(model, folder, name="edited")
    assert model.adapters == ("mine",) and model.state_dict().keys() == mine


def test_checked_adapter_installs_later_with_the_same_outputs(tmp_path, images):
    _, folder = adapted_and_saved(tmp_path, "timm_vit", AdapterConfig(rank=4, alpha=8, targets=["q", "v", "fc2"]))
    direct = vislora.load_adapter(tiny_timm(), folder)
    model = vislora.inject(tiny_timm(), AdapterConfig(rank=2, alpha=2, targets=["fc1"]), name="mine")
    checked = vislora.check_adapter(model, folder)
    assert model.adapters == ("mine",)  # checking changes nothing
    vislora.load_adapter(model, checked, name="later", activate=True)
    model.set_active("later")
    torch.testing.assert_close(model(images), direct(images), rtol=0, atol=0)


def test_wrong_rank_is_refused(tmp_path, vit):
    _, folder = adapted_and_saved(tmp_path, "timm_vit", AdapterConfig(rank=4, alpha=8, targets=["qkv"]))
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["r"] = 8
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    (folder / EXTRA_FILE).unlink()
    with pytest.raises(AdapterFileError, match=r"wrong shape.*blocks.0.attn.qkv.lora_A.weight: file \(4, 32\) "
                                               r"vs model \(8, 32\)"):
        vislora.load_adapter(vit, folder)


def test_truncated_safetensors_gives_a_clear_error(tmp_path, vit):
    _, folder = adapted_and_saved(tmp_path, "timm_vit", AdapterConfig(rank=4, alpha=8, targets=["qkv"]))
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    before = vit.state_dict().keys()
    with pytest.raises(AdapterFileError, match=r"not a readable safetensors file.*truncated or corrupt"):
        vislora.load_adapter(vit, folder)
    assert_untouched(vit, before)


def test_non_finite_weights_and_bad_json_are_refused(tmp_path, vit):
    _, folder = adapted_and_saved(tmp_path, "timm_vit", AdapterConfig(rank=4, alpha=8, targets=["qkv"]))
    tensors = load_file(folder / WEIGHTS_FILE)
    tensors["base_model.model.blocks.1.attn.qkv.lora_B.weight"][0, 0] = float("inf")
    save_file(tensors, folder / WEIGHTS_FILE)
    with pytest.raises(AdapterFileError, match=r"NaN/Inf values: blocks\.1\.attn\.qkv\.lora_B\.weight"):
        vislora.load_adapter(vit, folder)
    (folder / CONFIG_FILE).write_text('{"r": ')
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        vislora.load_adapter(vit, folder)


def test_missing_directory_and_files(tmp_path, vit):
    with pytest.raises(AdapterFileError, match="does not exist"):
        vislora.load_adapter(vit, tmp_path / "nowhere")
    (tmp_path / CONFIG_FILE).write_text("{}")
    with pytest.raises(AdapterFileError, match=r"adapter_model\.safetensors is missing"):
        vislora.load_adapter(vit, tmp_path)


def test_unsupported_peft_options_are_named(tmp_path, vit):
    _, folder = adapted_and_saved(tmp_path, "timm_vit", AdapterConfig(rank=4, alpha=8, targets=["qkv"]))
    config = json.loads((folder / CONFIG_FILE).read_text())
    config.update(fan_in_fan_out=True, bias="all")
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    (folder / EXTRA_FILE).unlink()
    with pytest.raises(AdapterFileError, match=r"options \{'fan_in_fan_out': True, 'bias': 'all'\}"):
        vislora.load_adapter(vit, folder)


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    _, folder = adapted_and_saved(tmp_path, "timm_vit", AdapterConfig(rank=4, alpha=8, targets=["qkv"]))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    model = vislora.inject(tiny_timm(), AdapterConfig(rank=2, alpha=2, targets=["fc1"]))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("vislora.formats.write.save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        vislora.save_adapter(model, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # old adapter intact, no temp files
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]
    assert copy.deepcopy(before) == before


@pytest.mark.parametrize("cfg", [AdapterConfig(rank=4, alpha=8, targets=["q", "v", "o"], modules_to_save=["head"]),
                                 AdapterConfig(rank=2, alpha=4, targets=["qkv", "fc1"], init="pissa"),
                                 AdapterConfig(rank=2, alpha=4, targets=["qkv"], method="dora")])
def test_load_adapter_weights_copies_in_place(tmp_path, cfg, images):
    model = vislora.inject(tiny_timm(), cfg)
    randomize_adapters(model)
    saved = model(images)
    vislora.save_adapter(model, tmp_path)
    params = list(model.adapter_parameters("default"))
    with torch.no_grad():
        for param in params:
            param.add_(0.5)
    assert (model(images) - saved).abs().max() > 1e-3
    vislora.load_adapter_weights(model, tmp_path)
    assert all(a is b for a, b in zip(params, model.adapter_parameters("default"), strict=True))
    torch.testing.assert_close(model(images), saved, rtol=1e-5, atol=1e-6)


def test_load_adapter_weights_refuses_another_config(tmp_path, vit):
    other = vislora.inject(tiny_timm(), AdapterConfig(rank=4, alpha=8, targets=["qkv"]))
    vislora.save_adapter(other, tmp_path)
    model = vislora.inject(vit, AdapterConfig(rank=4, alpha=4, targets=["qkv"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFileError, match=r"another config than adapter 'default' \(differs in alpha\)"):
        vislora.load_adapter_weights(model, tmp_path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
