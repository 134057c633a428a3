#!/usr/bin/env python
"""RIFLE in a few CPU minutes, offline: vanilla fine-tuning vs RIFLE, same seed, side by side.

    make demo                  # = python recipes/demo.py --output_dir demo_output
    python recipes/demo.py --quick --output_dir /tmp/demo   # seconds: a smoke test

Fine-tunes EfficientNet-Lite0 (real ImageNet weights, from the Hub or the offline package) on the bundled
Fashion-MNIST subset (100 images per class) at a small input size, once without and once with RIFLE, then
prints both test accuracies, writes ``curves.png`` (accuracy and loss per epoch, re-init points marked),
``summary.json``, and the two model folders ``vanilla/`` and ``rifle/`` (timm's Hub format:
``timm.create_model("local-dir:demo_output/rifle", pretrained=True)`` loads one back).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import train_timm  # noqa: E402  (this folder; it also puts the clone's rifle_hf on sys.path)

from rifle_hf.cli import one_line_errors  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", default="demo_output")
    p.add_argument("--model", default=train_timm.DEFAULT_MODEL)
    p.add_argument("--num_epochs", type=int, default=12)
    p.add_argument("--rifle_num_reinits", type=int, default=3, help="R: re-inits at the end of each of R+1 periods")
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--max_train_samples_per_class", type=int, default=None, help="default: all bundled")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny smoke run: 2 epochs, 5 images/class, 32 px")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    args = p.parse_args(argv)
    if args.quick:
        args.num_epochs, args.rifle_num_reinits, args.image_size = 2, 1, 32
        args.max_train_samples_per_class = args.max_train_samples_per_class or 5
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both fine-tunings; returns ``{"vanilla": result, "rifle": result, "table", "plot", ...}``."""
    from rifle_hf.training import format_table, plot_history

    args = parse_args(argv)
    out = Path(args.output_dir)
    common = [
        "--model", args.model, "--num_epochs", str(args.num_epochs), "--image_size", str(args.image_size),
        "--lr", str(args.lr), "--seed", str(args.seed),
    ]
    if args.max_train_samples_per_class:
        common += ["--max_train_samples_per_class", str(args.max_train_samples_per_class)]
    if not args.progress:
        common.append("--quiet")
    runs = {
        "vanilla": [*common, "--rifle_num_reinits", "0", "--output_dir", str(out / "vanilla")],
        "rifle": [*common, "--rifle_num_reinits", str(args.rifle_num_reinits), "--output_dir", str(out / "rifle")],
    }
    start = time.perf_counter()
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for name, run_argv in runs.items():
        print(f"\n=== {name}: python recipes/train_timm.py {' '.join(run_argv)}", flush=True)
        t0 = time.perf_counter()
        results[name] = train_timm.main(run_argv)
        seconds[name] = time.perf_counter() - t0

    split = results["rifle"]["eval_split"]
    rows = []
    for name, res in results.items():
        reinits = res["history"] and [e for r in res["history"] for e in r.get("reinit_epochs", [])]
        rows.append([
            name,
            f"{100 * res['metrics']['top1']:.2f}",
            f"{100 * res['validation_metrics']['top1']:.2f}",
            ", ".join(f"{e:g}" for e in reinits) or "-",
            f"{seconds[name]:.0f}",
        ])
    table = format_table(rows, ["method", f"{split} top1 %", "val top1 %", "re-init at epoch", "time s"])
    plot = plot_history(
        {name: res["history"] for name, res in results.items()},
        out / "curves.png",
        metric=f"{split}_top1",
        title=f"{args.model} on Fashion-MNIST ({args.image_size} px): vanilla vs RIFLE (R={args.rifle_num_reinits})",
    )
    delta = 100 * (results["rifle"]["metrics"]["top1"] - results["vanilla"]["metrics"]["top1"])
    summary = {
        "model": args.model,
        "num_epochs": args.num_epochs,
        "rifle_num_reinits": args.rifle_num_reinits,
        "image_size": args.image_size,
        "seed": args.seed,
        "eval_split": split,
        "top1": {name: res["metrics"]["top1"] for name, res in results.items()},
        "validation_top1": {name: res["validation_metrics"]["top1"] for name, res in results.items()},
        "rifle_minus_vanilla_points": delta,
        "seconds": seconds,
        "total_seconds": time.perf_counter() - start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{table}\n")
    print(f"RIFLE - vanilla: {delta:+.2f} points ({split} top-1, one seed: expect noise of a point or two)")
    print(f"curves: {plot}\nRIFLE model: {out / 'rifle'}  (timm.create_model('local-dir:{out / 'rifle'}', "
          "pretrained=True))")
    print(f"total {summary['total_seconds']:.0f}s")
    return {**results, "table": table, "plot": str(plot), "summary": summary}


if __name__ == "__main__":
    one_line_errors(main)()
