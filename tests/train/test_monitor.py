import json
import logging
import math

import pytest
import torch

from synthetic_images import image_folder, tiny_train_config
from vislora.run_config import TrainConfig
from vislora.train.monitor import GradientMonitor, layer_gradient_norms
from vislora.train.trainer import Trainer


def test_monitored_run_logs_every_layer_gradient_norm(tmp_path):
    folder = image_folder(tmp_path / "images", per_class=4)
    cfg = TrainConfig.parse(tiny_train_config(tmp_path / "run", folder, run={"monitor_gradients": True}))
    seen = []

    class Spy(GradientMonitor):  # the norms the monitor logs, against an independent computation
        def on_gradients(self, trainer):
            super().on_gradients(trainer)
            layers = trainer.adapted.layers()
            seen.append({p: math.sqrt(sum(float(x.grad.square().sum()) for x in (layer.adapters["default"].lora_A,
                                                                                 layer.adapters["default"].lora_B)))
                         for p, layer in layers.items()})

    trainer = Trainer(cfg, callbacks=[Spy()])
    assert sum(isinstance(c, GradientMonitor) for c in trainer.callbacks) == 2  # the config added its own
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 6 and len(seen) == 6
    for row, expected in zip(train, seen, strict=True):
        assert {k.removeprefix("grad_norm/") for k in row if k.startswith("grad_norm/")} == set(expected)
        for path, norm in expected.items():
            assert row[f"grad_norm/{path}"] == pytest.approx(norm, rel=1e-5)
        assert row["grad_norm_max"] == pytest.approx(max(expected.values()), rel=1e-5)
        assert row["grad_vanishing"] == 0 and row["grad_exploding"] == 0
    assert all(v > 0 for v in seen[0].values())  # at B = 0 the pair still gets B's gradient


def test_vanishing_and_exploding_layers_are_flagged_and_warned_once(caplog):
    monitor = GradientMonitor(vanishing_ratio=1e-3, exploding_ratio=100.0)
    calm = {"blocks.0.attn.qkv": 0.5, "blocks.1.attn.qkv": 0.4, "blocks.2.attn.qkv": 0.6}
    with caplog.at_level(logging.WARNING, logger="vislora.train.monitor"):
        for step in range(1, 4):
            monitor.observe(calm, step)
        assert monitor.vanishing == [] and monitor.exploding == [] and not caplog.records
        monitor.observe({**calm, "blocks.0.attn.qkv": 1e-5, "blocks.2.attn.qkv": 80.0}, 4)
        assert monitor.vanishing == ["blocks.0.attn.qkv"] and monitor.exploding == ["blocks.2.attn.qkv"]
        monitor.observe({**calm, "blocks.0.attn.qkv": 1e-5, "blocks.1.attn.qkv": math.inf}, 5)
        assert monitor.exploding == ["blocks.1.attn.qkv"]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages  # vanishing 0, exploding 2, exploding 1: each layer warned once per kind
    assert "step 4: vanishing gradients in 1 adapter layers" in messages[0] and "blocks.0.attn.qkv" in messages[0]
    assert "step 4: exploding" in messages[1] and "blocks.2.attn.qkv (8.00e+01)" in messages[1]
    metrics = monitor.metrics(None)
    assert metrics["grad_vanishing"] == 1 and metrics["grad_exploding"] == 1
    assert metrics["grad_norm/blocks.1.attn.qkv"] == math.inf


def test_no_gradient_at_all_counts_as_zero(vit):
    import vislora

    model = vislora.inject(vit, vislora.AdapterConfig(rank=2, alpha=2, targets=["fc1"]))
    assert set(layer_gradient_norms(model).values()) == {0.0}
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    norms = layer_gradient_norms(model)
    assert len(norms) == 2 and all(v > 0 for v in norms.values())
    monitor = GradientMonitor()
    monitor.observe(dict.fromkeys(norms, 0.0), 1)
    assert sorted(monitor.vanishing) == sorted(norms)
