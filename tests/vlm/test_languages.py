import json

import torch
from dual_fixtures import dual_train_config, save_towers, tiny_dual
from safetensors.torch import load_file

import vislora
from conftest import randomize_adapters
from synthetic_images import image_folder
from vislora.run_config import TrainConfig
from vislora.towers import tower_adapter_config
from vislora.train.trainer import Trainer

SPANISH = {"class0": "rojo", "class1": "verde", "class2": "azul"}


def test_language_adapters_share_one_vision_adapter_and_route_per_sample(images):
    base = tiny_dual()
    model = vislora.inject(base, tower_adapter_config(base, ["q", "v"], None, train_heads=False), "vision")
    for language in ("english", "spanish"):
        model.add_adapter(language, tower_adapter_config(base, None, ["q", "v"], train_heads=False))
    randomize_adapters(model)
    tokens = model.tokenize(["a photo of a red picture", "una foto de rojo"])
    with torch.no_grad():
        per_batch = {}
        for language in ("english", "spanish"):
            model.set_active(["vision", language])
            per_batch[language] = model(images=images, **tokens)
        torch.testing.assert_close(per_batch["english"][0], per_batch["spanish"][0], rtol=0, atol=0)
        assert not torch.allclose(per_batch["english"][1], per_batch["spanish"][1])
        # one batched pass, a language per caption
        _, routed = model(**tokens, adapters=["english", "spanish"])
    torch.testing.assert_close(routed[0], per_batch["english"][1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(routed[1], per_batch["spanish"][1][1], atol=1e-5, rtol=1e-5)


def test_text_adapter_trains_over_a_frozen_shared_vision_adapter(tmp_path):
    towers = save_towers(tmp_path / "towers")
    folder = image_folder(tmp_path / "images", per_class=6)
    shared = Trainer(TrainConfig.parse(dual_train_config(tmp_path / "vision", towers, folder,
                                                         adapter={"text_targets": None}))).fit()
    vision_file = load_file(shared.adapter_dir / "adapter_model.safetensors")
    assert all(".text." not in k for k in vision_file) and any("logit_scale" in k for k in vision_file)

    spanish = Trainer(TrainConfig.parse(dual_train_config(
        tmp_path / "spanish", towers, folder, task={"class_names": SPANISH, "templates": ["una foto de {}"]},
        adapter={"vision_targets": None, "frozen": {"vision": str(shared.adapter_dir)}})))
    result = spanish.fit()
    saved = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert saved and all(".text." in k or ".text_proj." in k for k in saved)  # no vision weights, no scale copy
    assert json.loads((result.adapter_dir / "task.json").read_text())["frozen"] == {"vision": str(shared.adapter_dir)}
    live = spanish.adapted.adapter_state("vision")  # the shared adapter did not move while Spanish trained
    for key, value in vision_file.items():
        if "lora_A" in key:
            path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            torch.testing.assert_close(live[f"{path}.lora_A"], value, rtol=0, atol=0)

    fresh = vislora.load_adapter(tiny_dual_from(towers), shared.adapter_dir, "vision")
    vislora.load_adapter(fresh, result.adapter_dir, "spanish")
    fresh.set_active(["vision", "spanish"])
    trained = spanish.adapted.eval()
    pixels = torch.randn(2, 3, 32, 32)
    tokens = fresh.tokenize(["una foto de rojo", "una foto de azul"])
    with torch.no_grad():
        for a, b in zip(fresh.eval()(images=pixels, **tokens), trained(images=pixels, **tokens), strict=True):
            torch.testing.assert_close(a, b)


def tiny_dual_from(towers):
    from vislora.dual_encoder import build_dual_encoder

    return build_dual_encoder(f"hf:{towers[0]}", f"hf:{towers[1]}", embed_dim=16)
