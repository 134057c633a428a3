"""Classification metrics that work offline.

``load_accuracy()`` returns a real ``evaluate`` module loaded from the script shipped in this package (no Hub
access), for code that wants the ``evaluate`` API. ``compute_classification_metrics`` is the plain-function form
both recipes call on gathered logits; it runs the very same code as the ``evaluate`` module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rifle_hf.metrics.topk_accuracy.topk_accuracy import classification_accuracy, topk_correct

__all__ = [
    "ACCURACY_METRIC_PATH",
    "classification_accuracy",
    "compute_classification_metrics",
    "load_accuracy",
    "topk_correct",
]

#: Folder of the local ``evaluate`` metric script: ``evaluate.load(ACCURACY_METRIC_PATH)`` works offline.
ACCURACY_METRIC_PATH = str(Path(__file__).resolve().parent / "topk_accuracy")


def load_accuracy(**kwargs: Any):
    """``evaluate.load`` the shipped top-1/top-5 accuracy module (offline-safe); kwargs go to ``evaluate.load``."""
    import evaluate

    return evaluate.load(ACCURACY_METRIC_PATH, **kwargs)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, possibly on an accelerator or in bf16
        x = x.detach().float().cpu() if x.is_floating_point() else x.detach().cpu()
        return x.numpy()
    return np.asarray(x)


def compute_classification_metrics(logits: Any, labels: Any) -> dict[str, float]:
    """``{"top1": ..., "top5": ...}`` from (N, C) scores and (N,) labels; ``top5`` only when C > 5.

    Accepts numpy arrays or torch tensors; a tuple of model outputs (as ``Trainer`` may hand over) uses its first
    element, the logits. For a ``Trainer``: ``compute_metrics=lambda p: compute_classification_metrics(
    p.predictions, p.label_ids)``.
    """
    if isinstance(logits, tuple):
        logits = logits[0]
    scores = _to_numpy(logits)
    if scores.ndim != 2:
        raise ValueError(
            f"logits must have shape (N, num_classes), got {scores.shape}; pass scores, not class ids"
        )
    result = classification_accuracy(scores, _to_numpy(labels))
    out = {"top1": result["accuracy"]}
    if "top5_accuracy" in result:
        out["top5"] = result["top5_accuracy"]
    return out
