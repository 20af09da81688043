"""Evaluation: what an adapter does to a model, measured on held-out images.

- metrics: accuracy, top-5, macro-F1, loss, calibration error (ECE), confusion, per-class and per-group accuracy
- comparison: base vs adapted on the same images, per-class/per-group deltas, regressions, McNemar's test
- drift: cosine similarity of base and adapted embeddings per image
- latency: base, unmerged and merged forward passes on the same batch
- collect: runs a classifier with and without its adapters over the same batches
- classifier: a trained classifier run scored on any data (`vislora eval`)
- dual: dual encoders (prompt-classifier accuracy, contrastive loss, retrieval recall; `vislora clip eval`)
- multilabel: per-attribute AP, mAP, precision/recall/F1 at thresholds, rare attributes, threshold tuning
- clinical: one-vs-rest AUROC, sensitivity at a specificity and the reverse, bootstrap confidence intervals
- (vislora.tasks.generative_metrics, re-exported: VQA answer normalisation, exact match, VQAv2 soft accuracy;
  BLEU-4 and CIDEr (pycocoevalcap))
- generative: captions and answers of a VLM, base vs adapted on the same images (`vislora eval` on captioning / VQA)
"""

from vislora.evaluate.classifier import compare_adapter, compare_model, evaluate_adapter, write_predictions
from vislora.evaluate.clinical import (
    ClinicalComparison,
    ClinicalMetrics,
    auroc,
    clinical_metrics,
    compare_clinical,
    sensitivity_at_specificity,
    specificity_at_sensitivity,
)
from vislora.evaluate.collect import BaseHead, Collected, classifier_parts, collect, recording_head
from vislora.evaluate.comparison import Comparison, Delta, Outputs, compare, mcnemar_p, points
from vislora.evaluate.drift import Drift, embedding_drift
from vislora.evaluate.dual import DualEvalResult, embed_rows, evaluate_dual, score_rows
from vislora.evaluate.generative import GenerativeComparison, GenerativeRow, compare_generative, generate_texts
from vislora.evaluate.latency import Latency, measure_latency
from vislora.evaluate.metrics import Metrics, classification_metrics, expected_calibration_error, macro_f1
from vislora.evaluate.multilabel import (
    AttributeScore,
    MultilabelMetrics,
    Thresholds,
    average_precision,
    multilabel_metrics,
    tune_thresholds,
)
from vislora.tasks.generative_metrics import caption_scores, normalize_answer, vqa_scores

__all__ = [
    "AttributeScore",
    "BaseHead",
    "ClinicalComparison",
    "ClinicalMetrics",
    "Collected",
    "Comparison",
    "Delta",
    "Drift",
    "DualEvalResult",
    "GenerativeComparison",
    "GenerativeRow",
    "Latency",
    "Metrics",
    "MultilabelMetrics",
    "Outputs",
    "Thresholds",
    "auroc",
    "average_precision",
    "caption_scores",
    "classification_metrics",
    "classifier_parts",
    "clinical_metrics",
    "collect",
    "compare",
    "compare_adapter",
    "compare_clinical",
    "compare_generative",
    "compare_model",
    "embed_rows",
    "embedding_drift",
    "evaluate_adapter",
    "evaluate_dual",
    "expected_calibration_error",
    "generate_texts",
    "macro_f1",
    "mcnemar_p",
    "measure_latency",
    "multilabel_metrics",
    "normalize_answer",
    "points",
    "recording_head",
    "score_rows",
    "sensitivity_at_specificity",
    "specificity_at_sensitivity",
    "tune_thresholds",
    "vqa_scores",
    "write_predictions",
]
