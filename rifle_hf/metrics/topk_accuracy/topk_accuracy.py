"""Offline top-1 / top-5 accuracy as an ``evaluate`` module.

``evaluate.load("accuracy")`` fetches its script from the Hugging Face Hub, so it fails offline. This script is
loadable with ``evaluate.load("<path to this folder>")`` without network access. Top-1 follows the Hub
``accuracy`` metric exactly (the same formula as ``sklearn.metrics.accuracy_score``: ``normalize`` and
``sample_weight``), implemented with numpy so scikit-learn is not a runtime dependency. When predictions are
per-class scores (logits or probabilities) instead of class ids, top-1 uses ``argmax`` and top-5 is added when
there are more than 5 classes.

The script is self-contained on purpose: ``evaluate`` copies it into its module cache and imports it from there.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-1 accuracy (the proportion of correct predictions) and, for per-class scores with more than 5 classes,
top-5 accuracy. Ties in scores are broken towards the lower class index, like ``numpy.argmax``.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`, or `list` of `list` of `float`): predicted class ids, or per-class scores
        (logits or probabilities) of shape (N, C).
    references (`list` of `int`): ground-truth class ids.
    normalize (`bool`, default True): if False, return the (weighted) number of correct samples instead of the
        fraction.
    sample_weight (`list` of `float`, optional): per-sample weights.
Returns:
    accuracy (`float`): top-1 accuracy.
    top5_accuracy (`float`): only when `predictions` are scores over more than 5 classes.
Examples:
    >>> metric = evaluate.load("path/to/rifle_hf/metrics/topk_accuracy")
    >>> metric.compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1])
    {'accuracy': 0.75}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


def _average(correct: np.ndarray, sample_weight: np.ndarray | None, normalize: bool) -> float:
    """The reduction of ``sklearn.metrics.accuracy_score`` (numpy path), so results match it bit for bit."""
    if normalize:
        return float(np.average(correct, weights=sample_weight))
    if sample_weight is not None:
        return float(np.dot(correct, sample_weight))
    return float(np.sum(correct))


def topk_correct(scores: np.ndarray, references: np.ndarray, k: int) -> np.ndarray:
    """Boolean (N,) mask: is the reference among the ``k`` best-scored classes?

    Classes are ranked by score, ties broken towards the lower class index (the ``numpy.argmax`` rule), so
    ``k=1`` agrees with ``argmax`` and the result never depends on sort stability.
    """
    true_scores = np.take_along_axis(scores, references[:, None], axis=1)
    class_ids = np.arange(scores.shape[1])[None, :]
    better = (scores > true_scores) | ((scores == true_scores) & (class_ids < references[:, None]))
    return better.sum(axis=1) < k


def classification_accuracy(
    predictions, references, normalize: bool = True, sample_weight=None
) -> dict[str, float]:
    """Top-1 (and top-5 for scores over more than 5 classes) accuracy; see the module docstring."""
    preds = np.asarray(predictions)
    refs = np.asarray(references)
    if refs.ndim != 1:
        raise ValueError(f"references must be a 1-D array of class ids, got shape {refs.shape}")
    if preds.ndim not in (1, 2) or preds.shape[0] != refs.shape[0]:
        raise ValueError(
            f"predictions must be class ids (N,) or scores (N, C) with N={refs.shape[0]}, got shape {preds.shape}"
        )
    if refs.size == 0:
        raise ValueError("accuracy of an empty set is undefined: pass at least one prediction")
    weights = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if weights is not None and weights.shape != refs.shape:
        raise ValueError(f"sample_weight must have shape {refs.shape}, got {weights.shape}")
    if preds.ndim == 1:
        return {"accuracy": _average(refs == preds, weights, normalize)}

    refs = refs.astype(np.int64)
    num_classes = preds.shape[1]
    if refs.min() < 0 or refs.max() >= num_classes:
        raise ValueError(f"references must be class ids in [0, {num_classes}) to match the score columns")
    scores = preds.astype(np.float64, copy=False)
    result = {"accuracy": _average(topk_correct(scores, refs, 1), weights, normalize)}
    if num_classes > 5:
        result["top5_accuracy"] = _average(topk_correct(scores, refs, 5), weights, normalize)
    return result


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopkAccuracy(evaluate.Metric):
    """Hub-``accuracy``-compatible metric that also takes per-class scores and reports top-5."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Sequence(datasets.Value("float64")),
                        "references": datasets.Value("int64"),
                    }
                ),
            ],
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"
            ],
        )

    def _compute(
        self, predictions, references, normalize: bool = True, sample_weight=None
    ) -> dict[str, float]:
        return classification_accuracy(
            predictions, references, normalize=normalize, sample_weight=sample_weight
        )
