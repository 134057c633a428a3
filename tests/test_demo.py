"""recipes/demo.py (``make demo``): the quick mode end to end, offline, with the real EfficientNet-Lite0 weights."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo_module():
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import demo

        yield demo
    finally:
        sys.path.remove(str(ROOT / "recipes"))


def test_quick_mode_is_tiny_and_full_mode_defaults(demo_module):
    quick = demo_module.parse_args(["--quick"])
    assert (quick.num_epochs, quick.rifle_num_reinits, quick.image_size) == (2, 1, 32)
    assert quick.max_train_samples_per_class == 5
    full = demo_module.parse_args([])
    assert full.model == "tf_efficientnet_lite0" and full.output_dir == "demo_output"
    assert full.num_epochs > full.rifle_num_reinits + 1  # every RIFLE period is at least one epoch


def test_plot_history_marks_reinits_and_writes_png(tmp_path):
    from rifle_hf.training import plot_history

    rows = [{"epoch": e, "train_loss": 1.0 / e, "test_top1": 0.1 * e, "reinit_epochs": [2.0] if e == 2 else []}
            for e in (1, 2, 3)]
    path = plot_history({"vanilla": [{**r, "reinit_epochs": []} for r in rows], "rifle": rows},
                        tmp_path / "sub" / "curves.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError):
        plot_history({}, tmp_path / "empty.png")


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    import timm
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "demo"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, str(DEMO), "--quick", "--output_dir", str(out)],
                          capture_output=True, text=True, env=env, timeout=900, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_split"] == "test" and summary["rifle_num_reinits"] == 1
    # the printed table: a header, then one row per method with its test and validation accuracy (in %)
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    assert "test top1 %" in lines[header] and set(lines[header + 1]) <= {"-", " "}
    rows = {line.split()[0]: line.split() for line in lines[header + 2 : header + 4]}
    assert set(rows) == {"vanilla", "rifle"}
    for name, cells in rows.items():
        assert float(cells[1]) == pytest.approx(100 * summary["top1"][name], abs=0.006)
        assert float(cells[2]) == pytest.approx(100 * summary["validation_top1"][name], abs=0.006)
    assert rows["rifle"][3] == "1" and rows["vanilla"][3] == "-"  # re-init after epoch 1 of 2
    assert re.search(r"RIFLE - vanilla: [+-]\d+\.\d\d points", proc.stdout)

    assert (out / "curves.png").read_bytes()[:8] == PNG_SIGNATURE
    rifle_dir = out / "rifle"
    loaded = timm.create_model(f"local-dir:{rifle_dir}", pretrained=True)
    saved = load_file(str(rifle_dir / "model.safetensors"))
    assert all(torch.equal(loaded.state_dict()[k], saved[k]) for k in saved)
    assert loaded.pretrained_cfg["label_names"][0] == "T-shirt/top" and loaded.num_classes == 10
    assert json.loads((rifle_dir / "all_results.json").read_text())["reinit_steps"]
    assert '"num_reinits": 1' in (rifle_dir / "README.md").read_text()
