"""Classification metrics as the papers report them, computed with scikit-learn."""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np


def classification_metrics(y_true: Sequence[int], probs: np.ndarray, classes: Sequence[str]) -> Dict[str, object]:
    """Accuracy, macro precision/recall/F1, one-vs-rest AUC, MCC, Cohen's kappa, per-class report, confusion matrix.

    Args:
        y_true: ``(N,)`` integer labels.
        probs: ``(N, K)`` class probabilities.
        classes: the K class names.

    ``auc`` is ``None`` (with ``auc_note``) when it is undefined, e.g. a class absent from ``y_true``; ``kappa``
    likewise (with ``kappa_note``) when every label and every prediction is one class (chance agreement 1: 0/0).
    """
    from sklearn import metrics as skm

    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    labels = list(range(len(classes)))
    if probs.shape != (len(y_true), len(classes)):
        raise ValueError(f"classification_metrics: expected probs of shape (N, K) = ({len(y_true)}, {len(classes)}) "
                         f"for {len(y_true)} labels and {len(classes)} classes, got {probs.shape}")
    if len(y_true) and (y_true.min() < 0 or y_true.max() >= len(classes)):
        raise ValueError(f"classification_metrics: expected labels 0 .. {len(classes) - 1}, got {y_true.min()} .. "
                         f"{y_true.max()}")
    # logits instead of probabilities gave a wrong binary AUC (column 1 alone) and no multi-class AUC;
    # rows of NaN (a diverged model) are let through as before
    off = (np.abs(probs.sum(1) - 1) > 1e-3) | (probs < 0).any(1)
    if off.any():
        i = int(np.argmax(off))
        raise ValueError(f"classification_metrics: expected probabilities (each row >= 0, summing to 1), got row {i} "
                         f"{probs[i].tolist()} summing to {probs[i].sum():g}: logits? pass their softmax")
    y_pred = probs.argmax(1)
    p, r, f1, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    out: Dict[str, object] = {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "precision_macro": float(p),
        "recall_macro": float(r),
        "f1_macro": float(f1),
        "mcc": float(skm.matthews_corrcoef(y_true, y_pred)),
        "kappa": float(skm.cohen_kappa_score(y_true, y_pred, labels=labels)),
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "per_class": skm.classification_report(
            y_true, y_pred, labels=labels, target_names=list(classes), output_dict=True, zero_division=0
        ),
        "num_samples": int(len(y_true)),
    }
    try:
        if len(classes) == 2:
            out["auc"] = float(skm.roc_auc_score(y_true, probs[:, 1]))
        else:
            out["auc"] = float(skm.roc_auc_score(y_true, probs, multi_class="ovr", labels=labels))
    except ValueError as e:
        out["auc"] = None
        out["auc_note"] = str(e)
    if out["auc"] is not None and np.isnan(out["auc"]):
        out["auc"] = None
        out["auc_note"] = "undefined: some class has no positive or no negative sample in y_true"
    if np.isnan(out["mcc"]):
        out["mcc"] = 0.0
    if np.isnan(out["kappa"]):  # NaN would be written to metrics.json as NaN, which is not JSON
        out["kappa"] = None
        out["kappa_note"] = "undefined: every label and every prediction is the same class (chance agreement 1)"
    return out
