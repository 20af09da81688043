"""The self-contained HTML report: one file, PNG plots embedded as data URIs (the PNGs are also beside it)."""

from __future__ import annotations

import base64
import datetime
import statistics
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from vislora.diagnostics import Diagnosis
from vislora.evaluate import Comparison, Delta
from vislora.parameters import ParameterReport
from vislora.report.card import method_name
from vislora.report.run import DataSummary, RunInfo

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.cards { display: flex; flex-wrap: wrap; gap: .8em; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: .6em 1em; min-width: 9em; }
.card b { display: block; font-size: 1.4em; }
.healthy { color: #2a7d2a; } .attention { color: #b8860b; } .untrained, .broken, .regression { color: #c0392b; }
img { max-width: 100%; border: 1px solid #eee; margin: .4em 0; }
.muted { color: #777; font-size: .9em; }
"""


def render_html(info: RunInfo, adapter_config: dict[str, Any], diagnosis: Diagnosis, comparison: Comparison | None,
                params: ParameterReport | None, data: DataSummary | None, images: dict[str, Path],
                links: Sequence[str], evaluation: Sequence[str] = (), clinical: Sequence[str] = ()) -> str:
    """The report page. `images` maps a plot name to its PNG; `links` are files beside the page; `evaluation` is
    an HTML before/after section of another task (report/multilabel.py) shown when there is no `comparison`;
    `clinical` is the clinical-metrics section (report/clinical.py), shown after the comparison."""
    body = head(info, adapter_config, info.task["model"]["spec"], links, _cards(diagnosis, comparison, params), images)
    if comparison is not None:
        body += ["<h2>Before / after</h2>", f"<p>On {escape(comparison.data)}. Base = {escape(comparison.baseline)}."
                 "</p>", _metrics_table(comparison),
                 image_tag(images, "per_class"), image_tag(images, "confusion"), "<h3>Per class</h3>",
                 _delta_table("class", comparison.per_class)]
        for column, deltas in comparison.per_group.items():
            body += [f"<h3>Per {escape(column)}</h3>", _delta_table(column, deltas)]
        if not comparison.per_group:
            body.append("<p class='muted'>No metadata column with groups in the evaluation data.</p>")
        body += _drift(comparison, images) + _latency(comparison) + list(clinical)
    elif evaluation:
        body += list(evaluation)
    else:
        body.append("<h2>Before / after</h2><p>No held-out data: run <code>vislora report RUN --data DIR</code>.</p>")
    return page(info, body, diagnosis, images, params, data)


def head(info: RunInfo, adapter_config: dict[str, Any], models: str, links: Sequence[str], cards: str,
         images: dict[str, Path]) -> list[str]:
    """The sections every report starts with: the title (method, rank, `models`), where the run is and the files
    beside the page, the summary `cards`, and the training curves and run settings."""
    return [f"<h1>{escape(info.name)}: {escape(method_name(adapter_config))} r={adapter_config.get('rank')} on "
            f"<code>{escape(models)}</code></h1>",
            f"<p class='muted'>{escape(str(info.run_dir))} · adapter {escape(info.adapter_dir.name)} · written "
            f"{datetime.datetime.now().isoformat(timespec='seconds')} · files: "
            + ", ".join(f"<a href='{escape(name)}'>{escape(name)}</a>" for name in links) + "</p>",
            cards, "<h2>Training</h2>", image_tag(images, "training"), run_table(info), *telemetry_html(info, images)]


def page(info: RunInfo, body: list[str], diagnosis: Diagnosis, images: dict[str, Path],
         params: ParameterReport | None, data: DataSummary | None) -> str:
    """The whole report page: `body` (the sections before), then the adapter diagnostics, parameter efficiency
    and training data sections every report ends with."""
    body = [*body, "<h2>Adapter diagnostics</h2>", verdict_html(diagnosis), image_tag(images, "rank_utilisation"),
            group_table(diagnosis)]
    if params is not None:
        body += ["<h2>Parameter efficiency</h2>", image_tag(images, "parameters"), f"<pre>{escape(str(params))}</pre>"]
    if data is not None:
        body += ["<h2>Training data</h2>", data_html(data)]
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{escape(info.name)} · vislora "
            f"report</title><style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def image_tag(images: dict[str, Path], name: str) -> str:
    path = images.get(name)
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<img src='data:image/png;base64,{data}' alt='{escape(name)}' title='{escape(path.name)}'>"


def _cards(diagnosis: Diagnosis, comparison: Comparison | None, params: ParameterReport | None) -> str:
    cards = []
    if comparison is not None:
        before, after = comparison.base.accuracy, comparison.adapted.accuracy
        cards += [("accuracy", f"{after:.3f}", f"base {before:.3f} ({100 * (after - before):+.1f} points)"),
                  ("macro-F1", f"{comparison.adapted.macro_f1:.3f}", f"base {comparison.base.macro_f1:.3f}"),
                  ("calibration error", f"{comparison.adapted.ece:.3f}", f"base {comparison.base.ece:.3f}"),
                  ("regressions", str(len(comparison.regressions)), "classes and groups")]
        if comparison.drift is not None:
            cards.append(("embedding drift", f"{comparison.drift.mean:.3f}", "mean cosine similarity"))
    return cards_html(cards, diagnosis, params)


def cards_html(cards: list[tuple[str, str, str]], diagnosis: Diagnosis, params: ParameterReport | None) -> str:
    """The summary cards (title, value as HTML, note): `cards` first, then the trained share and adapter health."""
    cards = list(cards)
    if params is not None:
        cards.append(("trained", f"{100 * params.trainable / params.base:.2f}%",
                      f"{params.trainable:,} of full fine-tuning's {params.base:,}"))
    status = diagnosis.verdict.status
    cards.append(("adapter health", f"<span class='{status}'>{status}</span>", f"{len(diagnosis.layers)} pairs"))
    return "<div class='cards'>" + "".join(
        f"<div class='card'>{escape(title)}<b>{value}</b><span class='muted'>{escape(note)}</span></div>"
        for title, value, note in cards) + "</div>"


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]], classes: Sequence[str] = ()) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(f"<tr class='{escape(cls)}'>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>"
                   for row, cls in zip(rows, [*classes, *[""] * (len(rows) - len(classes))], strict=True))
    return f"<table><tr>{head}</tr>{body}</table>"


def run_table(info: RunInfo) -> str:
    summary = info.summary or {}
    rows = [("steps", summary.get("steps", info.task.get("step", "-"))),
            ("wall time", f"{summary['seconds']:.0f} s" if "seconds" in summary else "-"),
            ("stopped early", summary.get("stopped_early", "-")),
            ("corrupt images skipped", summary.get("skipped_images", "-")),
            ("best", ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in (summary.get("best") or {}).items()) or "-")]
    return html_table(("run", ""), [(k, str(v)) for k, v in rows])


def telemetry_html(info: RunInfo, images: dict[str, Path]) -> list[str]:
    """Step time, data-loading share, peak memory and checkpoint writes (vislora.train.telemetry's fields of
    metrics.jsonl, summary.json's `telemetry`); nothing for a run logged without them."""
    train = [r for r in info.metrics if r.get("split") == "train" and "step_s" in r]
    if not train:
        return []
    step_s = [r["step_s"] for r in train]
    scope = ((info.summary or {}).get("telemetry") or {}).get("peak_rss_scope", "interval")
    rows = [("median step time", f"{statistics.median(step_s):.3f} s"),
            ("data loading", f"{100 * sum(r.get('data_s', 0.0) for r in train) / max(sum(step_s), 1e-12):.0f}% "
                             "of step time"),
            ("peak resident memory", f"{max(r.get('peak_rss_mib', 0.0) for r in train):,.0f} MiB"
                                     + (" (lifetime peak: the per-interval reset was refused)"
                                        if scope == "lifetime" else ""))]
    if any("peak_cuda_mib" in r for r in train):
        rows.append(("peak CUDA memory", f"{max(r.get('peak_cuda_mib', 0.0) for r in train):,.0f} MiB allocated, "
                                         f"{max(r.get('peak_cuda_reserved_mib', 0.0) for r in train):,.0f} MiB "
                                         "reserved"))
    written: dict[str, list[dict]] = {}
    for row in (r for r in info.metrics if r.get("split") == "checkpoint"):
        written.setdefault("checkpoints/step-N" if row["path"].startswith("checkpoints/") else row["path"],
                           []).append(row)
    section = ["<h3>Telemetry</h3>", image_tag(images, "telemetry"), html_table(("measured", ""), rows)]
    if written:
        section.append(html_table(("written", "times", "last size", "median write time"), [
            (kind, str(len(found)), f"{found[-1]['bytes'] / 1024:,.1f} KiB",
             f"{statistics.median(r['seconds'] for r in found):.3f} s") for kind, found in written.items()]))
    last = max(r["step"] for r in train)
    section += [f"<p class='regression'>Out of memory during {escape(r.get('during', '?'))} (peak resident memory "
                f"{r.get('peak_rss_mib', 0.0):,.0f} MiB)"
                + ("; the run was resumed from its last checkpoint" if last > r["step"] else "") + ".</p>"
                for r in info.metrics if r.get("split") == "oom"]
    return section


def _metrics_table(comparison: Comparison) -> str:
    rows = [(name, f"{getattr(comparison.base, key):.4f}", f"{getattr(comparison.adapted, key):.4f}",
             f"{getattr(comparison.adapted, key) - getattr(comparison.base, key):+.4f}")
            for name, key in (("accuracy", "accuracy"), ("top-5", "top5"), ("macro-F1", "macro_f1"),
                              ("ECE", "ece"), ("loss", "loss"))]
    return html_table(("metric", "base", "adapted", "change"), rows)


def _delta_table(key: str, deltas: Sequence[Delta]) -> str:
    rows = [(d.name, str(d.n), f"{d.base:.4f}", f"{d.adapted:.4f}", f"{d.delta:+.4f}", f"{d.lost}/{d.gained}",
             f"{d.p_value:.3g}", "regression" if d.regression else "") for d in deltas]
    return html_table((key, "images", "base", "adapted", "change", "lost/gained", "p (McNemar)", ""), rows,
                  ["regression" if d.regression else "" for d in deltas])


def _drift(comparison: Comparison, images: dict[str, Path]) -> list[str]:
    d = comparison.drift
    if d is None:
        return []
    return ["<h3>Embedding drift</h3>", f"<p>Cosine similarity between the base and adapted embeddings (pooled "
            f"features before the head) of each image: mean {d.mean:.4f}, median {d.median:.4f}, p5 {d.p5:.4f}, "
            f"min {d.min:.4f}.</p>", image_tag(images, "drift")]


def _latency(comparison: Comparison) -> list[str]:
    lat = comparison.latency
    if lat is None:
        return []
    rows = [(name, f"{1000 * s:.1f}", f"{lat.throughput(s):.1f}") if s is not None else (name, "-", "cannot merge")
            for name, s in (("base", lat.base), ("adapters unmerged", lat.unmerged), ("adapters merged", lat.merged))]
    check = (f"merged vs unmerged outputs differ by at most {lat.merged_max_abs_diff:.1e}" if lat.merged is not None
             else "the adapter cannot be merged (its change depends on the input)")
    return ["<h3>Latency</h3>", f"<p>Median of {lat.repeats} runs, batch of {lat.batch_size} images; {check}.</p>",
            html_table(("model", "ms / batch", "images / s"), rows)]


def verdict_html(diagnosis: Diagnosis) -> str:
    v = diagnosis.verdict
    items = [escape(r) for r in v.reasons] + [f"<i>recommendation:</i> {escape(r)}" for r in v.recommendations]
    return (f"<p>Verdict: <b class='{escape(v.status)}'>{escape(v.status)}</b> over {len(diagnosis.layers)} low-rank "
            f"pairs (energy threshold {diagnosis.threshold:.0%}).</p><ul>"
            + "".join(f"<li>{i}</li>" for i in items) + "</ul>")


def group_table(diagnosis: Diagnosis) -> str:
    rows = []
    for name, group in diagnosis.by_module.items():
        u, e, r = group.utilisation, group.effective_rank, group.relative_norm
        rows.append((name, str(group.layers), f"{u.mean:.2f} ± {u.std:.2f}" if u else "-",
                     f"{u.min:.2f}-{u.max:.2f}" if u else "-", f"{e.mean:.2f}" if e else "-",
                     f"{r.mean:.3g}" if r else "-"))
    return html_table(("module type", "layers", "utilisation", "range", "effective rank", "||dW||/||W||"), rows)


def data_html(data: DataSummary) -> str:
    classes = ", ".join(f"{c} {n}" for c, n in data.class_counts.items())
    return (f"<p><code>{escape(data.source)}</code>: {data.n_images:,} images. Classes: {escape(classes)}.</p>"
            + html_table(("metadata field", "coverage"), [(k, f"{v:.1f}%") for k, v in data.coverage.items()]))
