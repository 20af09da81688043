"""The report's PNG plots, drawn with matplotlib's Agg canvas (no pyplot, no display, no global backend switch).

Each function draws from real figures (metrics.jsonl rows, a Comparison, a Diagnosis, a ParameterReport),
writes one PNG atomically and returns its path, or returns None when there is nothing to draw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from vislora.diagnostics import Diagnosis
from vislora.evaluate import Comparison, Drift
from vislora.io import atomic_write

BASE_COLOUR, ADAPTED_COLOUR = "#8c8c8c", "#1f77b4"
DPI = 100


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return path


def training_curves(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Train loss (raw and moving average), held-out accuracy/loss, learning rates, and gradient norms if logged."""
    train = [r for r in rows if r.get("split") == "train" and _finite(r.get("loss"))]
    val = [r for r in rows if r.get("split") == "val"]
    if not train:
        return None
    grads = [r for r in train if "grad_norm_median" in r]
    panels = 3 + bool(grads)
    fig = Figure(figsize=(4.2 * panels, 3.4))
    axes = fig.subplots(1, panels)
    steps, loss = [r["step"] for r in train], [r["loss"] for r in train]
    window = len(loss) // 20
    axes[0].plot(steps, loss, color=ADAPTED_COLOUR, alpha=0.35 if window > 1 else 1.0, lw=1, label="train loss")
    if window > 1:
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        axes[0].plot(steps[window - 1:], smooth, color=ADAPTED_COLOUR, lw=2, label=f"moving average ({window})")
    if val:
        axes[0].plot([r["step"] for r in val], [r["loss"] for r in val], "o-", color="#d62728", label="held-out loss")
    if len(val) > 1:
        key = _headline(val[0])
        axes[1].plot([r["step"] for r in val], [r[key] for r in val], "o-", color="#2ca02c")
        axes[1].set_ylabel(f"held-out {key}")
    elif val:
        _one_evaluation(axes[1], val[0])
    else:
        axes[1].text(0.5, 0.5, "no held-out evaluation logged", ha="center", va="center", transform=axes[1].transAxes)
    axes[0].set_ylabel("loss")
    axes[0].legend(fontsize=8)
    for key, label in (("lr_adapter", "adapter"), ("lr_head", "head")):
        axes[2].plot(steps, [r.get(key, math.nan) for r in train], label=label)
    axes[2].set_ylabel("learning rate")
    axes[2].legend(fontsize=8)
    if grads:
        grad_steps = [r["step"] for r in grads]
        axes[3].fill_between(grad_steps, [r["grad_norm_min"] for r in grads], [r["grad_norm_max"] for r in grads],
                             color=ADAPTED_COLOUR, alpha=0.25, label="min-max over layers")
        axes[3].plot(grad_steps, [r["grad_norm_median"] for r in grads], color=ADAPTED_COLOUR, label="median layer")
        axes[3].set_yscale("log")
        axes[3].set_ylabel("adapter gradient norm")
        axes[3].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel(ax.get_xlabel() or "step")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def telemetry(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Step time (data loading shaded), peak memory per logging interval, and the size of each checkpoint written,
    from the telemetry fields of metrics.jsonl (vislora.train.telemetry); None for a run logged without them."""
    train = [r for r in rows if r.get("split") == "train" and _finite(r.get("step_s"))]
    saved = [r for r in rows if r.get("split") == "checkpoint" and "bytes" in r]
    if not train:
        return None
    fig = Figure(figsize=(12.6, 3.4))
    time_ax, memory_ax, size_ax = fig.subplots(1, 3)
    steps = [r["step"] for r in train]
    time_ax.plot(steps, [r["step_s"] for r in train], color=ADAPTED_COLOUR, label="step")
    time_ax.fill_between(steps, 0, [r.get("data_s", 0.0) for r in train], color=BASE_COLOUR, alpha=0.5,
                         label="of which data loading")
    time_ax.set_ylim(bottom=0)
    time_ax.set_ylabel("seconds per optimizer step")
    time_ax.legend(fontsize=8)
    memory_ax.plot(steps, [r.get("peak_rss_mib", math.nan) for r in train], color=ADAPTED_COLOUR,
                   label="process (peak RSS)")
    if any("peak_cuda_mib" in r for r in train):
        memory_ax.plot(steps, [r.get("peak_cuda_mib", math.nan) for r in train], color="#d62728",
                       label="CUDA allocated")
        memory_ax.plot(steps, [r.get("peak_cuda_reserved_mib", math.nan) for r in train], color="#d62728", ls="--",
                       label="CUDA reserved")
    memory_ax.set_ylim(bottom=0)
    memory_ax.set_ylabel("peak memory (MiB)")
    memory_ax.legend(fontsize=8)
    if saved:
        for kind, colour in (("checkpoints/", ADAPTED_COLOUR), ("best", "#2ca02c"), ("adapter", BASE_COLOUR)):
            chosen = [r for r in saved if r["path"].startswith(kind)]
            if chosen:
                size_ax.plot([r["step"] for r in chosen], [r["bytes"] / 1024 for r in chosen], "o", color=colour,
                             label=kind.rstrip("/"))
        size_ax.set_ylim(bottom=0)
        size_ax.legend(fontsize=8)
        size_ax.set_ylabel("written (KiB)")
    else:
        size_ax.text(0.5, 0.5, "no checkpoint written (run.save_every: 0)", ha="center", va="center",
                     transform=size_ax.transAxes)
    for ax in (time_ax, memory_ax, size_ax):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _headline(row: dict[str, Any]) -> str:
    """The held-out figure a val row leads with: accuracy, mAP for multi-label runs, exact match for VQA runs, else
    (captioning) the loss."""
    return next((key for key in ("accuracy", "map", "exact_match") if key in row), "loss")


def _one_evaluation(ax: Any, row: dict[str, Any]) -> None:
    """A single held-out evaluation as a labelled bar on a 0-1 scale (one point is no curve)."""
    key = _headline(row)
    accuracy = row[key]
    ax.barh([f"step {row['step']}"], [accuracy], color="#2ca02c", height=0.5)
    ax.text(accuracy / 2, 0, f"{accuracy:.4f}", ha="center", va="center", color="white", fontsize=11,
            fontweight="bold")
    ax.set_xlim(0, max(1.0, accuracy))  # a loss may pass 1
    ax.set_xlabel(f"held-out {key}")
    n = f" on {row['n']:,} images" if "n" in row else ""
    ax.set_title(f"evaluated once{n}; run.eval_every gives a curve", fontsize=8)


def per_class_bars(comparison: Comparison, path: Path) -> Path | None:
    """Accuracy per class, base beside adapted; regressions marked."""
    deltas = comparison.per_class
    if not deltas:
        return None
    x = np.arange(len(deltas))
    fig = Figure(figsize=(max(6.0, 0.6 * len(deltas) + 2), 3.8))
    ax = fig.subplots()
    ax.bar(x - 0.2, [d.base for d in deltas], 0.4, color=BASE_COLOUR, label="base")
    ax.bar(x + 0.2, [d.adapted for d in deltas], 0.4, color=ADAPTED_COLOUR, label="adapted")
    for i, d in enumerate(deltas):
        if d.regression:
            ax.annotate("regression", (i + 0.2, d.adapted), ha="center", va="bottom", color="#d62728", fontsize=7)
    ax.set_xticks(x, [d.name for d in deltas], rotation=35 if len(deltas) > 6 else 0, ha="right")
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def confusion_matrices(comparison: Comparison, classes: Sequence[str], path: Path) -> Path:
    """Row-normalised confusion matrices of base and adapted, with counts when there are few classes."""
    fig = Figure(figsize=(11, 4.8))
    axes = fig.subplots(1, 2)
    for ax, (title, metrics) in zip(axes, (("base", comparison.base), ("adapted", comparison.adapted)), strict=True):
        counts = np.array(metrics.confusion, dtype=float)
        shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        image = ax.imshow(shares, vmin=0, vmax=1, cmap="Blues")
        if len(classes) <= 12:
            for (i, j), n in np.ndenumerate(counts):
                if n:
                    ax.text(j, i, f"{int(n)}", ha="center", va="center", fontsize=7,
                            color="white" if shares[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title}: accuracy {metrics.accuracy:.3f}")
        fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    return _save(fig, path)


def drift_histogram(drift: Drift, path: Path) -> Path:
    """Histogram of per-image cosine similarity between base and adapted embeddings."""
    fig = Figure(figsize=(6.5, 3.6))
    ax = fig.subplots()
    edges = np.array(drift.edges)
    ax.bar(edges[:-1], drift.counts, width=np.diff(edges), align="edge", color=ADAPTED_COLOUR, edgecolor="white")
    for value, label, style in ((drift.mean, "mean", "-"), (drift.p5, "p5", "--")):
        ax.axvline(value, color="#d62728", ls=style, label=f"{label} {value:.3f}")
    ax.set_xlabel("cosine similarity (base vs adapted embedding of the same image)")
    ax.set_ylabel("images")
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def rank_heatmap(diagnosis: Diagnosis, path: Path) -> Path | None:
    """Rank utilisation (effective rank / rank) per layer depth and module type."""
    layers = [layer for layer in diagnosis.layers if layer.finite]
    if not layers:
        return None
    depths = sorted({layer.depth for layer in layers if layer.depth is not None})
    rows = [*depths, None] if any(layer.depth is None for layer in layers) else depths
    modules = list(dict.fromkeys(layer.module for layer in layers))
    grid = np.full((len(rows), len(modules)), np.nan)
    for layer in layers:
        grid[rows.index(layer.depth), modules.index(layer.module)] = layer.utilisation
    fig = Figure(figsize=(max(4.5, 1.3 * len(modules) + 2.5), max(3.0, 0.32 * len(rows) + 1.5)))
    ax = fig.subplots()
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if value > 0.6 else "white")
    ax.set_xticks(range(len(modules)), modules)
    ax.set_yticks(range(len(rows)), ["-" if r is None else str(r) for r in rows])
    ax.set_xlabel("module type")
    ax.set_ylabel("block (depth)")
    ax.set_title("rank utilisation = effective rank / rank")
    fig.colorbar(image, ax=ax, fraction=0.05)
    return _save(fig, path)


def parameter_efficiency(total: int, trainable: int, adapter: int, by_module: dict[str, int],
                         path: Path, accuracy_gain: float | None = None) -> Path:
    """Parameters of full fine-tuning (`total`) vs this adapter (log scale); adapter parameters per module type."""
    fig = Figure(figsize=(11, 3.4))
    left, right = fig.subplots(1, 2)
    names = ["full fine-tuning", "trained here (adapter + head)", "low-rank adapter"]
    values = [total, trainable, adapter]
    left.barh(names, values, color=[BASE_COLOUR, ADAPTED_COLOUR, "#2ca02c"])
    left.set_xscale("log")
    for i, value in enumerate(values):
        left.text(value, i, f" {value:,} ({100 * value / total:.2f}%)", va="center", fontsize=8)
    left.set_xlim(min(values) / 3, total * 40)
    title = "parameters trained (% of full fine-tuning)"
    if accuracy_gain is not None:
        title = f"{100 * accuracy_gain:+.1f} accuracy points for {100 * trainable / total:.2f}% of the parameters"
    left.set_title(title, fontsize=9)
    right.bar(list(by_module), list(by_module.values()), color="#2ca02c")
    right.set_ylabel("adapter parameters")
    right.set_title("low-rank parameters per module type", fontsize=9)
    right.tick_params(axis="x", labelsize=8)
    return _save(fig, path)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
