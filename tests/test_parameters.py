from torch import nn

import vislora
from vislora import AdapterConfig, parameter_report


def test_seed_figure_768_linear_rank_16():
    model = vislora.inject(nn.Sequential(nn.Linear(768, 768)), AdapterConfig(rank=16, alpha=16, targets=["0"]))
    report = parameter_report(model)
    assert report.adapter == report.trainable == 24_576
    assert report.base == 590_592
    assert round(report.reduction_percent, 1) == 95.8
    assert report.trainable_bytes == report.adapter_bytes == 24_576 * 4
    text = str(report)
    assert "24,576" in text and "590,592" in text and "95.8% fewer than full fine-tuning" in text


def test_report_counts_each_adapter_and_only_active_as_trainable(vit):
    base_total = sum(p.numel() for p in vit.parameters())
    model = vislora.inject(vit, AdapterConfig(rank=4, alpha=8, targets=["qkv"], modules_to_save=["head"]), "a")
    model.add_adapter("b", AdapterConfig(rank=2, alpha=4, targets=["fc1"]))
    report = parameter_report(model)
    qkv_a = 2 * 4 * (32 + 96)
    head = 32 * 5 + 5
    fc1_b = 2 * 2 * (32 + 128)
    assert report.per_adapter == {"a": qkv_a + head, "b": fc1_b}
    assert report.base == base_total
    assert report.trainable == qkv_a + head  # "a" is active, "b" is not
    assert abs(report.trainable_percent - 100 * report.trainable / (base_total + qkv_a + head + fc1_b)) < 1e-9


def test_plain_module_report(vit):
    report = parameter_report(vit)
    assert report.adapter == 0 and report.trainable == report.base == report.total
