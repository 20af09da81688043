import json
import math
from pathlib import Path

import pytest
import torch

from synthetic_images import TAGS, tag_manifest, tiny_train_config
from vislora.data import AttributeSet, MultiLabelFormat, collate, manifest
from vislora.data.transforms import SampleTransform, build_transform
from vislora.errors import ConfigError, DataError, VisloraWarning
from vislora.evaluate.multilabel import tune_thresholds
from vislora.run_config import TrainConfig
from vislora.runs import load_trained
from vislora.tasks.multilabel import MultilabelLoss, attribute_scores, pos_weights, saved_thresholds
from vislora.train.trainer import Trainer


def ml_config(tmp_path, train, val=None, out="run", multilabel=None, **sections):
    data = tiny_train_config(tmp_path / out, train, val, **sections)
    data["task"] = {"kind": "multilabel", **({"multilabel": multilabel} if multilabel else {})}
    return TrainConfig.parse(data)


def rows(run, split):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def test_bce_with_pos_weight_equals_a_hand_computation():
    attrs = AttributeSet(("a", "b"))
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    w = [3.0, 0.5]
    terms = [-w[0] * math.log(sig(2.0)), -math.log(1 - sig(-1.0)), -math.log(1 - sig(0.5)), -w[1] * math.log(sig(0.0))]
    loss = MultilabelLoss(attrs, "bce", pos_weight=torch.tensor(w))(logits, targets)
    assert loss.item() == pytest.approx(sum(terms) / 4, rel=1e-6)  # mean over 2 images x 2 decisions
    plain = MultilabelLoss(attrs)(logits, targets)
    assert plain.item() == pytest.approx(torch.nn.functional.binary_cross_entropy_with_logits(logits, targets).item())


def test_asymmetric_loss_equals_a_hand_computation():
    attrs = AttributeSet(("a", "b", "c"))
    logits = torch.tensor([[1.5, -0.3, 0.8]])
    targets = torch.tensor([[1.0, 0.0, 0.0]])
    gamma_neg, gamma_pos, clip = 4.0, 1.0, 0.05
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    positive = -((1 - sig(1.5)) ** gamma_pos) * math.log(sig(1.5))
    negatives = 0.0
    for x in (-0.3, 0.8):
        p_m = max(sig(x) - clip, 0.0)
        negatives += -(p_m ** gamma_neg) * math.log(1 - p_m)
    loss = MultilabelLoss(attrs, "asymmetric", gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip)(logits, targets)
    assert loss.item() == pytest.approx((positive + negatives) / 3, rel=1e-6)


def test_single_choice_group_uses_cross_entropy_and_softmax_scores():
    attrs = AttributeSet(("cotton", "silk", "wool", "striped"), groups={"fabric": ("cotton", "silk", "wool")},
                         single_choice=("fabric",))
    logits = torch.tensor([[0.2, 1.0, -0.5, 0.7]])
    targets = attrs.encode(("silk", "striped"))[None]
    exps = [math.exp(v) for v in (0.2, 1.0, -0.5)]
    cross_entropy = -math.log(exps[1] / sum(exps))
    bce = -math.log(1 / (1 + math.exp(-0.7)))
    assert MultilabelLoss(attrs)(logits, targets).item() == pytest.approx((cross_entropy + bce) / 2, rel=1e-6)
    scores = attribute_scores(logits, attrs)
    assert scores[0, :3].tolist() == pytest.approx([e / sum(exps) for e in exps])
    assert scores[0, 3].item() == pytest.approx(1 / (1 + math.exp(-0.7)))


def test_pos_weight_auto_is_negatives_over_positives_and_mapping_names_are_checked():
    attrs = AttributeSet(("a", "b", "c"))
    assert pos_weights("auto", attrs, {"a": 2, "b": 8, "c": 0}, 10).tolist() == [4.0, 0.25, 1.0]
    assert pos_weights({"b": 3.0}, attrs, {}, 10).tolist() == [1.0, 3.0, 1.0]
    assert pos_weights("none", attrs, {}, 10) is None
    with pytest.raises(ConfigError, match=r"pos_weight names \['z'\], which are not attributes"):
        pos_weights({"z": 2.0}, attrs, {}, 10)


def test_config_errors_name_the_fix(tmp_path):
    train = tmp_path / "t.csv"
    base = tiny_train_config(tmp_path / "o", train)
    with pytest.raises(ConfigError, match=r"task\.multilabel is set but task\.kind is 'classification'"):
        TrainConfig.parse({**base, "task": {"multilabel": {"loss": "asymmetric"}}})
    with pytest.raises(ConfigError, match="mixup mix single-label class targets"):
        TrainConfig.parse({**base, "task": {"kind": "multilabel"},
                           "data": {**base["data"], "augment": {"mixup": 0.2}}})
    config = TrainConfig.parse({**base, "task": {"kind": "multilabel"}})
    assert config.run.best_metric == "map"
    assert TrainConfig.parse(config.model_dump(mode="json")).run.best_metric == "map"


@pytest.mark.slow
def test_multilabel_run_learns_saves_thresholds_and_loads(tmp_path):
    train = tag_manifest(tmp_path / "data", n=48, seed=0, name="train.csv")
    val = tag_manifest(tmp_path / "data", n=24, seed=1, name="val.csv")
    config = ml_config(tmp_path, train, val, multilabel={"loss": "bce"},
                       optim={"batch_size": 8, "max_steps": 24, "lr_adapter": 3e-3, "lr_head": 3e-2},
                       data={"augment": {"enabled": False}}, run={"eval_every": 12, "save_every": 12})
    result = Trainer(config).fit()

    losses = [r["loss"] for r in rows(result.run_dir, "train")]
    assert sum(losses[-6:]) / 6 < 0.7 * sum(losses[:6]) / 6
    val_rows = rows(result.run_dir, "val")
    assert [r["step"] for r in val_rows] == [12, 24] and val_rows[-1]["map"] > 0.9
    assert set(result.final) == {"map", "micro_f1", "macro_f1", "loss"} and result.best["map"] == max(
        r["map"] for r in val_rows)
    for folder in (result.adapter_dir, result.best_dir, result.run_dir / "checkpoints" / "step-000024"):
        task = json.loads((folder / "task.json").read_text())
        assert task["task"] == "multilabel" and task["classes"] == sorted(TAGS)
        assert task["attributes"]["names"] == task["classes"] and len(task["thresholds"]["values"]) == 4
        assert task["thresholds"]["tuned_on"].endswith("val.csv at step 24") or folder == result.best_dir

    model, task = load_trained(result.adapter_dir)
    data = manifest(val, multilabel=MultiLabelFormat())
    data.transform = SampleTransform(build_transform(task["input_spec"], train=False))
    batch = collate([data[i] for i in range(len(data))])
    with torch.no_grad():
        scores = attribute_scores(model(batch["image"]), AttributeSet.from_dict(task["attributes"]))
    retuned = tune_thresholds(scores, batch["label"], task["classes"])
    assert saved_thresholds(task).tolist() == pytest.approx(retuned.values, abs=1e-6)


def test_without_val_thresholds_are_tuned_on_training_data_with_a_warning(tmp_path):
    train = tag_manifest(tmp_path / "data", n=16, name="train.csv")
    config = ml_config(tmp_path, train, multilabel={"thresholds": "precision", "target_precision": 0.5,
                                                    "loss": "asymmetric"}, optim={"max_steps": 2})
    with pytest.warns(VisloraWarning, match=r"no data\.val: per-attribute thresholds are tuned on the training images"):
        result = Trainer(config).fit()
    thresholds = json.loads((result.adapter_dir / "task.json").read_text())["thresholds"]
    assert thresholds["mode"] == "precision" and thresholds["target_precision"] == 0.5
    assert thresholds["tuned_on"].endswith("train.csv at step 2")


def test_groups_and_unknown_labels_are_checked_against_the_training_attributes(tmp_path):
    train = tag_manifest(tmp_path / "data", n=12, name="train.csv")
    config = ml_config(tmp_path, train, multilabel={"attributes": ["red", "green", "blue"]})
    with pytest.raises(DataError, match=r"train\.csv line \d+: 'yellow' is not an attribute; valid names: "
                                        "red, green, blue"):
        Trainer(config)
    single = ml_config(tmp_path, train, multilabel={"groups": {"warm": ["red", "yellow"]},
                                                    "single_choice": ["warm"]})
    with pytest.raises(DataError, match=r"single-choice group 'warm' needs exactly one of"):
        Trainer(single)


def test_the_example_config_trains_on_a_tiny_manifest(tmp_path):
    example = Path(__file__).resolve().parents[2] / "examples" / "multilabel_manifest.yaml"
    train = tag_manifest(tmp_path / "data", n=16, name="train.csv")
    tiny = tiny_train_config(tmp_path / "run", train)
    overrides = [f"model={json.dumps(tiny['model'])}", f"data.train={train}", "data.val=null", "data.image_size=32",
                 "task.multilabel.groups={}", "task.multilabel.single_choice=[]", "optim.max_steps=2",
                 "optim.batch_size=8", "optim.warmup_steps=0", f"run.output_dir={tmp_path / 'run'}", "run.eval_every=0",
                 "run.save_every=0", "run.progress=false"]
    config = TrainConfig.load(example, overrides)
    assert config.task.multilabel.loss == "asymmetric" and config.run.best_metric == "map"
    with pytest.warns(VisloraWarning, match=r"no data\.val"):
        result = Trainer(config).fit()
    assert json.loads((result.adapter_dir / "task.json").read_text())["task"] == "multilabel"
