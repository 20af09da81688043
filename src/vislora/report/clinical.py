"""The clinical-metrics section of the report and the model card: macro AUROC base vs adapted with the paired
change, then per class AUROC, sensitivity at the target specificity and specificity at the target sensitivity (with
the adapted model's thresholds), each with its bootstrap interval (vislora.evaluate.clinical)."""

from __future__ import annotations

from html import escape

from vislora.evaluate.clinical import ClinicalComparison
from vislora.report.card import md_table
from vislora.report.html import html_table

AUROC_HEADER = ("class", "positives", "negatives", "AUROC base", "AUROC adapted", "change")


def _intro(clinical: ClinicalComparison) -> str:
    adapted = clinical.adapted
    return (f"Each class against the rest, on {adapted.n:,} images; {adapted.describe_intervals()}. Base and adapted "
            "are scored on the same resamples, so the interval of the change is paired. A threshold applies to the "
            "class probability (softmax); 'never' means no threshold reaches the target.")


def _summary_rows(clinical: ClinicalComparison) -> list[tuple[str, ...]]:
    return [("macro AUROC", clinical.base.macro_auroc.text(), clinical.adapted.macro_auroc.text(),
             clinical.macro_change.text(signed=True))]


def _auroc_rows(clinical: ClinicalComparison) -> list[tuple[str, ...]]:
    return [(a.name, str(a.positives), str(a.negatives), b.auroc.text(), a.auroc.text(),
             clinical.auroc_change[a.name].text(signed=True))
            for b, a in zip(clinical.base.classes, clinical.adapted.classes, strict=True)]


def _points_header(clinical: ClinicalComparison) -> tuple[str, ...]:
    spec, sens = f"{clinical.adapted.specificity:g}", f"{clinical.adapted.sensitivity:g}"
    return ("class", f"sensitivity @ specificity {spec}: base", "adapted", "threshold",
            f"specificity @ sensitivity {sens}: base", "adapted", "threshold")


def _points_rows(clinical: ClinicalComparison) -> list[tuple[str, ...]]:
    return [(a.name, b.sensitivity.text(), a.sensitivity.text(), a.at_specificity.threshold_text(),
             b.specificity.text(), a.specificity.text(), a.at_sensitivity.threshold_text())
            for b, a in zip(clinical.base.classes, clinical.adapted.classes, strict=True)]


def _undefined(clinical: ClinicalComparison) -> str:
    names = clinical.adapted.undefined
    return f"AUROC undefined (no positive or no negative image in this data): {', '.join(names)}." if names else ""


def clinical_html(clinical: ClinicalComparison) -> list[str]:
    """The report's clinical section: HTML blocks."""
    blocks = ["<h2>Clinical metrics</h2>", f"<p>{escape(_intro(clinical))}</p>",
              html_table(("metric", "base", "adapted", "change"), _summary_rows(clinical)),
              "<h3>AUROC per class</h3>", html_table(AUROC_HEADER, _auroc_rows(clinical)),
              "<h3>Operating points per class</h3>", html_table(_points_header(clinical), _points_rows(clinical))]
    if clinical.adapted.undefined:
        blocks.append(f"<p class='muted'>{escape(_undefined(clinical))}</p>")
    return blocks


def clinical_markdown(clinical: ClinicalComparison) -> str:
    """The model card's clinical section."""
    text = ("## Clinical metrics\n\n" + _intro(clinical) + "\n\n"
            + md_table(("metric", "base", "adapted", "change"), _summary_rows(clinical))
            + "\n\n### AUROC per class\n\n" + md_table(AUROC_HEADER, _auroc_rows(clinical))
            + "\n\n### Operating points per class\n\n" + md_table(_points_header(clinical), _points_rows(clinical)))
    undefined = _undefined(clinical)
    return text + (f"\n\n{undefined}" if undefined else "")
