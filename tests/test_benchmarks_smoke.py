"""Benchmarks: the statistics and table logic (fast), and each script's ``--smoke`` mode end to end (slow).

The smoke runs are real: the scripts call the recipes' ``main`` on tiny Fashion-MNIST splits written to
``tmp_path`` and must leave their CSV and PNG there.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
RECIPE_TIMM = ROOT / "recipes" / "train_timm.py"
RECIPE_HF = ROOT / "recipes" / "train_hf.py"


@pytest.fixture(scope="module")
def bench_modules():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_common
        import paper_table

        yield bench_common, paper_table
    finally:
        sys.path.remove(str(BENCH))


# ------------------------------------------------------------------------------------------- fast
def test_paired_bootstrap_ci_properties(bench_modules):
    bc, _ = bench_modules
    rng = np.random.default_rng(1)
    b = rng.uniform(0.7, 0.9, size=8)
    # A constant paired shift: every resample has the same mean difference.
    d, lo, hi = bc.paired_bootstrap_ci(b + 0.02, b)
    assert d == pytest.approx(0.02) and lo == pytest.approx(0.02) and hi == pytest.approx(0.02)
    # Noisy differences: the interval brackets the observed mean and is seeded (reproducible).
    a = b + rng.normal(0.01, 0.02, size=8)
    d, lo, hi = bc.paired_bootstrap_ci(a, b, seed=3)
    assert lo < d < hi
    assert (d, lo, hi) == bc.paired_bootstrap_ci(a, b, seed=3)
    assert bc.paired_bootstrap_ci(a, b, level=0.5, seed=3)[1] > lo  # a narrower level, a narrower interval
    with pytest.raises(ValueError, match="equally long"):
        bc.paired_bootstrap_ci([0.1, 0.2], [0.1])


def test_paper_table_verdicts_follow_the_paired_ci(bench_modules, tmp_path):
    bc, pt = bench_modules
    base = [0.80, 0.82, 0.78, 0.81, 0.79]

    def recs(values):
        return {s: {"test_top1": v, "val_top1": v, "wall_s": 1.0} for s, v in enumerate(values)}

    records = {
        "vanilla": recs(base),
        pt.RIFLE_ROW: recs([v + 0.01 for v in base]),            # RIFLE: +1 pp on every seed
        "dropout": recs([v - 0.005 for v in base]),               # RIFLE beats it
        "l2sp": recs([v + 0.03 for v in base]),                   # better than RIFLE
        "cyclic_lr": recs([v + 0.01 + e for v, e in zip(base, [0.02, -0.02, 0.01, -0.01, 0.0])]),  # a wash
    }
    summary = {r["row"]: r for r in pt.summarize(records)}
    assert summary["dropout"]["rifle_beats"] == "yes"
    assert summary["l2sp"]["rifle_beats"] == "no: this row is better"
    assert summary["cyclic_lr"]["rifle_beats"] == "no: CI includes 0"
    assert summary[pt.RIFLE_ROW]["diff_vs_vanilla"] == pytest.approx(0.01)
    assert "rifle_beats" not in summary[pt.RIFLE_ROW]
    assert summary["vanilla"]["test_top1_mean"] == pytest.approx(np.mean(base))
    args = pt.parse_args(["--out", str(tmp_path)])
    md = pt.markdown(args, list(summary.values()), "test machine")
    assert sum(line.startswith("|") for line in md.splitlines()) == 2 + len(records)  # header, rule, rows
    png = pt.plot(records, list(summary.values()), tmp_path / "t.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------- smoke
def _run(script: str, tmp_path: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets_cache")}
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke", "--threads", "1", "--out", str(tmp_path / "out"), *extra],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _csv_rows(path: Path) -> list[dict[str, str]]:
    assert path.is_file(), f"{path} missing"
    with path.open() as f:
        return list(csv.DictReader(f))


needs_timm_recipe = pytest.mark.skipif(not RECIPE_TIMM.is_file(), reason="recipes/train_timm.py not written yet")

def test_a_run_with_the_same_recipe_settings_is_reused_not_redone(bench_modules, tmp_path):
    """The regime study takes the table's record when the recipe would train exactly the same run."""
    bc, _ = bench_modules
    base = ["--model", "test_resnet", "--dataset", str(tmp_path / "data"), "--seed", "1", "--num_epochs", "4"]
    records = tmp_path / "records"
    records.mkdir()
    (records / "rifle.json").write_text(json.dumps(
        {"argv": [*base, "--rifle_num_reinits", "3", "--output_dir", str(tmp_path / "a"), "--quiet"], "test_top1": 0.5}))
    same = ["--rifle_num_reinits", "3", "--rifle_head_lr", "cyclic", *base, "--output_dir", str(tmp_path / "b")]
    found = bc.find_equivalent_record(same, [records])
    assert found is not None and found[0].name == "rifle.json" and found[1]["test_top1"] == 0.5
    assert bc.find_equivalent_record([*same, "--rifle_head_lr", "none"], [records]) is None
    assert bc.find_equivalent_record([*base, "--output_dir", str(tmp_path / "c")], [records]) is None  # vanilla
    assert not (tmp_path / "b").exists()  # parsing the settings writes nothing


@pytest.mark.slow
@needs_timm_recipe
def test_paper_table_smoke(tmp_path):
    _run("paper_table.py", tmp_path)
    out = tmp_path / "out"
    rows = _csv_rows(out / "paper_table.csv")
    assert {r["row"] for r in rows} == {"vanilla", "rifle_r1"}
    assert all(0.0 <= float(r["test_top1"]) <= 1.0 for r in rows)
    assert (out / "paper_table.png").stat().st_size > 0
    assert "RIFLE beats it here?" in (out / "paper_table.md").read_text()
    # Resumable: a second call finds every record and runs nothing.
    proc = _run("paper_table.py", tmp_path)
    assert "run vanilla seed" not in proc.stdout


@pytest.mark.slow
@needs_timm_recipe
def test_regime_study_smoke(tmp_path):
    _run("regime_study.py", tmp_path)
    out = tmp_path / "out"
    rows = _csv_rows(out / "regime_study.csv")
    assert {"base", "R", "per_class"} <= {r["stage"] for r in rows}
    assert (out / "regime_study.png").stat().st_size > 0
    assert "Chosen RIFLE vs the reference defaults" in (out / "regime_study.md").read_text()


@pytest.mark.slow
@needs_timm_recipe
def test_backprop_depth_smoke(tmp_path):
    _run("backprop_depth.py", tmp_path)
    out = tmp_path / "out"
    summary = _csv_rows(out / "backprop_depth_summary.csv")
    assert float(summary[0]["ratio_rifle_over_vanilla"]) > 0
    groups = _csv_rows(out / "backprop_depth.csv")
    assert {r["arm"] for r in groups} == {"vanilla", "rifle"}
    assert (out / "backprop_depth.png").stat().st_size > 0


@pytest.mark.slow
def test_overhead_smoke(tmp_path):
    _run("overhead.py", tmp_path)
    out = tmp_path / "out"
    metrics = {r["metric"]: float(r["value"]) for r in _csv_rows(out / "overhead.csv")}
    assert metrics["trainer_step_plain"] > 0 and metrics["trainer_step_rifle"] > 0
    assert metrics["reinit_head_time"] > 0 and metrics["img_per_s_bare"] > 0
    if RECIPE_TIMM.is_file():
        assert metrics["img_per_s_timm"] > 0 and "recipe_timm_vs_bare" in metrics
    if RECIPE_HF.is_file():
        assert metrics["img_per_s_hf"] > 0
    assert (out / "overhead.png").stat().st_size > 0
