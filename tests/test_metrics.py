"""The offline accuracy metric: same numbers as sklearn, hand-checked top-5 with ties, loads without the Hub."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score

from rifle_hf.metrics import (
    ACCURACY_METRIC_PATH,
    classification_accuracy,
    compute_classification_metrics,
    load_accuracy,
)


def _topk_by_hand(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Rank classes by (-score, class id) with a plain sort, row by row."""
    hits = []
    for row, y in zip(scores.tolist(), labels.tolist()):
        order = sorted(range(len(row)), key=lambda c: (-row[c], c))
        hits.append(y in order[:k])
    return np.array(hits)


@pytest.fixture(scope="module")
def metric(tmp_path_factory):
    return load_accuracy(cache_dir=str(tmp_path_factory.mktemp("metric_cache")))


def test_class_id_predictions_match_sklearn(metric):
    rng = np.random.default_rng(0)
    refs = rng.integers(0, 7, 200)
    preds = np.where(rng.random(200) < 0.6, refs, rng.integers(0, 7, 200))
    weights = rng.random(200)
    assert metric.compute(predictions=preds, references=refs) == {"accuracy": accuracy_score(refs, preds)}
    for normalize in (True, False):
        got = metric.compute(predictions=preds, references=refs, normalize=normalize, sample_weight=weights)
        assert got["accuracy"] == accuracy_score(refs, preds, normalize=normalize, sample_weight=weights)
    got = metric.compute(predictions=preds.tolist(), references=refs.tolist(), normalize=False)
    assert got["accuracy"] == accuracy_score(refs, preds, normalize=False) == float(np.sum(preds == refs))


def test_scores_give_top1_and_hand_checked_top5_with_ties(metric):
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 4, (300, 12)).astype(np.float32)  # few distinct values: many ties
    labels = rng.integers(0, 12, 300)
    weights = rng.random(300)
    got = metric.compute(predictions=scores, references=labels)
    assert got["accuracy"] == accuracy_score(labels, scores.argmax(1))
    assert got["top5_accuracy"] == float(np.mean(_topk_by_hand(scores, labels, 5)))
    got = metric.compute(predictions=scores, references=labels, sample_weight=weights, normalize=False)
    assert got["top5_accuracy"] == pytest.approx(float(np.dot(_topk_by_hand(scores, labels, 5), weights)))

    tiny = np.array([[1.0, 3.0, 3.0, 0.0, 3.0, 3.0, 3.0, 3.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    # row 0: classes 1,2,4,5,6 fill the top 5 (ties -> lower id first), so class 7 is out and class 6 in;
    # row 1: all tied, so classes 0-4 are in and 5-7 out
    assert classification_accuracy(tiny, [7, 4])["top5_accuracy"] == 0.5
    assert classification_accuracy(tiny, [7, 5])["top5_accuracy"] == 0.0
    assert classification_accuracy(tiny, [6, 4])["top5_accuracy"] == 1.0
    assert classification_accuracy(tiny, [1, 0]) == {"accuracy": 1.0, "top5_accuracy": 1.0}


def test_top5_matches_torch_topk_without_ties():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(500, 100, generator=g), torch.randint(0, 100, (500,), generator=g)
    out = compute_classification_metrics(logits, labels)
    top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(1).float().mean().item()
    assert out["top1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert out["top5"] == pytest.approx(top5) and out["top5"] >= out["top1"]


def test_compute_classification_metrics_inputs():
    rng = np.random.default_rng(2)
    logits, labels = rng.standard_normal((40, 5)), rng.integers(0, 5, 40)
    out = compute_classification_metrics(logits, labels)
    assert set(out) == {"top1"}  # 5 classes: top-5 would always be 1
    assert out["top1"] == accuracy_score(labels, logits.argmax(1))
    as_bf16 = compute_classification_metrics(torch.tensor(logits).bfloat16(), torch.tensor(labels))
    assert set(as_bf16) == {"top1"} and 0.0 <= as_bf16["top1"] <= 1.0
    assert compute_classification_metrics((logits, np.zeros((40, 3))), labels) == out  # Trainer output tuple
    with pytest.raises(ValueError, match="N, num_classes"):
        compute_classification_metrics(logits.argmax(1), labels)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        compute_classification_metrics(logits, labels + 5)
    with pytest.raises(ValueError, match="empty"):
        compute_classification_metrics(np.zeros((0, 3)), np.zeros(0, dtype=int))


def test_metric_script_is_a_local_evaluate_module(metric):
    import evaluate

    assert isinstance(metric, evaluate.Metric)
    assert Path(ACCURACY_METRIC_PATH, "topk_accuracy.py").is_file()
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest: this load did not use the Hub
    metric.add_batch(predictions=[0, 1], references=[0, 0])
    metric.add_batch(predictions=[2], references=[2])
    assert metric.compute() == {"accuracy": pytest.approx(2 / 3)}


@pytest.mark.slow
def test_loads_in_a_fresh_offline_process(tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),  # empty caches: nothing can come from an earlier download
    }
    code = (
        "from rifle_hf.metrics import load_accuracy\n"
        "m = load_accuracy()\n"
        "print(m.compute(predictions=[[0.1, 0.9, 0, 0, 0, 0], [0.8, 0.2, 0, 0, 0, 0]], references=[1, 1]))\n"
    )
    root = Path(__file__).resolve().parents[1]
    pythonpath = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "PYTHONPATH": pythonpath},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "{'accuracy': 0.5, 'top5_accuracy': 1.0}" in result.stdout
