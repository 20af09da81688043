"""AdaLoRA: the budget schedule, importance-driven pruning, orthogonality, PEFT-loadable export, exact resume."""

import copy

import peft
import pytest
import torch
from torch import nn

import vislora
from conftest import tiny_timm
from vislora import AdapterConfig
from vislora.adapters.adalora import RankAllocator, orthogonality

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 3])
BUDGET = {"target_rank": 2, "tinit": 2, "tfinal": 4, "delta_t": 2}


def adalora_vit(**budget) -> vislora.AdaptedModel:
    cfg = AdapterConfig(rank=6, alpha=6, targets=["q", "v", "o", "fc1"], method="adalora",
                        adalora={**BUDGET, **budget}, modules_to_save=["head"])
    torch.manual_seed(0)
    return vislora.inject(tiny_timm(), cfg)


def train(model: nn.Module, steps: int, total: int, start: int = 1, optimizer=None):
    """What the trainer does each step: loss + auxiliary terms, backward, step, allocator, zero_grad."""
    optimizer = optimizer or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(start, start + steps):
        loss = nn.functional.cross_entropy(model(X), Y) + model.auxiliary_loss()
        loss.backward()
        optimizer.step()
        model.after_optimizer_step(step, total)
        optimizer.zero_grad()
    return optimizer


def test_budget_falls_on_the_cubic_schedule():
    model = adalora_vit(tinit=10, tfinal=20)
    allocator = model.hooks["default"]
    layers = model.layers()
    assert allocator.initial_budget == 6 * (2 * 2 + 2 + 2)  # q,v slices = 2 pairs per qkv; o, fc1: 1 pair
    assert allocator.target_budget == 2 * (2 * 2 + 2 + 2)
    init, target = allocator.initial_budget, allocator.target_budget
    assert allocator.budget(10, 100) == (init, False)
    for step in (11, 40, 79, 80):
        expected = int((init - target) * (1 - (step - 10) / 70) ** 3 + target)
        assert allocator.budget(step, 100) == (expected, step % 2 == 0)
    assert allocator.budget(81, 100) == (target, True)
    assert len(layers) == 6


def test_training_prunes_to_the_target_budget_with_uneven_ranks_and_reports_them():
    model = adalora_vit()
    train(model, steps=20, total=20)
    ranks = model.adapter_ranks("default")
    assert sum(ranks.values()) == model.hooks["default"].target_budget
    assert len(set(ranks.values())) > 1  # importance, not a uniform cut
    assert model.adapter_metrics()["adalora.default.rank_budget"] == sum(ranks.values())


def test_the_budget_goes_where_the_gradients_are():
    class TwoPaths(nn.Module):
        def __init__(self):
            super().__init__()
            self.useful, self.ignored = nn.Linear(8, 4), nn.Linear(8, 4)

        def forward(self, x):
            return self.useful(x) + 0.0 * self.ignored(x)

    torch.manual_seed(0)  # without the regulariser, whose gradients would score the ignored layer's A and B too
    options = {"target_rank": 2, "delta_t": 1, "orth_reg_weight": 0.0}
    model = vislora.inject(TwoPaths(), AdapterConfig(rank=4, alpha=4, targets=["useful", "ignored"], method="adalora",
                                                     adalora=options))
    x, target = torch.randn(16, 8), torch.randn(16, 4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, 11):
        assert model.auxiliary_loss() is None  # no regulariser asked for
        nn.functional.mse_loss(model(x), target).backward()
        optimizer.step()
        model.after_optimizer_step(step, 10)
        optimizer.zero_grad()
    assert model.adapter_ranks("default") == {"ignored": 0, "useful": 4}


def test_orthogonality_term_equals_its_definition_and_is_in_the_loss():
    model = adalora_vit()
    layers = {p: layer for p, layer in model.layers().items() if "default" in layer.adapters}
    terms = []
    for layer in layers.values():
        spec = layer.adapters["default"]
        for j in range(spec.layout.pairs):
            a = layer.adapters["default"].lora_A[j * 6:(j + 1) * 6]
            b = layer.adapters["default"].lora_B[j] if spec.layout.blocks else layer.adapters["default"].lora_B
            terms += [torch.linalg.norm(a @ a.T - torch.eye(6)), torch.linalg.norm(b.T @ b - torch.eye(6))]
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(orthogonality(model.layers_of("default")), expected)
    torch.testing.assert_close(model.auxiliary_loss(), 0.5 * expected)
    model.set_trainable([])
    assert model.auxiliary_loss() is None  # a frozen adapter adds nothing


def test_export_is_a_plain_lora_peft_loads_with_per_layer_ranks(tmp_path):
    model = adalora_vit()
    train(model, steps=12, total=20)
    model.eval()
    expected = model(X)
    vislora.save_adapter(model, tmp_path)
    reference = peft.PeftModel.from_pretrained(tiny_timm(), tmp_path).eval()
    torch.testing.assert_close(reference(X), expected, rtol=1e-5, atol=1e-5)
    again = vislora.load_adapter(tiny_timm(), tmp_path)
    assert again.configs["default"].method == "lora"
    kept = {p: r for p, r in model.adapter_ranks("default").items() if r}
    assert again.adapter_ranks("default") == kept
    torch.testing.assert_close(again(X), expected, rtol=1e-5, atol=1e-5)
    assert model.adapters == ("default",) and model.active_adapters == ("default",)  # the export left no trace


def test_resume_from_saved_state_continues_exactly(tmp_path):
    straight = adalora_vit()
    train(straight, steps=16, total=16)
    first = adalora_vit()
    optimizer = train(first, steps=8, total=16)
    vislora.save_adapter(first, tmp_path)
    resumed = adalora_vit()
    vislora.load_adapter_weights(resumed, tmp_path)
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    fresh = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2)
    fresh.load_state_dict(optimizer_state)
    train(resumed, steps=8, total=16, start=9, optimizer=fresh)
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert straight.adapter_ranks("default") == resumed.adapter_ranks("default")


def test_routing_and_merge_see_the_pruned_adapter():
    model = adalora_vit()
    train(model, steps=12, total=20)
    model.add_adapter("other", AdapterConfig(rank=2, alpha=2, targets=["qkv"]))
    model.eval()
    with torch.no_grad():
        routed = model(X, adapters=["default", None, "default", "other"])
        model.set_active("default")
        alone = model(X)
        model.merge()
        merged = model(X)
    torch.testing.assert_close(routed[[0, 2]], alone[[0, 2]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged, alone, rtol=1e-5, atol=1e-5)


def test_allocator_state_round_trips():
    model = adalora_vit()
    train(model, steps=5, total=20)
    allocator = model.hooks["default"]
    copy_of = RankAllocator(allocator.adapters, "default", allocator.options)
    copy_of.load_state(allocator.state())
    for key, value in allocator.triplet_scores().items():
        torch.testing.assert_close(copy_of.triplet_scores()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize(("options", "message"), [
    ({"target_rank": 8}, "target_rank=8 exceeds rank=6"),
])
def test_bad_budgets_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        AdapterConfig(rank=6, targets=["qkv"], method="adalora", adalora=options)
