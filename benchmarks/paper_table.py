"""The RIFLE paper's comparison table, re-run through ``recipes/train_timm.py`` on few-shot Fashion-MNIST.

    python benchmarks/paper_table.py                 # the main table (resumable; ~1 h on 2 CPU cores)
    python benchmarks/paper_table.py --device cuda   # GPU mode: bf16 + channels_last (~8 min on one GPU)
    python benchmarks/paper_table.py --smoke         # a few steps on tiny data, into a temporary folder

Every row fine-tunes EfficientNet-Lite0 (real ImageNet weights, the recipes' offline default) on the
same seeded split -- 100 training images per class, 2,000 test images, a separate validation draw --
with the same epochs, optimizer (SGD, momentum 0.9, lr 0.01, batch 32, cosine) and seeds; only the
row's flags differ. One record per (row, seed) under ``<out>/paper_table_runs``: a finished run is
never redone. Outputs: ``paper_table.csv`` (per seed), ``paper_table_summary.csv``, ``paper_table.md``,
``paper_table.png`` and ``paper_table_machine.json`` (command, machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bench_common as bc

#: The RIFLE row the others are compared with (fixed before running: the paper's R=3, cyclic head LR).
RIFLE_ROW = "rifle_r3"
L2SP = ["--l2sp", "0.01", "0.0001"]  # the reference train.py defaults (alpha, beta)

#: row name -> (label, extra recipe flags). Strengths: see benchmarks/README.md ("Competitor settings").
ROWS: dict[str, tuple[str, list[str]]] = {
    "vanilla": ("Vanilla fine-tuning (L2 / weight decay 1e-4)", []),
    "rifle_r1": ("RIFLE, R=1 (cyclic head LR)", ["--rifle_num_reinits", "1"]),
    "rifle_r2": ("RIFLE, R=2 (cyclic head LR)", ["--rifle_num_reinits", "2"]),
    "rifle_r3": ("RIFLE, R=3 (cyclic head LR)", ["--rifle_num_reinits", "3"]),
    "dropout": ("Dropout p=0.5 before the head", ["--drop_rate", "0.5"]),
    "dropconnect": ("DropConnect p=0.5 (reference, per-sample on pooled features)", ["--drop_connect", "0.5"]),
    "stochastic_depth": ("StochasticDepth, drop-path 0.2", ["--drop_path_rate", "0.2"]),
    "disturblabel": ("DisturbLabel alpha=0.1", ["--disturb_label", "0.1"]),
    "cyclic_lr": ("Cyclic LR (cosine, 4 cycles = RIFLE R=3 periods)", ["--lr_schedule", "cyclic", "--lr_cycles", "3"]),
    "l2sp": ("L2-SP alpha=0.01, beta=1e-4", L2SP),
    "rifle_l2sp": ("RIFLE R=3 + L2-SP", ["--rifle_num_reinits", "3", *L2SP]),
}

DEFAULTS = {"epochs": 12, "image_size": 64, "per_class": 100, "test_size": 2000, "val_per_class": 50, "seeds": 5}
SMOKE = {"epochs": 2, "image_size": 32, "per_class": 3, "test_size": 20, "val_per_class": 2, "seeds": 2}
SMOKE_ROWS = ["vanilla", "rifle_r1"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    bc.add_common_args(p, bc.RESULTS_DIR)
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=None, help="default: all rows")
    p.add_argument("--seeds", type=int, default=None, help=f"paired seeds 0..N-1 (default {DEFAULTS['seeds']})")
    p.add_argument("--epochs", type=int, default=None, help=f"default {DEFAULTS['epochs']} (divisible by 2, 3, 4)")
    p.add_argument("--image_size", type=int, default=None, help=f"default {DEFAULTS['image_size']} px")
    p.add_argument("--per_class", type=int, default=None, help="training images per class (default 100)")
    p.add_argument("--test_size", type=int, default=None, help="test images (default 2000)")
    p.add_argument("--val_per_class", type=int, default=None, help="validation images per class (default 50)")
    p.add_argument("--max-runs", dest="max_runs", type=int, default=None, help="stop after N new runs")
    p.add_argument("--keep_outputs", action="store_true", help="keep each run's model folder")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel worker processes sharing the records (default: 1 on CPU, 4 on GPU)")
    p.add_argument("--report_only", action="store_true", help="rebuild the table from existing records")
    p.add_argument("--rifle_row", choices=[r for r in ROWS if r.startswith("rifle")], default=None,
                   help=f"the RIFLE row every other row is compared with (default {RIFLE_ROW}; smoke: rifle_r1)")
    args = p.parse_args(argv)
    preset = SMOKE if args.smoke else DEFAULTS
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.rows is None:
        args.rows = SMOKE_ROWS if args.smoke else list(ROWS)
    if args.rifle_row is None:
        args.rifle_row = "rifle_r1" if args.smoke else RIFLE_ROW
    if args.workers is None:
        args.workers = 4 if args.device == "cuda" else 1
    if args.epochs < 1 or args.seeds < 1 or args.workers < 1:
        p.error("--epochs, --seeds and --workers must be >= 1")
    return args


def recipe_argv(args: argparse.Namespace, row: str, seed: int, data_dir: Path, output_dir: Path) -> list[str]:
    """The recipe command line of one (row, seed): shared settings + the row's own flags."""
    return [
        "--model", bc.MODEL,
        "--pretrained",
        "--dataset", str(data_dir),
        "--output_dir", str(output_dir),
        "--seed", str(seed),
        "--num_epochs", str(args.epochs), "--eval_every", str(args.epochs),
        "--batch_size", "32",
        "--lr", "0.01",
        "--momentum", "0.9",
        "--weight_decay", "1e-4",
        "--image_size", str(args.image_size),
        *bc.precision_args(args),
        *ROWS[row][1],
    ]


def _check_settings(rec: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    """A record made with other settings must not be mixed into this table."""
    for key in ("epochs", "image_size", "per_class", "device"):
        if key in rec and rec[key] != getattr(args, key):
            raise SystemExit(
                f"error: {path} was made with {key}={rec[key]}, this table uses {getattr(args, key)}; "
                "pass a different --out or delete the old records"
            )


def run_order(args: argparse.Namespace) -> list[tuple[str, int]]:
    """Vanilla and the compared RIFLE row on every seed first (the headline difference), then the
    other rows seed-major, so an interrupted table still holds paired results."""
    core = [r for r in ("vanilla", args.rifle_row) if r in args.rows]
    order = [(row, seed) for seed in range(args.seeds) for row in core]
    order += [(row, seed) for seed in range(args.seeds) for row in args.rows if row not in core]
    return order


def run_all(args: argparse.Namespace) -> int:
    """Run the missing (row, seed) records in `run_order`; return how many were run."""
    runs_dir = args.out / "paper_table_runs"
    new = 0
    for row, seed in run_order(args):
        record = runs_dir / f"{row}__seed{seed}.json"
        if record.is_file():
            _check_settings(json.loads(record.read_text()), args, record)
            continue
        if args.max_runs is not None and new >= args.max_runs:
            break
        if not bc.try_lock(record):
            continue  # another worker process is running it
        try:
            new += _run_one(args, row, seed, record)
        finally:
            bc.release_lock(record)
    return new


def _run_one(args: argparse.Namespace, row: str, seed: int, record: Path) -> int:
    """One (row, seed) through the recipe; writes its record and refreshes the table."""
    data_dir = bc.prepare_fashion_mnist(
        args.out / "runs" / "data" / f"fmnist_pc{args.per_class}_t{args.test_size}_s{seed}",
        args.per_class, seed, args.test_size, args.val_per_class,
    )
    out_dir = args.out / "runs" / "paper_table" / f"{row}__seed{seed}"
    bc.log(f"run {row} seed {seed}")
    rec = bc.cached_run(
        record, recipe_argv(args, row, seed, data_dir, out_dir), out_dir,
        {"row": row, "seed": seed, "epochs": args.epochs, "image_size": args.image_size,
         "per_class": args.per_class, "device": args.device},
        keep_outputs=args.keep_outputs,
    )
    bc.log(f"  {row} seed {seed}: test top-1 {rec['test_top1']:.4f} in {rec['wall_s']:.0f} s "
           f"({rec['results'].get('train_samples_per_s')} train img/s)")
    report(args)
    return 1


def load_records(args: argparse.Namespace) -> dict[str, dict[int, dict[str, Any]]]:
    out: dict[str, dict[int, dict[str, Any]]] = {}
    runs_dir = args.out / "paper_table_runs"
    for row in args.rows:
        for seed in range(args.seeds):
            path = runs_dir / f"{row}__seed{seed}.json"
            if path.is_file():
                rec = json.loads(path.read_text())
                _check_settings(rec, args, path)
                out.setdefault(row, {})[seed] = rec
    return out


def _verdict(lo: float, hi: float) -> str:
    if lo > 0:
        return "yes"
    if hi < 0:
        return "no: this row is better"
    return "no: CI includes 0"


def summarize(records: dict[str, dict[int, dict[str, Any]]], rifle_row: str = RIFLE_ROW) -> list[dict[str, Any]]:
    """Per row: mean/std over seeds, paired differences vs vanilla and RIFLE-minus-row, bootstrap CIs."""
    rows: list[dict[str, Any]] = []
    base = records.get("vanilla", {})
    rifle = records.get(rifle_row, {})
    for row, by_seed in records.items():
        seeds = sorted(by_seed)
        test = [by_seed[s]["test_top1"] for s in seeds]
        val = [by_seed[s]["val_top1"] for s in seeds if by_seed[s].get("val_top1") is not None]
        mean, std = bc.mean_std(test)
        entry: dict[str, Any] = {
            "row": row, "label": ROWS[row][0], "flags": " ".join(ROWS[row][1]), "n_seeds": len(seeds),
            "test_top1_mean": mean, "test_top1_std": std,
            "val_top1_mean": bc.mean_std(val)[0] if val else None,
            "wall_s_mean": bc.mean_std([by_seed[s]["wall_s"] for s in seeds])[0],
        }
        paired = [s for s in seeds if s in base]
        if row != "vanilla" and paired:
            d, lo, hi = bc.paired_bootstrap_ci([by_seed[s]["test_top1"] for s in paired],
                                               [base[s]["test_top1"] for s in paired])
            entry.update(diff_vs_vanilla=d, diff_vs_vanilla_lo=lo, diff_vs_vanilla_hi=hi, n_paired_vanilla=len(paired))
        paired = [s for s in seeds if s in rifle]
        if row != rifle_row and paired:
            d, lo, hi = bc.paired_bootstrap_ci([rifle[s]["test_top1"] for s in paired],
                                               [by_seed[s]["test_top1"] for s in paired])
            entry.update(rifle_minus_row=d, rifle_minus_row_lo=lo, rifle_minus_row_hi=hi,
                         n_paired_rifle=len(paired), rifle_beats=_verdict(lo, hi))
        rows.append(entry)
    return rows


def _pp(x: float | None, sign: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:+.2f}" if sign else f"{100 * x:.2f}"


def markdown(args: argparse.Namespace, summary: list[dict[str, Any]], machine: str) -> str:
    n_total = max((r["n_seeds"] for r in summary), default=0)
    lines = [
        f"Few-shot Fashion-MNIST ({args.per_class} training images per class, {args.test_size} test images), "
        f"EfficientNet-Lite0 (ImageNet weights) at {args.image_size} px, {args.epochs} epochs, SGD "
        "(momentum 0.9, lr 0.01, weight decay 1e-4, batch 32, cosine), paired seeds "
        f"(up to {n_total}; seed = data split + init + order). Test top-1 in %, mean ± std over seeds; "
        "differences are paired, with 95% bootstrap CIs over seeds (10,000 resamples). "
        f"\"RIFLE beats it\" compares {ROWS[args.rifle_row][0]} with the row: yes when the CI of RIFLE − row "
        "is above 0.",
        "",
        "| Method | n | Test top-1 (%) | Δ vs vanilla [95% CI] | RIFLE − row [95% CI] | RIFLE beats it here? |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in summary:
        diff = (f"{_pp(r['diff_vs_vanilla'], True)} [{_pp(r['diff_vs_vanilla_lo'], True)}, "
                f"{_pp(r['diff_vs_vanilla_hi'], True)}]" if "diff_vs_vanilla" in r else "-")
        rm = (f"{_pp(r['rifle_minus_row'], True)} [{_pp(r['rifle_minus_row_lo'], True)}, "
              f"{_pp(r['rifle_minus_row_hi'], True)}]" if "rifle_minus_row" in r else "-")
        verdict = r.get("rifle_beats", "(the RIFLE row compared with)" if r["row"] == args.rifle_row else "-")
        lines.append(f"| {r['label']} | {r['n_seeds']} | {_pp(r['test_top1_mean'])} ± {_pp(r['test_top1_std'])} "
                     f"| {diff} | {rm} | {verdict} |")
    missing = len(args.rows) * args.seeds - sum(r["n_seeds"] for r in summary)
    if missing:
        lines += ["", f"**Incomplete**: {missing} of {len(args.rows) * args.seeds} runs still missing; the same "
                  "command resumes (finished runs are kept). Differences use the seeds both rows have."]
    lines += ["", f"Command: `{bc.command_line()}`", "", f"Machine: {machine}", ""]
    return "\n".join(lines)


def plot(records: dict[str, dict[int, dict[str, Any]]], summary: list[dict[str, Any]], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.5), layout="constrained")
    ax = fig.subplots()
    names = [r["row"] for r in summary]
    means = [100 * r["test_top1_mean"] for r in summary]
    stds = [100 * r["test_top1_std"] for r in summary]
    colors = ["tab:red" if n.startswith("rifle") else ("tab:gray" if n == "vanilla" else "tab:blue") for n in names]
    ax.bar(range(len(names)), means, yerr=stds, color=colors, alpha=0.6, capsize=3)
    for i, n in enumerate(names):
        vals = [100 * rec["test_top1"] for rec in records[n].values()]
        ax.scatter([i] * len(vals), vals, color="black", s=10, zorder=3)
    lo = min([min(100 * rec["test_top1"] for rec in recs.values()) for recs in records.values()] or [0])
    hi = max([max(100 * rec["test_top1"] for rec in recs.values()) for recs in records.values()] or [100])
    ax.set_ylim(max(0, lo - 2), min(100, hi + 1))
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("Few-shot Fashion-MNIST, EfficientNet-Lite0: mean ± std over seeds (dots: seeds)")
    ax.grid(axis="y", alpha=0.3)
    return bc.save_figure(fig, path)


def report(args: argparse.Namespace) -> dict[str, Any] | None:
    """(Re)write CSVs, markdown and PNG from whatever records exist."""
    records = load_records(args)
    if not records:
        return None
    per_seed = [
        {"row": row, "seed": seed, "test_top1": rec["test_top1"], "val_top1": rec.get("val_top1"),
         "wall_s": rec["wall_s"], "epochs": rec.get("epochs"), "image_size": rec.get("image_size")}
        for row, by_seed in records.items() for seed, rec in sorted(by_seed.items())
    ]
    bc.write_csv(args.out / "paper_table.csv", per_seed)
    summary = summarize(records, args.rifle_row)
    bc.write_csv(args.out / "paper_table_summary.csv", summary)
    info = bc.machine_info(args.device)
    bc.atomic_write_text(args.out / "paper_table.md", markdown(args, summary, bc.machine_line(info)))
    plot(records, summary, args.out / "paper_table.png")
    return {"summary": summary}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = None
    if args.smoke and args.out == bc.RESULTS_DIR:
        tmp = Path(tempfile.mkdtemp(prefix="paper_table_smoke_"))
        args.out = tmp
    bc.setup_torch(args)
    args.out.mkdir(parents=True, exist_ok=True)
    bc.write_run_info(args.out, "paper_table", args.device,
                      {"rows": args.rows, "seeds": args.seeds, "epochs": args.epochs, "image_size": args.image_size})
    if not args.report_only:
        bc.log(f"paper table: {len(args.rows)} rows x {args.seeds} seeds -> {args.out}")
        workers = bc.spawn_workers(args.workers, [*sys.argv[1:], "--out", str(args.out)], args.out) if args.workers > 1 else []
        run_all(args)
        bc.wait_workers(workers)
        run_all(args)  # anything a worker left unfinished (e.g. it was killed)
    out = report(args)
    if out is not None:
        print((args.out / "paper_table.md").read_text())
    if tmp is not None:
        print(f"smoke outputs in {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
