"""The multi-label section of the report and the model card: mAP, F1 and rare-attribute mAP base vs adapted, then
one row per attribute (AP and F1 at the saved thresholds), the rare attributes in a table of their own."""

from __future__ import annotations

from html import escape

from vislora.evaluate.multilabel_comparison import AttributeDelta, MultilabelComparison, nan_text
from vislora.report.card import md_table
from vislora.report.html import html_table


def _summary_rows(comparison: MultilabelComparison) -> list[tuple[str, str, str, str]]:
    base, adapted = comparison.base, comparison.adapted
    figures = [("mAP", "map"), ("micro-F1", "micro_f1"), ("macro-F1", "macro_f1")]
    if adapted.rare:
        figures.append((f"rare-attribute mAP (fewer than {adapted.rare_below} training images)", "rare_map"))
    return [(name, nan_text(getattr(base, key)), nan_text(getattr(adapted, key)),
             nan_text(getattr(adapted, key) - getattr(base, key), signed=True)) for name, key in figures]


def _attribute_rows(deltas: list[AttributeDelta]) -> list[tuple[str, ...]]:
    return [(d.name, str(d.positives), "-" if d.train_positives is None else str(d.train_positives),
             f"{d.threshold:.3f}", nan_text(d.base_ap), nan_text(d.adapted_ap), nan_text(d.ap_delta, signed=True),
             f"{d.base_f1:.4f}", f"{d.adapted_f1:.4f}") for d in deltas]


ATTRIBUTE_HEADER = ("attribute", "positives", "training positives", "threshold", "AP base", "AP adapted",
                    "AP change", "F1 base", "F1 adapted")


def _intro(comparison: MultilabelComparison) -> str:
    return (f"On {comparison.data}. Base = {comparison.baseline}. Thresholds {comparison.thresholds}; F1 is "
            "measured at those thresholds for both models.")


def multilabel_html(comparison: MultilabelComparison) -> list[str]:
    """The report's multi-label section: HTML blocks."""
    common = [d for d in comparison.per_attribute if not d.rare]
    blocks = ["<h2>Multi-label tagging: before / after</h2>", f"<p>{escape(_intro(comparison))}</p>",
              html_table(("metric", "base", "adapted", "change"), _summary_rows(comparison)),
              "<h3>Per attribute</h3>", html_table(ATTRIBUTE_HEADER, _attribute_rows(common))]
    if comparison.rare:
        blocks += [f"<h3>Rare attributes (fewer than {comparison.adapted.rare_below} training images)</h3>",
                   html_table(ATTRIBUTE_HEADER, _attribute_rows(comparison.rare))]
    if comparison.adapted.no_positives:
        blocks.append("<p class='muted'>No positives in this data, left out of mAP: "
                      + escape(", ".join(comparison.adapted.no_positives)) + "</p>")
    if comparison.drift is not None:
        d = comparison.drift
        blocks.append(f"<p>Embedding drift: cosine similarity of base and adapted features per image, mean "
                      f"{d.mean:.4f}, 5th percentile {d.p5:.4f}, minimum {d.min:.4f}.</p>")
    return blocks


def multilabel_markdown(comparison: MultilabelComparison) -> str:
    """The model card's evaluation section for a multi-label tagger."""
    common = [d for d in comparison.per_attribute if not d.rare]
    text = ("## Evaluation\n\n" + _intro(comparison).replace(comparison.data, f"`{comparison.data}`") + "\n\n"
            + md_table(("metric", "base", "adapted", "change"), _summary_rows(comparison))
            + "\n\n### Per attribute\n\n" + md_table(ATTRIBUTE_HEADER, _attribute_rows(common)))
    if comparison.rare:
        text += (f"\n\n### Rare attributes (fewer than {comparison.adapted.rare_below} training images)\n\n"
                 + md_table(ATTRIBUTE_HEADER, _attribute_rows(comparison.rare)))
    if comparison.adapted.no_positives:
        text += "\n\nNo positives in this data, left out of mAP: " + ", ".join(comparison.adapted.no_positives) + "."
    return text
