"""The health verdict: rules over the per-layer numbers, each giving a reason (with the figures) and advice."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

from vislora.diagnostics.records import LayerDiagnostics, Verdict

LOW_UTILISATION = 0.3  # below: the rank is larger than the adapter uses
HIGH_UTILISATION = 0.9  # above: every direction is in use, the rank may be limiting
UTILISATION_SPREAD = 2.0  # module types whose mean utilisation differs by this factor want their own ranks
LARGE_CHANGE = 1.0  # ||delta_W|| / ||W|| above this: the adapter outweighs the pretrained weight
TINY_CHANGE = 1e-4  # median ||delta_W|| / ||W|| below this: the adapter barely moved W


def verdict(layers: list[LayerDiagnostics], threshold: float = 0.9) -> Verdict:
    """A health verdict computed from the per-layer numbers; see the module constants for the limits."""
    if not layers:
        return Verdict("broken", ["the adapter has no low-rank layers"], ["check that the right directory was given"])
    broken = [layer for layer in layers if not layer.finite]
    if broken:
        return Verdict("broken", [f"{len(broken)} of {len(layers)} layers hold NaN/Inf weights (first: "
                                  f"{broken[0].path})"],
                       ["the adapter is unusable: take the last good checkpoint (checkpoints/step-N) or retrain with "
                        "a lower optim.lr_adapter and gradient clipping on (optim.max_grad_norm)"])
    untrained = [layer for layer in layers if layer.untrained]
    if len(untrained) == len(layers):
        return Verdict("untrained", [f"B = 0 in all {len(layers)} layers: scale * B @ A is zero, the adapter "
                                     "changes nothing"],
                       ["train it: check that the adapter was active and trainable, that optim.lr_adapter > 0, "
                        "and that the directory was saved after training"])
    result = Verdict("attention")
    if untrained:
        result.reasons.append(f"{len(untrained)} of {len(layers)} layers still have B = 0 (first: "
                              f"{untrained[0].path}): no gradient reached them")
        result.recommendations.append("check that those layers are on the forward path of the task; "
                                      "run.monitor_gradients: true logs per-layer gradient norms")
    trained = [layer for layer in layers if not layer.untrained]
    _rank_rules(trained, threshold, result)
    _change_rules(trained, result)
    if not result.reasons:
        u = statistics.fmean(layer.utilisation for layer in trained)
        result.status = "healthy"
        result.reasons.append(f"all {len(layers)} layers are trained and finite; mean rank utilisation {u:.2f} "
                              f"(between {LOW_UTILISATION} and {HIGH_UTILISATION})")
    return result


def _rank_rules(trained: list[LayerDiagnostics], threshold: float, result: Verdict) -> None:
    mean_u = statistics.fmean(layer.utilisation for layer in trained)
    mean_erank = statistics.fmean(layer.effective_rank for layer in trained)
    ranks = sorted({layer.rank for layer in trained})
    needed = max(layer.energy_rank for layer in trained)
    if mean_u < LOW_UTILISATION:
        result.reasons.append(f"mean rank utilisation {mean_u:.2f} < {LOW_UTILISATION}: the layers use an effective "
                              f"rank of {mean_erank:.1f} out of rank {_ranks(ranks)}")
        result.recommendations.append(f"lower the rank to {_power_of_two(needed)}: no layer needs more than "
                                      f"{needed} directions for {threshold:.0%} of its energy")
    elif mean_u > HIGH_UTILISATION:
        result.reasons.append(f"mean rank utilisation {mean_u:.2f} > {HIGH_UTILISATION}: nearly every direction of "
                              f"rank {_ranks(ranks)} is in use")
        result.recommendations.append(f"try rank {2 * max(ranks)} and compare held-out accuracy; the rank may be "
                                      "limiting the adapter")
    by_type: dict[str, list[LayerDiagnostics]] = defaultdict(list)
    for layer in trained:
        by_type[layer.module].append(layer)
    if len(by_type) < 2:
        return
    means = {t: statistics.fmean(m.utilisation for m in members) for t, members in by_type.items()}
    low, high = min(means, key=means.get), max(means, key=means.get)
    if means[low] > 0 and means[high] / means[low] < UTILISATION_SPREAD:
        return
    result.reasons.append(f"rank utilisation differs across module types: {high} {means[high]:.2f} vs {low} "
                          f"{means[low]:.2f} (ratio > {UTILISATION_SPREAD:g})")
    pattern = {t: _power_of_two(max(m.energy_rank for m in members)) for t, members in by_type.items()
               if "[" not in t}
    if pattern:
        result.recommendations.append(f"give module types their own ranks: rank_pattern {pattern} (each the "
                                      f"{threshold:.0%}-energy rank of its busiest layer)")
    else:
        result.recommendations.append(f"{low} and {high} are slices of one fused layer and share its rank: drop "
                                      f"the little-used {low.partition('[')[2].rstrip(']')} from targets, or raise "
                                      "the rank if accuracy is short")


def _change_rules(trained: list[LayerDiagnostics], result: Verdict) -> None:
    relative = [(layer.relative_norm, layer) for layer in trained if layer.relative_norm is not None]
    if not relative:
        return
    large = [layer for value, layer in relative if value > LARGE_CHANGE]
    if large:
        worst = max(relative, key=lambda item: item[0])
        result.reasons.append(f"{len(large)} of {len(trained)} trained layers change W by more than its own norm "
                              f"(largest ||delta_W||/||W|| = {worst[0]:.2f} in {worst[1].path})")
        result.recommendations.append("lower optim.lr_adapter or alpha; such large updates overwrite the "
                                      "pretrained features")
    median = statistics.median(value for value, _ in relative)
    if median < TINY_CHANGE:
        result.reasons.append(f"median ||delta_W||/||W|| = {median:.1e} < {TINY_CHANGE:g}: the adapter barely "
                              "changes the weights")
        result.recommendations.append("train longer or raise optim.lr_adapter / alpha")


def _power_of_two(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _ranks(ranks: list[int]) -> str:
    return "/".join(str(r) for r in ranks)
