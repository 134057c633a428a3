"""Backpropagation in depth: do the lower backbone layers move further under RIFLE than in vanilla?

    python benchmarks/backprop_depth.py                # 3 paired seeds, vanilla vs RIFLE R=3 (~6 min CPU)
    python benchmarks/backprop_depth.py --device cuda  # GPU mode
    python benchmarks/backprop_depth.py --smoke        # tiny data, temporary folder

Runs ``recipes/train_timm.py`` (the paper-table settings, see ``paper_table.py``) for vanilla and RIFLE
with ``--depth_diagnostics`` when the recipe offers it, and keeps the fine-tuned weights. The final
relative distance ``||W - W0|| / ||W0||`` per depth group (``rifle_hf.diagnostics.depth_groups``) is
computed from the saved weights against the pretrained ones, so the ratio does not depend on the
recipe's diagnostics format; the recipe's per-step depth CSV, when present, supplies the curves.
Outputs: ``backprop_depth.csv`` (per seed and group), ``backprop_depth.png`` (vanilla and RIFLE side
by side, first seed), ``backprop_depth_summary.csv`` (lowest-third ratio RIFLE / vanilla per seed and
its geometric mean; the paper claims > 1).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bench_common as bc
import paper_table as pt


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bc.add_common_args(p, bc.RESULTS_DIR)
    p.add_argument("--seeds", type=int, default=None, help="paired seeds (default 3)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--image_size", type=int, default=None)
    p.add_argument("--per_class", type=int, default=None)
    args = p.parse_args(argv)
    preset = pt.SMOKE if args.smoke else pt.DEFAULTS
    args.seeds = args.seeds or (1 if args.smoke else 3)
    for key in ("epochs", "image_size", "per_class", "test_size", "val_per_class"):
        if getattr(args, key, None) is None:
            setattr(args, key, preset[key])
    return args


def _model_for(args: argparse.Namespace, pretrained: bool) -> Any:
    from rifle_hf.pretrained import create_timm_model

    return create_timm_model(bc.MODEL, pretrained=pretrained, num_classes=10)


def _depth_csv(output_dir: Path) -> Path | None:
    found = sorted(p for p in Path(output_dir).rglob("*depth*.csv"))
    return found[0] if found else None


def tracker_for_run(args: argparse.Namespace, output_dir: Path, seed: int, reinit_steps: Sequence[int] = ()) -> Any:
    """A ``DepthTracker`` holding this run's distances: W0 = pretrained weights, final = saved model."""
    from safetensors.torch import load_file

    from rifle_hf.diagnostics import DepthTracker

    model = _model_for(args, pretrained=True)
    tracker = DepthTracker(model)
    recipe_csv = _depth_csv(output_dir)
    history: list[dict[str, float]] = []
    if recipe_csv is not None:
        with recipe_csv.open() as f:
            for row in csv.DictReader(f):
                entry = {k: float(v) for k, v in row.items() if v not in ("", None) and _numeric(v)}
                if "step" in entry:
                    history.append(entry)
    weights = Path(output_dir) / "model.safetensors"
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "num_batches_tracked" not in m]:
        raise KeyError(f"{weights} does not fit {type(model).__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    last_step = int(max((r["step"] for r in history), default=0)) + 1
    recipe_groups = {k.split("/", 1)[1] for r in history for k in r if k.startswith("dist/")}
    if history and recipe_groups == set(tracker.groups):
        tracker.history = history  # the recipe's per-step curves (same grouping)
    for step in reinit_steps:
        tracker.mark_reinit(int(step))
    final = tracker.distances(model)
    if not (history and recipe_groups == set(tracker.groups)):
        tracker.history = [{"step": last_step, **{f"dist/{g}": v for g, v in final.items()}}]
    return tracker, final


def _numeric(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = None
    if args.smoke and args.out == bc.RESULTS_DIR:
        tmp = Path(tempfile.mkdtemp(prefix="backprop_depth_smoke_"))
        args.out = tmp
    bc.setup_torch(args)
    args.out.mkdir(parents=True, exist_ok=True)
    bc.write_run_info(args.out, "backprop_depth", args.device, {"seeds": args.seeds, "epochs": args.epochs})
    from rifle_hf.diagnostics import compare_depth, lowest_third

    flags = bc.recipe_flags()
    depth_flag = ["--depth_diagnostics"] if "--depth_diagnostics" in flags else []
    per_group: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    first_pair: dict[str, Any] = {}
    arms = {"vanilla": "vanilla", "rifle": "rifle_r1" if args.smoke else pt.RIFLE_ROW}  # smoke: 2 epochs fit R=1
    for seed in range(args.seeds):
        data_dir = bc.prepare_fashion_mnist(
            args.out / "runs" / "data" / f"fmnist_pc{args.per_class}_t{args.test_size}_s{seed}",
            args.per_class, seed, args.test_size, args.val_per_class,
        )
        trackers = {}
        for arm, row in arms.items():
            out_dir = args.out / "runs" / "backprop_depth" / f"{arm}__seed{seed}"
            argv_ = pt.recipe_argv(args, row, seed, data_dir, out_dir) + depth_flag
            record = args.out / "backprop_depth_runs" / f"{arm}__seed{seed}.json"
            if record.is_file() and not (out_dir / "model.safetensors").is_file():
                record.unlink()  # the weights are needed here: redo the run
            bc.log(f"depth run {arm} seed {seed}")
            rec = bc.cached_run(record, argv_, out_dir, {"arm": arm, "seed": seed}, keep_outputs=True)
            tracker, final = tracker_for_run(args, out_dir, seed, rec["results"].get("reinit_steps") or ())
            trackers[arm] = tracker
            low = lowest_third(tracker.groups)
            for g, v in final.items():
                per_group.append({"seed": seed, "arm": arm, "group": g, "final_distance": v,
                                  "lowest_third": g in low, "test_top1": rec["test_top1"]})
        s_van = trackers["vanilla"].summary()["lowest_third_mean"]
        s_rif = trackers["rifle"].summary()["lowest_third_mean"]
        summary.append({"seed": seed, "vanilla_lowest_third": s_van, "rifle_lowest_third": s_rif,
                        "ratio_rifle_over_vanilla": s_rif / s_van if s_van > 0 else math.nan,
                        "lowest_third_groups": lowest_third(trackers["vanilla"].groups)})
        if not first_pair:
            first_pair = trackers
    ratios = [r["ratio_rifle_over_vanilla"] for r in summary]
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if all(r > 0 for r in ratios) else math.nan
    summary.append({"seed": "geometric_mean", "ratio_rifle_over_vanilla": geo})
    bc.write_csv(args.out / "backprop_depth.csv", per_group)
    bc.write_csv(args.out / "backprop_depth_summary.csv", summary)
    compare_depth({"vanilla": first_pair["vanilla"], pt.ROWS[arms["rifle"]][0]: first_pair["rifle"]},
                  args.out / "backprop_depth.png",
                  title=f"Backpropagation in depth (seed 0): lowest-third distance RIFLE/vanilla = {ratios[0]:.2f}")
    bc.log(f"lowest-third distance ratio RIFLE / vanilla per seed: {[round(r, 3) for r in ratios]}, "
           f"geometric mean {geo:.3f}")
    if tmp is not None:
        print(f"smoke outputs in {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
