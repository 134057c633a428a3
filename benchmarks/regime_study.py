"""When does RIFLE help? A sequential, one-factor-at-a-time study through ``recipes/train_timm.py``.

    python benchmarks/regime_study.py                          # everything (a few hours on 2 CPU cores)
    python benchmarks/regime_study.py --only R head_lr --max-runs 10   # in chunks; resumable
    python benchmarks/regime_study.py --device cuda            # GPU mode
    python benchmarks/regime_study.py --smoke                  # tiny data, temporary folder

Design (fixed before running). Settings are chosen on the VALIDATION split (50 images per class drawn
from the official training images outside the few-shot draw), never on the test set:

1. RIFLE's own settings, one at a time, starting from the reference defaults (R=3, cyclic head LR,
   optimizer-state reset on, no last-epochs guard), each stage keeping the best-so-far on validation:
   ``R`` in {1, 2, 3} -> ``head_lr`` in {cyclic, none} -> ``reset`` (optimizer state) on/off ->
   ``guard`` (no re-init in the last 2 of 12 epochs) off/on.
2. The regime, for vanilla and the chosen RIFLE alike, each factor moved alone from the base
   (64 px, 12 epochs, 100 images per class): ``image_size`` 96, ``epochs`` 24, ``per_class`` 10 / 1000.

Every configuration runs on the same paired seeds (split + init + order). A run the paper table already
made with exactly the same recipe settings (vanilla and RIFLE R=1..3 at the base regime) is taken from
``paper_table_runs/`` (the record says ``reused_from``) instead of being trained again. Reported: validation and
test top-1 per configuration, the test numbers of the chosen RIFLE next to the reference defaults' (paired
bootstrap CI), and RIFLE minus vanilla per regime. Outputs: ``regime_study.csv``, ``regime_study.md``,
``regime_study.png``; one JSON record per (configuration, seed) under ``regime_runs/``.
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

REFERENCE = {"R": 3, "head_lr": "cyclic", "reset": True, "guard": 0}
BASE_REGIME = {"image_size": 64, "epochs": 12, "per_class": 100}
RIFLE_STAGES: list[tuple[str, list[Any]]] = [
    ("R", [1, 2, 3]),
    ("head_lr", ["cyclic", "none"]),
    ("reset", [True, False]),
    ("guard", [0, 2]),
]
REGIME_STAGES: list[tuple[str, list[Any]]] = [("image_size", [96]), ("epochs", [24]), ("per_class", [10, 1000])]
FULL = {"seeds": 3, "test_size": 2000, "val_per_class": 50, "base": BASE_REGIME,
        "rifle_stages": RIFLE_STAGES, "regime_stages": REGIME_STAGES}
SMOKE = {"seeds": 1, "test_size": 20, "val_per_class": 2, "base": {"image_size": 32, "epochs": 4, "per_class": 2},
         "rifle_stages": [("R", [1, 2])], "regime_stages": [("per_class", [3])]}
STAGES = [s for s, _ in RIFLE_STAGES] + [s for s, _ in REGIME_STAGES]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    bc.add_common_args(p, bc.RESULTS_DIR)
    p.add_argument("--only", nargs="+", choices=STAGES, default=None, help="run only these stages (in order)")
    p.add_argument("--max-runs", dest="max_runs", type=int, default=None, help="stop after N new runs")
    p.add_argument("--seeds", type=int, default=None, help="paired seeds (default 3)")
    p.add_argument("--report_only", action="store_true")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel worker processes sharing the records (default: 1 on CPU, 4 on GPU)")
    args = p.parse_args(argv)
    args.cfg = SMOKE if args.smoke else FULL
    args.seeds = args.seeds or args.cfg["seeds"]
    if args.workers is None:
        args.workers = 4 if args.device == "cuda" else 1
    if args.workers < 1 or args.seeds < 1:
        p.error("--workers and --seeds must be >= 1")
    return args


# --------------------------------------------------------------------------------------- configs
def config_name(cfg: dict[str, Any]) -> str:
    regime = f"px{cfg['image_size']}_ep{cfg['epochs']}_pc{cfg['per_class']}"
    if cfg["R"] == 0:
        return f"vanilla_{regime}"
    return (f"rifle_R{cfg['R']}_{cfg['head_lr']}_{'reset' if cfg['reset'] else 'keep'}_g{cfg['guard']}_{regime}")


def recipe_argv(args: argparse.Namespace, cfg: dict[str, Any], seed: int, data_dir: Path, out: Path) -> list[str]:
    argv = [
        "--model", bc.MODEL, "--pretrained", "--dataset", str(data_dir), "--output_dir", str(out),
        "--seed", str(seed), "--num_epochs", str(cfg["epochs"]), "--eval_every", str(cfg["epochs"]), "--batch_size", "32", "--lr", "0.01",
        "--momentum", "0.9", "--weight_decay", "1e-4", "--image_size", str(cfg["image_size"]),
        *bc.precision_args(args),
    ]
    if cfg["R"] > 0:
        argv += ["--rifle_num_reinits", str(cfg["R"]), "--rifle_head_lr", cfg["head_lr"],
                 "--rifle_reset_optimizer_state" if cfg["reset"] else "--no-rifle_reset_optimizer_state",
                 "--rifle_no_reinit_in_last", str(cfg["guard"])]
    return argv


class Study:
    """Runs configurations (cached per seed) and makes the stage-wise choices on validation."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.runs_dir = args.out / "regime_runs"
        self.new_runs = 0
        self.rows: list[dict[str, Any]] = []  # every (stage, config, seed) looked at, for the CSV
        self.stop = False
        self.waiting = False  # some run is held by another worker process

    def records(self, cfg: dict[str, Any], run: bool) -> list[dict[str, Any]] | None:
        """All seeds' records of ``cfg``; runs missing ones when ``run`` (None if any are still missing)."""
        out, missing = [], False
        for seed in range(self.args.seeds):
            path = self.runs_dir / f"{config_name(cfg)}__seed{seed}.json"
            if not path.is_file():
                if not run or self.stop:
                    missing = True
                    continue
                if self.args.max_runs is not None and self.new_runs >= self.args.max_runs:
                    self.stop = missing = True
                    continue
                if not bc.try_lock(path):
                    self.waiting = missing = True  # another worker runs it
                    continue
                try:
                    if not self._reuse(cfg, seed, path):
                        self._run(cfg, seed, path)
                finally:
                    bc.release_lock(path)
            out.append(json.loads(path.read_text()))
        return None if missing else out

    def _argv(self, cfg: dict[str, Any], seed: int) -> tuple[list[str], Path]:
        c = self.args.cfg
        data = bc.prepare_fashion_mnist(
            self.args.out / "runs" / "data" / f"fmnist_pc{cfg['per_class']}_t{c['test_size']}_s{seed}",
            cfg["per_class"], seed, c["test_size"], c["val_per_class"])
        run_dir = self.args.out / "runs" / "regime" / f"{config_name(cfg)}__seed{seed}"
        return recipe_argv(self.args, cfg, seed, data, run_dir), run_dir

    def _reuse(self, cfg: dict[str, Any], seed: int, path: Path) -> bool:
        """Copy the paper table's record of a run with exactly these recipe settings (same data folder,
        seed and flags), e.g. vanilla and RIFLE R=1..3 at the base regime, instead of training it again."""
        found = bc.find_equivalent_record(self._argv(cfg, seed)[0], [self.args.out / "paper_table_runs"])
        if found is None:
            return False
        source, rec = found
        bc.atomic_write_json(path, {**rec, "config": cfg, "name": config_name(cfg), "seed": seed,
                                    "reused_from": str(source.relative_to(self.args.out))})
        bc.log(f"reuse {source.name} for {config_name(cfg)} seed {seed}")
        return True

    def _run(self, cfg: dict[str, Any], seed: int, path: Path) -> None:
        argv, run_dir = self._argv(cfg, seed)
        bc.log(f"run {config_name(cfg)} seed {seed}")
        rec = bc.cached_run(path, argv, run_dir, {"config": cfg, "name": config_name(cfg), "seed": seed})
        self.new_runs += 1
        bc.log(f"  val {rec['val_top1']}, test {rec['test_top1']:.4f}, {rec['wall_s']:.0f} s")

    def evaluate(self, stage: str, cfgs: list[dict[str, Any]], run: bool) -> dict[str, list[dict[str, Any]]]:
        found = {}
        for cfg in cfgs:
            recs = self.records(cfg, run)
            if recs is not None:
                found[config_name(cfg)] = recs
                for r in recs:
                    self.rows.append({"stage": stage, "name": config_name(cfg), "seed": r["seed"],
                                      "val_top1": r["val_top1"], "test_top1": r["test_top1"], "wall_s": r["wall_s"]})
        return found

    def choose(self, found: dict[str, list[dict[str, Any]]], cfgs: list[dict[str, Any]], current: dict[str, Any]
               ) -> tuple[dict[str, Any], bool]:
        """Best mean validation top-1 among candidates (ties: the current setting); False if incomplete."""
        if len(found) < len(cfgs):
            return current, False
        def score(cfg: dict[str, Any]) -> tuple[float, bool]:
            recs = found[config_name(cfg)]
            vals = [r["val_top1"] for r in recs]
            return (sum(vals) / len(vals), cfg == current)
        return max(cfgs, key=score), True


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Passes over the stages until nothing is left that this process can do (other workers' runs are
    waited for, so the stage-wise choices always see complete results)."""
    import time

    while True:
        res = run_pass(args)
        study = res["study"]
        if args.report_only or study.stop or not study.waiting:
            return res
        time.sleep(10)


def run_pass(args: argparse.Namespace) -> dict[str, Any]:
    study = Study(args)
    stages = args.only or STAGES
    base = dict(args.cfg["base"])
    chosen = {**REFERENCE, **base}
    log: list[dict[str, Any]] = []
    vanilla_base = {**chosen, "R": 0}
    study.evaluate("base", [vanilla_base], run=not args.report_only)
    for stage, values in args.cfg["rifle_stages"]:
        cfgs = [{**chosen, stage: v} for v in values]
        if chosen not in cfgs:
            cfgs.append(dict(chosen))
        found = study.evaluate(stage, cfgs, run=not args.report_only and stage in stages)
        new, complete = study.choose(found, cfgs, chosen)
        log.append({"stage": stage, "candidates": [config_name(c) for c in cfgs], "complete": complete,
                    "chosen": config_name(new), "value": new[stage]})
        chosen = new
    reference = {**REFERENCE, **base}
    settled = all(entry["complete"] for entry in log)  # later stages need the final RIFLE choice
    study.evaluate("reference", [reference, chosen], run=not args.report_only and settled)
    regimes = []
    for stage, values in args.cfg["regime_stages"]:
        for v in values:
            pair = [{**vanilla_base, stage: v}, {**chosen, stage: v}]
            found = study.evaluate(stage, pair, run=not args.report_only and settled and stage in stages)
            regimes.append({"stage": stage, "value": v, "found": found, "pair": pair})
    return {"study": study, "chosen": chosen, "reference": reference, "vanilla": vanilla_base, "log": log,
            "regimes": regimes}


# --------------------------------------------------------------------------------------- report
def _stats(recs: list[dict[str, Any]], key: str) -> str:
    vals = [r[key] for r in recs if r.get(key) is not None]
    if not vals:
        return "-"
    m, s = bc.mean_std(vals)
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def _load(args: argparse.Namespace, cfg: dict[str, Any]) -> list[dict[str, Any]] | None:
    recs = []
    for seed in range(args.seeds):
        path = args.out / "regime_runs" / f"{config_name(cfg)}__seed{seed}.json"
        if not path.is_file():
            return None
        recs.append(json.loads(path.read_text()))
    return recs


def _diff(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> str:
    d, lo, hi = bc.paired_bootstrap_ci([r[key] for r in a], [r[key] for r in b])
    return f"{100 * d:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"


def report(args: argparse.Namespace, res: dict[str, Any]) -> None:
    study: Study = res["study"]
    rows = study.rows
    if not rows:
        return
    seen = set()
    unique = []
    for r in rows:
        key = (r["stage"], r["name"], r["seed"])
        if key not in seen:
            seen.add(key)
            unique.append(r)
    bc.write_csv(args.out / "regime_study.csv", unique)
    lines = [
        "# RIFLE regime study (EfficientNet-Lite0, few-shot Fashion-MNIST)", "",
        f"Paired seeds: {args.seeds}. Top-1 in % (mean ± std over seeds). Settings chosen on VALIDATION "
        f"top-1 ({args.cfg['val_per_class']} images per class from the official training images outside the few-shot draw); test "
        "numbers are reported, never used to choose. Differences: paired, 95% bootstrap CI over seeds.", "",
        "## 1. RIFLE's settings, one at a time (starting from the reference defaults)", "",
        "| Stage | Configuration | Val top-1 | Test top-1 | Chosen |", "|---|---|---:|---:|---|",
    ]
    for entry in res["log"]:
        for name in entry["candidates"]:
            recs = [r for r in rows if r["name"] == name]
            by_seed = {r["seed"]: r for r in recs}
            mark = "**yes**" if name == entry["chosen"] and entry["complete"] else ""
            lines.append(f"| {entry['stage']} | {name} | {_stats(list(by_seed.values()), 'val_top1')} | "
                         f"{_stats(list(by_seed.values()), 'test_top1')} | {mark} |")
        if not entry["complete"]:
            lines.append(f"| {entry['stage']} | (incomplete: kept {entry['chosen']}) | | | |")
    ref, cho, van = (_load(args, res[k]) for k in ("reference", "chosen", "vanilla"))
    lines += ["", "## 2. Chosen RIFLE vs the reference defaults (test)", ""]
    if ref and cho and van:
        lines += [
            "| Configuration | Val top-1 | Test top-1 | Test − vanilla [95% CI] |", "|---|---:|---:|---:|",
            f"| vanilla | {_stats(van, 'val_top1')} | {_stats(van, 'test_top1')} | - |",
            f"| reference: {config_name(res['reference'])} | {_stats(ref, 'val_top1')} | {_stats(ref, 'test_top1')} "
            f"| {_diff(ref, van, 'test_top1')} |",
            f"| chosen: {config_name(res['chosen'])} | {_stats(cho, 'val_top1')} | {_stats(cho, 'test_top1')} "
            f"| {_diff(cho, van, 'test_top1')} |",
            "", f"Chosen minus reference (test): {_diff(cho, ref, 'test_top1')}",
        ]
    else:
        lines.append("(not finished yet)")
    lines += ["", "## 3. Regime: RIFLE (chosen) minus vanilla, one factor moved from the base", "",
              "| Factor | Vanilla test | RIFLE test | RIFLE − vanilla val [95% CI] | RIFLE − vanilla test [95% CI] |",
              "|---|---:|---:|---:|---:|"]
    base_pair = [_load(args, res["vanilla"]), _load(args, res["chosen"])]
    entries = [("base " + json.dumps(args.cfg["base"]), base_pair)]
    entries += [(f"{r['stage']}={r['value']}", [_load(args, c) for c in r["pair"]]) for r in res["regimes"]]
    for label, (v, c) in entries:
        if v and c:
            lines.append(f"| {label} | {_stats(v, 'test_top1')} | {_stats(c, 'test_top1')} | "
                         f"{_diff(c, v, 'val_top1')} | {_diff(c, v, 'test_top1')} |")
        else:
            lines.append(f"| {label} | (not finished) | | | |")
    lines += ["", f"Command: `{bc.command_line()}`", "", f"Machine: {bc.machine_line(bc.machine_info(args.device))}", ""]
    bc.atomic_write_text(args.out / "regime_study.md", "\n".join(lines))
    plot(unique, args.out / "regime_study.png")


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    from matplotlib.figure import Figure

    stages = list(dict.fromkeys(r["stage"] for r in rows))
    fig = Figure(figsize=(4 * max(1, len(stages)), 4.5), layout="constrained")
    axes = fig.subplots(1, max(1, len(stages)), squeeze=False)[0]
    for ax, stage in zip(axes, stages):
        names = list(dict.fromkeys(r["name"] for r in rows if r["stage"] == stage))
        for i, name in enumerate(names):
            for key, color, dx in (("val_top1", "tab:blue", -0.1), ("test_top1", "tab:red", 0.1)):
                vals = [100 * r[key] for r in rows if r["name"] == name and r["stage"] == stage and r[key] is not None]
                if vals:
                    ax.scatter([i + dx] * len(vals), vals, color=color, s=12,
                               label=key.split("_")[0] if i == 0 else None)
                    ax.hlines(sum(vals) / len(vals), i + dx - 0.15, i + dx + 0.15, color=color)
        ax.set_xticks(range(len(names)), [n.replace("_px", "\npx") for n in names], rotation=60, fontsize=6)
        ax.set_title(stage)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("top-1 (%)")
    axes[0].legend(fontsize=7)
    return bc.save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = None
    if args.smoke and args.out == bc.RESULTS_DIR:
        tmp = Path(tempfile.mkdtemp(prefix="regime_smoke_"))
        args.out = tmp
    bc.setup_torch(args)
    args.out.mkdir(parents=True, exist_ok=True)
    bc.write_run_info(args.out, "regime_study", args.device, {"seeds": args.seeds, "only": args.only})
    workers = []
    if args.workers > 1 and not args.report_only:
        workers = bc.spawn_workers(args.workers, [*sys.argv[1:], "--out", str(args.out)], args.out)
    res = run(args)
    bc.wait_workers(workers)
    if workers:
        res = run(args)
    report(args, res)
    if (args.out / "regime_study.md").is_file():
        print((args.out / "regime_study.md").read_text())
    if tmp is not None:
        print(f"smoke outputs in {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
