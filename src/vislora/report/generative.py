"""`vislora report` on a captioning or VQA run (a generative VLM): generated text, base vs adapted, on held-out images.

The run's VLM is rebuilt with its adapter (`vislora.runs.load_trained_vlm`), the held-out examples (the run's
data.val, or `data`) are generated for with and without the adapter in one routed generate per batch and scored
(`vislora.evaluate.generative.compare_generative`: BLEU-4 and CIDEr, or exact match and VQAv2 soft accuracy).
report.html gains a generative section: the metrics table and sample images (thumbnails embedded as base64 PNG) with
their question, references and both outputs; MODEL_CARD.md the task, the metrics before/after and example outputs.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from collections import Counter
from html import escape
from pathlib import Path
from typing import Any

import yaml

from vislora.data.generative import read_generative
from vislora.data.images import load_image, preview
from vislora.diagnostics import Diagnosis, diagnose
from vislora.evaluate.generative import FIGURES, GenerativeComparison, compare_generative
from vislora.io import atomic_write_text
from vislora.parameters import ParameterReport, parameter_report
from vislora.report import plots
from vislora.report.card import base_model_id, health_markdown, md_table, method_name
from vislora.report.html import cards_html, head, html_table, page
from vislora.report.run import ReportFiles, RunInfo
from vislora.runs import load_trained_vlm
from vislora.vlm import Vlm

logger = logging.getLogger(__name__)

THUMBNAIL = 160  # longest side of an embedded sample image, px
PIPELINES = {"captioning": "image-to-text", "vqa": "visual-question-answering"}
JOBS = {"captioning": "image captioning", "vqa": "visual question answering"}


def write_generative_report(info: RunInfo, data: str | None = None, limit: int | None = None,
                            out: str | Path | None = None, batch_size: int = 8, max_new_tokens: int = 32,
                            vlm: Vlm | None = None) -> ReportFiles:
    """The report of a captioning / VQA run (`vislora.report.write_report` sends them here); `vlm` is a VLM built
    in Python instead of the one task.json records."""
    model, vlm, task = load_trained_vlm(info.adapter_dir, vlm)
    settings = info.config.get("data", {})
    source = data or settings.get("val")
    comparison = None
    if source:
        examples = read_generative(source, task["task"], None if data else settings.get("image_root"),
                                   limit or (None if data else settings.get("val_limit")))
        comparison = compare_generative(model, vlm, examples, task["task"], prompt=task.get("prompt"),
                                        batch_size=batch_size, max_new_tokens=max_new_tokens, data=str(source))
    folder = Path(out) if out is not None else info.run_dir / "report"
    diagnosis = diagnose(model, "default")
    params = parameter_report(model)
    config = model.configs["default"].model_dump(mode="json")
    images = {"training": plots.training_curves(info.metrics, folder / "training.png"),
              "telemetry": plots.telemetry(info.metrics, folder / "telemetry.png"),
              "rank_utilisation": plots.rank_heatmap(diagnosis, folder / "rank_utilisation.png")}
    by_module: Counter = Counter()
    counts = model.parameter_counts("default")
    for target in model.plans["default"].targets:
        by_module[target.path.rpartition(".")[2]] += counts[target.path]
    images["parameters"] = plots.parameter_efficiency(params.base, params.trainable, sum(counts.values()),
                                                      dict(by_module), folder / "parameters.png", None)
    evaluation = None
    if comparison is not None:
        evaluation = folder / "evaluation.json"
        atomic_write_text(evaluation, json.dumps(comparison.to_dict(), indent=2))
    drawn = {k: v for k, v in images.items() if v is not None}
    atomic_write_text(folder / "diagnostics.json", json.dumps(diagnosis.to_dict(), indent=2))
    card = folder / "MODEL_CARD.md"
    atomic_write_text(card, generative_model_card(info, config, diagnosis, comparison, params))
    links = [p.name for p in (card, folder / "diagnostics.json", evaluation) if p is not None]
    body = head(info, config, f"{models_of(info)} ({task['task']})", links, _cards(diagnosis, comparison, params),
                drawn)
    body += generative_html(comparison)
    html = folder / "report.html"
    atomic_write_text(html, page(info, body, diagnosis, drawn, params, None))
    return ReportFiles(folder=folder, html=html, model_card=card, diagnostics=folder / "diagnostics.json",
                       evaluation=evaluation, plots=list(drawn.values()))


def models_of(info: RunInfo) -> str:
    """The VLM a run adapted: "vision + LM" of a composed LLaVA, or the one Hugging Face VLM."""
    record = info.task.get("vlm") or {}
    spec = record.get("spec") or (info.task.get("model") or {}).get("spec", "?")
    return f"{spec} + {record['lm']}" if record.get("lm") else spec


# ---------------------------------------------------------------------------------------------- HTML
def metric_cells(comparison: GenerativeComparison) -> list[tuple[str, str, str, str]]:
    """(label, base, adapted, change) of every metric, as text."""
    return [(label, f"{b:.4f}", f"{a:.4f}", f"{c:+.4f}") for label, b, a, c in comparison.metric_rows()]


def generative_html(comparison: GenerativeComparison | None) -> list[str]:
    """The generative section of report.html: metrics base vs adapted, then the examples shown with their image."""
    if comparison is None:
        return ["<h2>Generated text: before / after</h2><p>No held-out data: run <code>vislora report RUN --data "
                "FILE</code>.</p>"]
    prompt = (f" Captioning instruction: <code>{escape(comparison.prompt)}</code>." if comparison.prompt else "")
    section = ["<h2>Generated text: before / after</h2>",
               f"<p>{escape(JOBS[comparison.task])} on {escape(comparison.data)}: {comparison.n:,} examples. Base = "
               f"{escape(comparison.baseline)}.{prompt} Decoding: {_decoding(comparison)}.</p>",
               html_table(("metric", "base", "adapted", "change"), metric_cells(comparison)),
               f"<h3>Examples</h3><p class='muted'>The {len(comparison.examples)} examples whose {comparison.score} "
               "changed most (gains and losses).</p>"]
    question = comparison.task == "vqa"
    header = ["image", *(["question"] if question else []), "references", "base", "adapted",
              f"{comparison.score} base → adapted"]
    rows = []
    for row in comparison.shown():
        cells = [thumbnail_tag(row.image), *([escape(row.question or "")] if question else []),
                 "<br>".join(escape(r) for r in row.references), escape(row.base) or "<i>(empty)</i>",
                 escape(row.adapted) or "<i>(empty)</i>", f"{row.base_score:.3f} → {row.adapted_score:.3f}"]
        rows.append("<tr>" + "".join(f"<td style='text-align:left'>{c}</td>" for c in cells) + "</tr>")
    section.append("<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>" + "".join(rows)
                   + "</table>")
    return section


def thumbnail_tag(image: str | Path, side: int = THUMBNAIL) -> str:
    """An <img> of `image` at most `side` px on its longest side, embedded as a base64 PNG; a note instead when the
    file cannot be read any more (moved or deleted since the evaluation)."""
    try:
        picture = preview(load_image(image))
    except (OSError, ValueError) as exc:
        logger.warning("sample image %s cannot be read for the report (%s)", image, exc)
        return f"<span class='muted'>{escape(Path(image).name)} (unreadable)</span>"
    picture.thumbnail((side, side))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img src='data:image/png;base64,{data}' alt='{escape(Path(image).name)}' title='{escape(str(image))}'>"


def _decoding(comparison: GenerativeComparison) -> str:
    beams = comparison.settings.get("num_beams", 1)
    return (("greedy" if beams == 1 else f"beam search ({beams} beams)")
            + f", at most {comparison.settings.get('max_new_tokens', '?')} new tokens")


def _cards(diagnosis: Diagnosis, comparison: GenerativeComparison | None, params: ParameterReport | None) -> str:
    cards = []
    if comparison is not None:
        cards = [(label, f"{a:.3f}", f"base {b:.3f} ({c:+.3f})") for label, b, a, c in comparison.metric_rows()]
    return cards_html(cards, diagnosis, params)


# ---------------------------------------------------------------------------------------------- model card
def generative_model_card(info: RunInfo, adapter_config: dict[str, Any], diagnosis: Diagnosis,
                          comparison: GenerativeComparison | None, params: ParameterReport | None) -> str:
    """MODEL_CARD.md of a captioning / VQA run (Hugging Face style front matter with the measured results)."""
    kind = info.task["task"]
    sections = [
        "---\n" + yaml.safe_dump(_front_matter(info, adapter_config, comparison), sort_keys=False) + "---",
        f"# {info.name}: {method_name(adapter_config)} adapter for the VLM {models_of(info)}",
        f"A low-rank adapter on the generative vision-language model `{models_of(info)}`, trained with vislora for "
        f"{JOBS[kind]}. It loads with vislora (`vislora.runs.load_trained_vlm`) and with Hugging Face PEFT (PEFT "
        "directory layout, safetensors).",
        _details(info, adapter_config, params),
        _data(info),
        generative_markdown(comparison),
        health_markdown(diagnosis),
        _intended_use(info),
        _limitations(comparison),
        _usage(info),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def generative_markdown(comparison: GenerativeComparison | None) -> str:
    """The card's evaluation section: task, metrics base vs adapted, and the examples' outputs before and after."""
    if comparison is None:
        return "## Evaluation\n\nNo held-out data was evaluated (`vislora report RUN --data FILE` adds it)."
    text = (f"## Evaluation\n\n{JOBS[comparison.task].capitalize()} on `{comparison.data}` ({comparison.n:,} "
            f"examples), {_decoding(comparison)}. *Base* is {comparison.baseline}; *adapted* is the model with the "
            "adapter.\n\n")
    text += md_table(("metric", "base", "adapted", "change"), metric_cells(comparison))
    text += "\n\n" + _metric_note(comparison.task)
    text += (f"\n\n### Example outputs\n\nThe {len(comparison.examples)} examples whose {comparison.score} changed "
             "most.\n\n")
    question = comparison.task == "vqa"
    text += md_table(("image", *(["question"] if question else []), "references", "base", "adapted"), [
        (Path(r.image).name, *([r.question or ""] if question else []), " / ".join(r.references[:3]),
         r.base or "(empty)", r.adapted or "(empty)") for r in comparison.shown()])
    return text


def _metric_note(task: str) -> str:
    if task == "vqa":
        return ("Answers are normalised as the official VQA evaluation does (case, punctuation, articles, number "
                "words, contractions). Exact match: the answer equals one of the references. Soft accuracy (VQAv2): "
                "min(#references that say it / 3, 1), averaged over the leave-one-out subsets when there are 10.")
    return ("BLEU-4 and CIDEr are pycocoevalcap's (COCO caption toolkit) on lowercased captions without punctuation "
            "(our own tokenisation in place of its Java PTB tokenizer), computed over the whole evaluation set.")


def _front_matter(info: RunInfo, adapter_config: dict[str, Any],
                  comparison: GenerativeComparison | None) -> dict[str, Any]:
    kind = info.task["task"]
    front: dict[str, Any] = {"library_name": "peft"}
    record = info.task.get("vlm") or {}
    base = base_model_id(record.get("lm") or record.get("spec") or "")
    if base:
        front["base_model"] = base
    front.update({"pipeline_tag": PIPELINES[kind],
                  "tags": list(dict.fromkeys(["vislora", "lora", adapter_config.get("method", "lora"), kind,
                                              PIPELINES[kind]])),
                  "metrics": ["bleu", "cider"] if kind == "captioning" else ["accuracy", "exact_match"]})
    if comparison is not None:
        kinds = {"bleu4": "bleu", "cider": "cider", "soft": "accuracy", "exact": "exact_match"}
        metrics = [{"type": kinds[key], "value": round(figures[key], 4), "name": f"{label} ({side})"}
                   for key, label in FIGURES[kind]
                   for side, figures in (("adapted", comparison.adapted), ("base", comparison.base))]
        front["model-index"] = [{"name": info.name, "results": [{
            "task": {"type": PIPELINES[kind], "name": JOBS[kind]},
            "dataset": {"name": comparison.data, "type": Path(comparison.data).stem},
            "metrics": metrics}]}]
    return front


def _details(info: RunInfo, adapter_config: dict[str, Any], params: ParameterReport | None) -> str:
    record = info.task.get("vlm") or {}
    rows = [("vision encoder" if record.get("lm") else "model", f"`{record.get('spec', '?')}`"),
            *([("language model", f"`{record['lm']}`")] if record.get("lm") else []),
            ("task", info.task["task"]),
            ("method", method_name(adapter_config)),
            ("rank / alpha", f"{adapter_config.get('rank')} / {adapter_config.get('alpha')}"),
            ("targets", ", ".join(f"`{t}`" for t in adapter_config.get("targets", []))),
            ("trained in full", ", ".join(f"`{m}`" for m in adapter_config.get("modules_to_save", [])) or "-"),
            ("image side", f"{record.get('image_size', '?')} px"),
            ("training steps", str(info.task.get("step", "-")))]
    if info.task.get("prompt"):
        rows.append(("captioning instruction", f"`{info.task['prompt']}`"))
    if params is not None:
        rows.append(("trainable parameters", f"{params.trainable:,} ({100 * params.trainable / params.base:.2f}% of "
                                             f"the {params.base:,} that full fine-tuning trains)"))
    return "## Model details\n\n" + md_table(("", ""), rows)


def _data(info: RunInfo) -> str:
    train = info.config.get("data", {}).get("train")
    if not train:
        return "## Training data\n\nThe run's config names no training data file."
    return f"## Training data\n\n`{train}` ({JOBS[info.task['task']]} examples; `vislora data check` audits it)."


def _intended_use(info: RunInfo) -> str:
    what = ("Describing images in a sentence (captions, alt text)" if info.task["task"] == "captioning" else
            "Answering short questions about images")
    return (f"## Intended use\n\n{what}, for images like those it was trained on. Images are resized and normalised "
            "as the VLM's image processor says. Use it as a research and engineering baseline; generated text can be "
            "wrong or fluent nonsense, and decisions about people need their own evaluation.")


def _limitations(comparison: GenerativeComparison | None) -> str:
    items = []
    if comparison is None:
        items.append("No held-out evaluation: the quality of the generated text is unknown.")
    else:
        items.append(f"Evaluated on {comparison.n:,} examples only.")
        worse = [label for label, _, _, change in comparison.metric_rows() if change < 0]
        if worse:
            items.append("Worse than the base model on: " + ", ".join(worse) + ".")
        items.append("Automatic metrics compare against the references' wording: a correct answer or caption "
                     "phrased differently scores low; read the example outputs.")
    return "## Limitations\n\n" + "\n".join(f"- {item}" for item in items)


def _usage(info: RunInfo) -> str:
    return ("## How to use\n\n```python\nfrom vislora.runs import load_trained_vlm\n\n"
            f"model, vlm, task = load_trained_vlm(\"{info.adapter_dir}\")  # VLM rebuilt from task.json, adapter "
            "loaded\nprompts = vlm.processor.prompt_batch([\"What is this item?\"])\n"
            "out = model.generate(**prompts, pixel_values=images, max_new_tokens=32, do_sample=False,\n"
            "                     **vlm.processor.generation_kwargs())  # images normalised as vlm.image_spec says\n"
            "print(vlm.processor.decode(out, prompts[\"input_ids\"].shape[1]))\n```")
