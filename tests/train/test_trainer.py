import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import randomize_adapters
from synthetic_images import corrupt_png, image_folder, tiny_train_config
from vislora import ConfigError
from vislora.data import DataError, ImageDataset, open_dataset
from vislora.data.datasets import collate
from vislora.errors import TrainingError
from vislora.run_config import TrainConfig
from vislora.train import checkpoint as ckpt
from vislora.train.callbacks import TrainerCallback
from vislora.train.trainer import EpochBatches, Trainer


@pytest.fixture
def folder(tmp_path):
    return image_folder(tmp_path / "images", per_class=8)


def config(tmp_path, folder, out="run", **sections):
    return TrainConfig.parse(tiny_train_config(tmp_path / out, folder, folder, **sections))


def tensors(path):
    return load_file(path)


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def metric_rows(run, split=None):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if split is None or r["split"] == split]


def test_resume_restores_optimizer_scheduler_rng_and_step_exactly(tmp_path, folder):
    # dropout, augmentation and MixUp all draw random numbers: resume must replay them exactly
    sections = {"adapter": {"dropout": 0.2}, "data": {"augment": {"mixup": 0.4}},
                "optim": {"max_steps": 9}, "run": {"save_every": 3, "eval_every": 3, "keep_last": 5}}
    straight = Trainer(config(tmp_path, folder, "a", **sections)).fit()
    interrupted = tmp_path / "b"
    shutil.copytree(straight.run_dir, interrupted)
    for name in ("checkpoints/step-000006", "checkpoints/step-000009", "adapter", "best", "summary.json"):
        path = interrupted / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    with open(interrupted / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "split": "train", "loss": 1.0}\n{"step": 6, "spl')  # logged after the checkpoint
    resumed = Trainer(config(tmp_path, folder, "b", **sections)).fit()

    assert resumed.steps == 9 and resumed.final == straight.final
    assert_same_tensors(tensors(straight.adapter_dir / "adapter_model.safetensors"),
                        tensors(resumed.adapter_dir / "adapter_model.safetensors"))
    last_a, last_b = straight.run_dir / "checkpoints/step-000009", interrupted / "checkpoints/step-000009"
    assert_same_tensors(tensors(last_a / "optimizer.safetensors"), tensors(last_b / "optimizer.safetensors"))
    assert_same_tensors(tensors(last_a / "rng-0.safetensors"), tensors(last_b / "rng-0.safetensors"))
    state_a = json.loads((last_a / "trainer_state.json").read_text())
    state_b = json.loads((last_b / "trainer_state.json").read_text())
    assert state_a == state_b and state_a["loop"]["step"] == 9 and state_a["scheduler"]["last_epoch"] == 9

    measured = ("time", "images_per_s", "step_s", "data_s", "peak_rss_mib", "seconds")  # wall clock and memory
    def comparable(run):
        return [{k: v for k, v in r.items() if k not in measured} for r in metric_rows(run)]
    assert comparable(interrupted) == comparable(straight.run_dir)


def test_checkpoints_are_complete_pruned_and_temp_folders_ignored(tmp_path, folder):
    result = Trainer(config(tmp_path, folder, run={"save_every": 2, "keep_last": 2})).fit()
    root = result.run_dir / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-000004", "step-000006"]
    for step in ckpt.list_checkpoints(root):
        names = {p.name for p in step.iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json", "task.json", "optimizer.safetensors",
                "trainer_state.json", "rng-0.safetensors", "rng-0.json"} <= names
    (root / ".step-000008.tmp").mkdir()  # what a kill during a write leaves behind
    assert ckpt.list_checkpoints(root)[-1].name == "step-000006"


def test_a_removal_killed_midway_leaves_no_checkpoint_that_looks_complete(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        (ckpt.step_dir(root, step)).mkdir(parents=True)
        for name in ("adapter_model.safetensors", "optimizer.safetensors"):
            (ckpt.step_dir(root, step) / name).write_bytes(b"x")
    real_rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):  # deletes one file, then the process dies
        if not path.exists():
            return
        next(p for p in sorted(path.iterdir())).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.remove_dir(ckpt.step_dir(root, 2))
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-000004"]  # the half-deleted one is out of sight
    ckpt.remove_dir(ckpt.step_dir(root, 4))
    assert list(root.iterdir()) == []  # and gone with the next removal


def test_run_directory_has_resolved_config_metrics_and_summary(tmp_path, folder):
    cfg = config(tmp_path, folder, run={"eval_every": 3})
    result = Trainer(cfg).fit()
    assert TrainConfig.load(result.run_dir / "config.yaml") == cfg
    train_rows = metric_rows(result.run_dir, "train")
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["images_per_s"] > 0 and math.isfinite(r["loss"]) for r in train_rows)
    val_rows = metric_rows(result.run_dir, "val")
    assert [r["step"] for r in val_rows] == [3, 6] and val_rows[-1]["accuracy"] == result.final["accuracy"]
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["trainable_params"] == result.trainable_params


def test_adapter_and_head_have_their_own_learning_rates(tmp_path, folder):
    cfg = config(tmp_path, folder, optim={"lr_adapter": 2e-3, "lr_head": 5e-2, "schedule": "constant",
                                          "warmup_steps": 0})
    trainer = Trainer(cfg)
    adapter_group, head_group = trainer.optimizer.param_groups
    names = {id(p): n for n, p in trainer.adapted.named_parameters()}
    assert adapter_group["lr"] == 2e-3 and all("lora_" in names[id(p)] for p in adapter_group["params"])
    assert head_group["lr"] == 5e-2 and all("head" in names[id(p)] for p in head_group["params"])
    assert sum(p.numel() for p in adapter_group["params"]) == sum(trainer.adapted.parameter_counts("default").values())
    trainer.fit()
    rows = metric_rows(tmp_path / "run", "train")
    assert {(r["lr_adapter"], r["lr_head"]) for r in rows} == {(2e-3, 5e-2)}


def test_warmup_then_cosine_reaches_zero(tmp_path, folder):
    Trainer(config(tmp_path, folder, optim={"warmup_steps": 2, "max_steps": 6})).fit()
    lrs = [r["lr_adapter"] for r in metric_rows(tmp_path / "run", "train")]
    peak = 1e-3
    assert lrs[0] == pytest.approx(peak * 2 / 3) and lrs[1] == pytest.approx(peak)
    assert lrs[2:] == pytest.approx([peak * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(1, 5)])


class Poisoned(ImageDataset):
    """Images whose pixels are NaN for the chosen indices (a broken float pipeline)."""

    def __init__(self, base, poison):
        super().__init__(base.records, base.classes, name=base.name)
        self.poison = set(poison)

    def __getitem__(self, index):
        sample = super().__getitem__(index)
        if index in self.poison:
            sample["image"] = torch.full_like(sample["image"], float("nan"))
        return sample


def test_nan_step_is_skipped_and_training_goes_on(tmp_path, folder):
    cfg = config(tmp_path, folder, optim={"max_steps": 4})
    base = open_dataset(folder)
    second_batch = list(EpochBatches(len(base), 4, cfg.run.seed, 0, 0, 0, 1))[1]
    result = Trainer(cfg, train_data=Poisoned(base, second_batch[:1])).fit()
    rows = metric_rows(result.run_dir, "train")
    assert [r["finite"] for r in rows] == [True, False, True, True]
    weights = tensors(result.adapter_dir / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_nan_guard_stops_after_k_bad_steps_in_a_row(tmp_path, folder):
    cfg = config(tmp_path, folder, optim={"max_steps": 20}, run={"nan_max_consecutive": 3})
    base = open_dataset(folder)
    with pytest.raises(TrainingError, match=r"NaN/Inf for 3 steps in a row \(up to step 3\).*Lower optim\.lr_adapter"):
        Trainer(cfg, train_data=Poisoned(base, range(len(base)))).fit()


def test_early_stopping_and_best_checkpoint(tmp_path, folder):
    frozen = config(tmp_path, folder, "stop", optim={"lr_adapter": 1e-12, "lr_head": 1e-12, "max_steps": 20},
                    run={"eval_every": 1, "early_stopping_patience": 2})
    result = Trainer(frozen).fit()
    assert result.stopped_early and result.steps == 3 and result.best["step"] == 1

    learning = config(tmp_path, folder, "best", optim={"max_steps": 8},
                      run={"eval_every": 1, "save_every": 1, "keep_last": 10, "best_metric": "loss"})
    result = Trainer(learning).fit()
    losses = {r["step"]: r["loss"] for r in metric_rows(result.run_dir, "val")}
    best_step = min(losses, key=lambda s: (losses[s], s))
    assert result.best == {"step": best_step, "loss": losses[best_step]}
    assert json.loads((result.best_dir / "task.json").read_text())["step"] == best_step
    assert_same_tensors(tensors(result.best_dir / "adapter_model.safetensors"),
                        tensors(result.run_dir / f"checkpoints/step-{best_step:06d}/adapter_model.safetensors"))


def test_corrupt_training_image_is_counted_or_fails_in_strict_mode(tmp_path, folder):
    corrupt_png(folder / "class2" / "zz_broken.png")
    result = Trainer(config(tmp_path, folder, "lenient", optim={"max_steps": 8})).fit()
    assert result.skipped_images == 1
    assert metric_rows(result.run_dir, "train")[-1]["skipped_images"] == 1
    with pytest.raises(DataError, match=r"zz_broken\.png cannot be decoded"):
        Trainer(config(tmp_path, folder, "strict", data={"strict": True}, optim={"max_steps": 8})).fit()


def test_mixed_resolutions_are_refused_unless_allowed(tmp_path, folder):
    from PIL import Image

    Image.new("RGB", (48, 40), "red").save(folder / "class0" / "wide.png")
    with pytest.raises(ConfigError, match=r"mixes 2 image resolutions \(32x32: 24, 48x40: 1.*allow_mixed_resolution"):
        Trainer(config(tmp_path, folder))
    Trainer(config(tmp_path, folder, data={"allow_mixed_resolution": True}, optim={"max_steps": 1})).fit()


def test_a_finished_run_is_not_overwritten_by_another_config(tmp_path, folder):
    Trainer(config(tmp_path, folder, run={"save_every": 3})).fit()
    with pytest.raises(TrainingError, match=r"different config \(optim\.lr_adapter changed\)"):
        Trainer(config(tmp_path, folder, optim={"lr_adapter": 5e-3}, run={"save_every": 3})).fit()
    with pytest.raises(TrainingError, match=r"set run\.resume: true"):
        Trainer(config(tmp_path, folder, run={"save_every": 3, "resume": False})).fit()


def test_gradient_accumulation_equals_the_larger_batch(tmp_path, folder):
    accumulated = Trainer(config(tmp_path, folder, "acc", optim={"batch_size": 4, "grad_accum": 2})).fit()
    large = Trainer(config(tmp_path, folder, "large", optim={"batch_size": 8})).fit()
    a = tensors(accumulated.adapter_dir / "adapter_model.safetensors")
    b = tensors(large.adapter_dir / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_training(tmp_path, folder):
    plain = Trainer(config(tmp_path, folder, "plain")).fit()
    checkpointed = Trainer(config(tmp_path, folder, "ckpt", run={"gradient_checkpointing": True})).fit()
    a = tensors(plain.adapter_dir / "adapter_model.safetensors")
    b = tensors(checkpointed.adapter_dir / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def activation_bytes_and_gradients(trainer):
    """Bytes of the activations autograd keeps from one forward for the backward (the peak a training step holds
    beyond the weights; tensors a checkpointed block will recompute are not kept), then the adapter gradients."""
    randomize_adapters(trainer.adapted)  # B = 0 at init would leave A without gradient
    weights = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:  # saved weights are no extra memory
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    batch = collate([trainer.train_data[i] for i in range(4)])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, _ = trainer.task.loss(trainer.model, batch, trainer.accelerator.device)
    loss.backward()
    gradients = {name: p.grad.clone() for name, p in trainer.adapted.named_parameters() if "lora_" in name}
    return sum(kept.values()), loss.detach(), gradients


def test_gradient_checkpointing_keeps_fewer_activations_for_the_same_gradients(tmp_path, folder):
    plain_bytes, plain_loss, plain_grads = activation_bytes_and_gradients(Trainer(config(tmp_path, folder, "plain")))
    ckpt_bytes, ckpt_loss, ckpt_grads = activation_bytes_and_gradients(
        Trainer(config(tmp_path, folder, "ckpt", run={"gradient_checkpointing": True})))
    # two blocks: only each block's input is kept instead of every intermediate (measured here ~7x less)
    assert ckpt_bytes < plain_bytes / 3, (ckpt_bytes, plain_bytes)
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=0, atol=0)
    assert plain_grads.keys() == ckpt_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_trains(tmp_path, folder):
    result = Trainer(config(tmp_path, folder, run={"mixed_precision": "bf16"})).fit()
    assert result.steps == 6 and all(math.isfinite(r["loss"]) for r in metric_rows(result.run_dir, "train"))


def test_bf16_runs_the_training_forward_under_autocast(tmp_path, folder):
    trainer = Trainer(config(tmp_path, folder, optim={"max_steps": 2}, run={"mixed_precision": "bf16"}))
    seen = []
    block = trainer.adapted.base_model.blocks[0]
    for module in (block.attn.qkv, block.mlp.fc1):  # an adapted layer and a plain one
        module.register_forward_hook(lambda module, args, out: seen.append((module.training, out.dtype)))
    trainer.fit()
    assert {dtype for training, dtype in seen if training} == {torch.bfloat16}
    assert {dtype for training, dtype in seen if not training} == {torch.bfloat16}  # the held-out evaluation too
    assert trainer.accelerator.scaler is None  # bf16 keeps fp32's exponent range: no loss scaling


def test_fp16_without_a_gpu_is_refused_instead_of_silently_training_fp32(tmp_path, folder):
    # Accelerate has no fp16 autocast on CPU: it would train in fp32 while the config says fp16
    with pytest.raises(ConfigError, match=r"mixed_precision fp16 needs a GPU.*bf16"):
        Trainer(config(tmp_path, folder, run={"mixed_precision": "fp16"}))


@pytest.mark.gpu
def test_fp16_autocasts_scales_the_loss_and_survives_an_overflowing_step(tmp_path, folder):
    cfg = config(tmp_path, folder, optim={"max_steps": 4}, run={"mixed_precision": "fp16"})
    base = open_dataset(folder)
    second_batch = list(EpochBatches(len(base), 4, cfg.run.seed, 0, 0, 0, 1))[1]
    trainer = Trainer(cfg, train_data=Poisoned(base, second_batch[:1]))
    assert trainer.accelerator.scaler is not None
    seen = []
    trainer.adapted.base_model.blocks[0].mlp.fc1.register_forward_hook(
        lambda module, args, out: seen.append((module.training, out.dtype)))
    scale = trainer.accelerator.scaler.get_scale()
    result = trainer.fit()  # the NaN step is skipped and lowers the loss scale; the next step unscales afresh
    assert {dtype for training, dtype in seen if training} == {torch.float16}
    finite = [r["finite"] for r in metric_rows(result.run_dir, "train")]
    assert result.steps == 4 and finite[1] is False and finite[-1] is True  # (early steps may also overflow)
    assert trainer.accelerator.scaler.get_scale() < scale


class NormProbe(TrainerCallback):
    """The global gradient norm of the trained parameters before clipping and after (at the optimizer step)."""

    def __init__(self):
        self.before, self.after = [], []

    def norm(self, trainer):
        grads = [p.grad for p in trainer.model.parameters() if p.requires_grad and p.grad is not None]
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()

    def on_gradients(self, trainer):
        self.before.append(self.norm(trainer))

    def on_step_end(self, trainer, taken):
        self.after.append(self.norm(trainer))


@pytest.mark.parametrize("max_grad_norm", [0.05, None])
def test_clipping_bounds_the_global_gradient_norm_at_the_step(tmp_path, folder, max_grad_norm):
    probe = NormProbe()
    cfg = config(tmp_path, folder, data={"val": None}, optim={"max_steps": 2, "max_grad_norm": max_grad_norm})
    result = Trainer(cfg, callbacks=[probe]).fit()
    assert len(probe.before) == len(probe.after) == 2
    logged = [r["grad_norm"] for r in metric_rows(result.run_dir, "train")]
    assert logged == pytest.approx(probe.before, rel=1e-5)  # the log shows the norm before clipping
    if max_grad_norm is None:
        assert probe.after == probe.before
        return
    assert all(before > 2 * max_grad_norm for before in probe.before)  # so clipping had work to do
    assert all(after <= max_grad_norm * (1 + 1e-5) for after in probe.after), probe.after


@pytest.mark.slow
def test_compiled_model_gives_the_eager_output(tmp_path, folder):
    tiny = {"model": {"spec": "timm:vit_tiny_patch16_224", "pretrained": False,  # one block: compiles faster
                      "kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}}}
    compiled = Trainer(config(tmp_path, folder, "compiled", run={"compile": True}, **tiny)).adapted.eval()
    eager = Trainer(config(tmp_path, folder, "eager", **tiny)).adapted.eval()  # same seed: the same weights
    randomize_adapters(compiled)
    randomize_adapters(eager)
    traced = []
    compiled.base_model.blocks[0].register_forward_pre_hook(
        lambda module, args: traced.append(torch.compiler.is_compiling()))
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, out = eager(images), compiled(images)
    assert traced == [True]  # the forward went through torch.compile (the hook ran only while tracing)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)  # inductor may reorder float sums


def test_worker_processes_do_not_change_what_is_trained(tmp_path, folder):
    # augmentation is seeded per (seed, epoch, sample), not by whichever process decodes the image
    inline = Trainer(config(tmp_path, folder, "inline", optim={"max_steps": 3})).fit()
    workers = Trainer(config(tmp_path, folder, "workers", data={"num_workers": 2}, optim={"max_steps": 3})).fit()
    assert_same_tensors(tensors(inline.adapter_dir / "adapter_model.safetensors"),
                        tensors(workers.adapter_dir / "adapter_model.safetensors"))
