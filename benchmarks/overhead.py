"""What RIFLE and the recipes cost: callback overhead, re-init cost, recipe throughput and peak memory.

    python benchmarks/overhead.py                 # CPU (run it on an otherwise idle machine)
    python benchmarks/overhead.py --device cuda   # GPU: bf16 + channels_last
    python benchmarks/overhead.py --smoke         # tiny model, few steps, temporary folder

Measured in one run, written to ``<out>/overhead.csv`` / ``overhead.png`` / ``overhead_machine.json``:

1. ``transformers.Trainer`` step time with RIFLE (``RifleTrainer``, R=3 re-inits inside the measured
   window, cyclic head LR) against a plain ``Trainer``: same model, data and optimizer; arms run in
   ABBA order (plain, rifle, rifle, plain, ...) so that a drift over time cancels. Also the time spent
   inside ``RifleCallback`` itself per step (precise, unlike the end-to-end ratio on a shared CPU), and
   one ``reinit_head`` call against one training step.
2. Training images/s of ``recipes/train_timm.py`` and ``recipes/train_hf.py`` (each via its ``main``)
   against a bare PyTorch loop over pre-decoded tensors with the same model (EfficientNet-Lite0,
   64 px, batch 32, SGD, same precision, channels_last). Recipe throughput is the recipe's own
   train-phase figure (images / time inside the training epochs, augmentation and logging included;
   model loading, decoding, evaluation and saving excluded). Median of 3 fresh processes per kind.
3. Peak RSS of each of those, each measured in a fresh subprocess (``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bench_common as bc

FULL = {"steps": 80, "warmup": 5, "repeats": 4, "image_size": 64, "model": bc.MODEL,
        "epochs": 2, "bare_steps": 60, "reinit_calls": 50, "rounds": 3}
SMOKE = {"steps": 8, "warmup": 2, "repeats": 1, "image_size": 32, "model": bc.MODEL,
         "epochs": 2, "bare_steps": 6, "reinit_calls": 5, "rounds": 1}
BATCH = 32
NUM_CLASSES = 10


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bc.add_common_args(p, bc.RESULTS_DIR)
    p.add_argument("--only", nargs="+", choices=["trainer", "throughput"], default=["trainer", "throughput"])
    p.add_argument("--profile", action="store_true", help="also cProfile one recipe run (top functions to txt)")
    p.add_argument("--child", choices=["bare", "timm", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--child_out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child_data", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.cfg = SMOKE if args.smoke else FULL
    return args


# --------------------------------------------------------------------------------------------- data
def _raw_fashion_mnist() -> tuple[Any, Any]:
    """Fashion-MNIST training images (N, 28, 28) uint8 and labels, read straight from the Debian IDX
    files (no rifle_hf / datasets import, so the bare loop's memory is the bare minimum), else from the
    bundled subset."""
    import gzip

    import numpy as np

    root = Path("/usr/share/datasets/fashion-mnist")
    try:
        with gzip.open(root / "train-images-idx3-ubyte.gz") as f:
            images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
        with gzip.open(root / "train-labels-idx1-ubyte.gz") as f:
            labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
        return images[:4096], labels[:4096].astype(np.int64)
    except OSError:
        from rifle_hf import fashion_mnist as fm

        ds = fm.load_bundled()["train"]
        return np.stack([np.asarray(im, dtype=np.uint8) for im in ds["image"]]), np.asarray(ds["label"])


def tensor_data(n: int, image_size: int, seed: int = 0) -> tuple[Any, Any]:
    """Pre-decoded, normalized (n, 3, S, S) float images and labels (Fashion-MNIST, resized, gray->RGB)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    images, labels = _raw_fashion_mnist()
    idx = np.sort(np.random.default_rng(seed).choice(len(labels), size=min(n, len(labels)), replace=False))
    gray = torch.tensor(images[idx], dtype=torch.float32)
    x = F.interpolate(gray[:, None] / 255.0, size=(image_size, image_size), mode="bilinear", antialias=True)
    x = ((x - 0.45) / 0.225).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(labels[idx], dtype=torch.long)
    reps = -(-n // len(y))
    return x.repeat(reps, 1, 1, 1)[:n].contiguous(), y.repeat(reps)[:n].contiguous()


# ------------------------------------------------------------------------------------- 1. Trainer
def _trainer_parts(args: argparse.Namespace, tmp: Path) -> tuple[Any, Any, Any]:
    import torch
    from transformers import TrainerCallback, TrainingArguments

    cfg = args.cfg
    x, y = tensor_data(BATCH * 32, cfg["image_size"])

    class TensorDataset(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(y)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {"pixel_values": x[i], "labels": y[i]}

    class StepTimer(TrainerCallback):
        """Wall time between consecutive optimizer steps (data, forward, backward, update, callbacks)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self._last: float | None = None

        def on_step_end(self, *a: Any, **k: Any) -> None:
            if args.device == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            if self._last is not None:
                self.times.append(now - self._last)
            self._last = now

    def training_args(run: str) -> TrainingArguments:
        return TrainingArguments(
            output_dir=str(tmp / run), max_steps=cfg["steps"], per_device_train_batch_size=BATCH,
            learning_rate=0.01, optim="sgd", optim_args="momentum=0.9", weight_decay=1e-4,
            lr_scheduler_type="cosine", logging_steps=10, save_strategy="no", eval_strategy="no",
            report_to=[], disable_tqdm=True, dataloader_num_workers=0, use_cpu=args.device == "cpu",
            bf16=args.device == "cuda", torch_compile=args.compile, seed=0,
        )

    return TensorDataset(), StepTimer, training_args


def _hf_model(args: argparse.Namespace) -> Any:
    import torch

    from rifle_hf.pretrained import create_hf_timm_wrapper

    torch.manual_seed(0)
    model = create_hf_timm_wrapper(args.cfg["model"], num_labels=NUM_CLASSES, pretrained=False)
    return model.to(memory_format=torch.channels_last).train()


def measure_trainer(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Plain Trainer vs RifleTrainer step times (alternating arms), callback self-time, re-init cost."""
    import torch
    from transformers import Trainer

    from rifle_hf import RifleCallback, RifleConfig, RifleTrainer, reinit_head

    class TimedRifleCallback(RifleCallback):
        """RifleCallback that adds up the time spent in its own event handlers."""

        spent = 0.0

        def __getattribute__(self, name: str) -> Any:
            attr = super().__getattribute__(name)
            if name.startswith("on_") and callable(attr):
                def timed(*a: Any, **k: Any) -> Any:
                    start = time.perf_counter()
                    try:
                        return attr(*a, **k)
                    finally:
                        type(self).spent += time.perf_counter() - start
                return timed
            return attr

    cfg = args.cfg
    tmp = Path(tempfile.mkdtemp(prefix="overhead_trainer_"))
    dataset, StepTimer, training_args = _trainer_parts(args, tmp)
    medians: dict[str, list[float]] = {"plain": [], "rifle": []}
    callback_per_step: list[float] = []
    reinits: list[int] = []
    for rep in range(cfg["repeats"]):
        for arm in ("plain", "rifle") if rep % 2 == 0 else ("rifle", "plain"):  # ABBA: cancels linear drift
            timer = StepTimer()
            model = _hf_model(args)
            if arm == "plain":
                trainer = Trainer(model=model, args=training_args(f"{arm}{rep}"), train_dataset=dataset,
                                  callbacks=[timer])
            else:
                TimedRifleCallback.spent = 0.0
                rifle_cb = TimedRifleCallback(RifleConfig(num_reinits=3, unit="step", seed=0))
                trainer = RifleTrainer(model=model, args=training_args(f"{arm}{rep}"), train_dataset=dataset,
                                       callbacks=[timer, rifle_cb])
            trainer.train()
            steps = timer.times[cfg["warmup"]:]
            medians[arm].append(statistics.median(steps))
            if arm == "rifle":
                callback_per_step.append(TimedRifleCallback.spent / cfg["steps"])
                reinits.append(len(rifle_cb.history))
            bc.log(f"trainer {arm} rep {rep}: median step {1000 * medians[arm][-1]:.1f} ms")
            del trainer, model

    # One re-init vs one step, on the same model.
    model = _hf_model(args).to(args.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    reinit_times = []
    for _ in range(cfg["reinit_calls"]):
        start = time.perf_counter()
        reinit_head(model, optimizer=optimizer, generator=gen)
        if args.device == "cuda":
            torch.cuda.synchronize()
        reinit_times.append(time.perf_counter() - start)
    plain = statistics.median(medians["plain"])
    rifle = statistics.median(medians["rifle"])
    paired = [r / p - 1.0 for p, r in zip(medians["plain"], medians["rifle"])]
    cb = statistics.median(callback_per_step)
    reinit = statistics.median(reinit_times)
    return [
        {"metric": "trainer_step_plain", "value": plain, "unit": "s/step", "note": "median over steps and repeats"},
        {"metric": "trainer_step_rifle", "value": rifle, "unit": "s/step",
         "note": f"RifleTrainer, R=3 (unit=step; {min(reinits)} re-inits in the window), cyclic head LR"},
        {"metric": "trainer_overhead_end_to_end", "value": rifle / plain - 1.0, "unit": "ratio-1",
         "note": f"per repeat: {' '.join(f'{x:+.4f}' for x in paired)} (noisy on a shared CPU)"},
        {"metric": "rifle_callback_time_per_step", "value": cb, "unit": "s/step",
         "note": "time inside RifleCallback's event handlers, re-inits included"},
        {"metric": "rifle_callback_overhead", "value": cb / plain, "unit": "ratio",
         "note": "callback time / plain step time (goal <= 0.005)"},
        {"metric": "reinit_head_time", "value": reinit, "unit": "s/call",
         "note": "reinit_head(model, optimizer) median"},
        {"metric": "reinit_vs_step", "value": reinit / plain, "unit": "ratio", "note": "one re-init / one plain step"},
    ]


# ----------------------------------------------------------------------------------- 2/3. children
def child_bare(args: argparse.Namespace) -> dict[str, Any]:
    """Bare PyTorch loop over pre-decoded tensors: the speed limit for this model, batch and precision."""
    import timm
    import torch
    import torch.nn.functional as F

    cfg = args.cfg
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(cfg["model"], num_classes=NUM_CLASSES).to(device, memory_format=torch.channels_last)
    if args.compile:
        model = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x, y = tensor_data(1024, cfg["image_size"])
    x, y = x.to(device).contiguous(memory_format=torch.channels_last), y.to(device)
    model.train()
    times = []
    step = 0
    while step < cfg["bare_steps"]:
        perm = torch.randperm(len(y), device=device)
        for i in range(0, len(y) - BATCH + 1, BATCH):
            start = time.perf_counter()
            idx = perm[i : i + BATCH]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.device == "cuda"):
                loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            step += 1
            if step >= cfg["bare_steps"]:
                break
    steady = times[cfg["warmup"]:]
    return {"img_per_s": BATCH * len(steady) / sum(steady), "steps": len(steady)}


def _recipe_argv(args: argparse.Namespace, kind: str, epochs: int, out: Path) -> list[str]:
    """Paper-table settings (SGD 0.9, lr 0.01, wd 1e-4, batch 32, cosine); evaluation only at the end."""
    cfg = args.cfg
    if kind == "timm":
        return ["--model", cfg["model"], "--pretrained", "--dataset", str(args.child_data), "--output_dir", str(out),
                "--num_epochs", str(epochs), "--eval_every", str(epochs), "--batch_size", str(BATCH), "--lr", "0.01",
                "--momentum", "0.9", "--weight_decay", "1e-4", "--image_size", str(cfg["image_size"]),
                "--seed", "0", *bc.precision_args(args)]
    argv = ["--model_name_or_path", f"timm/{cfg['model']}.in1k", "--dataset", str(args.child_data),
            "--output_dir", str(out), "--num_train_epochs", str(epochs), "--per_device_train_batch_size", str(BATCH),
            "--learning_rate", "0.01", "--optim", "sgd", "--optim_args", "momentum=0.9", "--weight_decay", "1e-4",
            "--lr_scheduler_type", "cosine", "--image_size", str(cfg["image_size"]), "--seed", "0",
            "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
            "--dataloader_num_workers", "0", "--mixed_precision", "bf16" if args.device == "cuda" else "no"]
    if args.device == "cpu":
        argv += ["--use_cpu", "true"]
    if args.compile:
        argv += ["--torch_compile", "true"]
    return argv


def child_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """Recipe throughput: the recipe's own train-phase images/s (``all_results.json``). (A cross-check
    from the wall-time difference of a 1- and a 2-epoch run was dropped: on this CPU the difference of
    two ~20 s runs swung by 2-8x.)"""
    recipe = bc.RECIPE_TIMM if args.child == "timm" else bc.RECIPE_HF
    cfg = args.cfg
    tmp = Path(tempfile.mkdtemp(prefix=f"overhead_{args.child}_"))
    argv = _recipe_argv(args, args.child, cfg["epochs"], tmp / "run")
    with bc.quiet():
        wall = bc.run_recipe(argv, recipe)
    if args.profile:  # an extra run under cProfile (not used for the timings): where does the time go?
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        with bc.quiet():
            bc.run_recipe(_recipe_argv(args, args.child, 1, tmp / "profiled"), recipe)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(30)
        bc.atomic_write_text(args.child_out.with_suffix(".profile.txt"), buf.getvalue())
    final = json.loads((tmp / "run" / "all_results.json").read_text())
    reported = final.get("train_samples_per_s") or final.get("train_samples_per_second")
    if reported is None:
        raise KeyError(f"{args.child} recipe reports no train images/s in all_results.json: {sorted(final)}")
    out: dict[str, Any] = {"img_per_s": float(reported), "wall_s": wall, "argv": argv}
    return out


def peak_rss_mb() -> float:
    """Peak RSS of this process image in MB: ``VmHWM`` (``ru_maxrss`` would include the parent's RSS
    at fork, which Linux folds in at exec)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_child(args: argparse.Namespace) -> int:
    bc.setup_torch(args)
    out = child_bare(args) if args.child == "bare" else child_recipe(args)
    out["maxrss_mb"] = peak_rss_mb()
    bc.atomic_write_json(args.child_out, out)
    return 0


def _throughput_child(args: argparse.Namespace, kind: str, data: Path, out: Path) -> dict[str, Any] | None:
    """One measurement in a fresh process (so peak RSS is its own)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--child_out", str(out),
           "--child_data", str(data), "--device", args.device, "--threads", str(args.threads)]
    cmd += ["--smoke"] if args.smoke else []
    cmd += ["--compile"] if args.compile else []
    cmd += ["--profile"] if args.profile and kind != "bare" else []
    bc.log(f"throughput child {kind}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        bc.log(f"child {kind} failed:\n{proc.stderr[-3000:]}")
        return None
    res = json.loads(out.read_text())
    prof = out.with_suffix(".profile.txt")
    if prof.is_file():
        bc.atomic_write_text(args.out / f"overhead_profile_{kind}.txt", prof.read_text())
    bc.log(f"  {kind}: {res['img_per_s']:.1f} img/s, peak RSS {res['maxrss_mb']:.0f} MB")
    return res


def _median_result(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median throughput over rounds (single runs of ~10 s swing by +-10% on this CPU); peak RSS: the max."""
    out = {"img_per_s": statistics.median(r["img_per_s"] for r in runs), "maxrss_mb": max(r["maxrss_mb"] for r in runs),
           "all_img_per_s": [round(r["img_per_s"], 1) for r in runs]}
    return out


def measure_throughput(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Spawn one fresh process per measurement (bare loop, timm recipe, HF recipe)."""
    cfg = args.cfg
    data = args.out / "runs" / "overhead_data"
    if args.smoke:
        data = bc.prepare_fashion_mnist(data, per_class=4, seed=0, test_size=20, val_per_class=2)
    else:
        data = bc.prepare_fashion_mnist(data, per_class=100, seed=0, test_size=200, val_per_class=10)
    runs: dict[str, list[dict[str, Any]]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="overhead_children_"))
    kinds = [k for k in ("bare", "timm", "hf")
             if k == "bare" or (bc.RECIPE_TIMM if k == "timm" else bc.RECIPE_HF).is_file()]
    for round_index in range(cfg["rounds"]):  # rotate the order each round so that no kind always runs first
        shift = round_index % len(kinds)
        for kind in kinds[shift:] + kinds[:shift]:
            res = _throughput_child(args, kind, data, tmp / f"{kind}{round_index}.json")
            if res is not None:
                runs.setdefault(kind, []).append(res)
    results = {kind: _median_result(rs) for kind, rs in runs.items()}
    rows: list[dict[str, Any]] = []
    label = f"{cfg['model']}, {cfg['image_size']} px, batch {BATCH}, SGD, channels_last, {args.device}"
    for kind, res in results.items():
        how = "steady-state steps" if kind == "bare" else "the recipe's own train-phase figure (all_results.json)"
        how += f"; median of {len(res['all_img_per_s'])} fresh processes: {res['all_img_per_s']}"
        rows.append({"metric": f"img_per_s_{kind}", "value": res["img_per_s"], "unit": "img/s", "note": f"{label}; {how}"})
        rows.append({"metric": f"peak_rss_{kind}", "value": res["maxrss_mb"], "unit": "MB",
                     "note": "VmHWM of a fresh process"})
    if "bare" in results:
        for kind in ("timm", "hf"):
            if kind in results:
                rows.append({"metric": f"recipe_{kind}_vs_bare", "value": results[kind]["img_per_s"]
                             / results["bare"]["img_per_s"], "unit": "ratio", "note": "goal >= 0.9"})
                rows.append({"metric": f"rss_{kind}_vs_bare", "value": results[kind]["maxrss_mb"]
                             / results["bare"]["maxrss_mb"], "unit": "ratio", "note": ""})
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    from matplotlib.figure import Figure

    values = {r["metric"]: r["value"] for r in rows}
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    steps = [(k, values[f"trainer_step_{k}"]) for k in ("plain", "rifle") if f"trainer_step_{k}" in values]
    if steps:
        ax1.bar([k for k, _ in steps], [1000 * v for _, v in steps], color=["tab:gray", "tab:red"][: len(steps)])
        ax1.set_ylabel("ms per optimizer step (median)")
        ax1.set_title(f"Trainer vs RifleTrainer (callback {100 * values.get('rifle_callback_overhead', 0):.2f}%)")
    tp = [(k, values[f"img_per_s_{k}"]) for k in ("bare", "timm", "hf") if f"img_per_s_{k}" in values]
    if tp:
        ax2.bar([k for k, _ in tp], [v for _, v in tp], color=["tab:gray", "tab:blue", "tab:orange"][: len(tp)])
        ax2.set_ylabel("training images / s")
        ax2.set_title("recipes vs bare PyTorch loop")
    return bc.save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    tmp = None
    if args.smoke and args.out == bc.RESULTS_DIR:
        tmp = Path(tempfile.mkdtemp(prefix="overhead_smoke_"))
        args.out = tmp
    bc.setup_torch(args)
    args.out.mkdir(parents=True, exist_ok=True)
    uptime = ""
    with contextlib.suppress(OSError):
        uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    bc.write_run_info(args.out, "overhead", args.device, {"uptime_before": uptime, "config": args.cfg})
    rows: list[dict[str, Any]] = []
    if "trainer" in args.only:
        rows += measure_trainer(args)
        bc.write_csv(args.out / "overhead.csv", rows, ["metric", "value", "unit", "note"])  # partial, kept if killed
    if "throughput" in args.only:
        rows += measure_throughput(args)
    with contextlib.suppress(OSError):
        uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        rows.append({"metric": "load_after", "value": os.getloadavg()[0], "unit": "load1", "note": uptime})
    bc.write_csv(args.out / "overhead.csv", rows, ["metric", "value", "unit", "note"])
    plot(rows, args.out / "overhead.png")
    for r in rows:
        print(f"{r['metric']:32s} {r['value']:12.5g} {r['unit']:8s} {r['note']}")
    if tmp is not None:
        print(f"smoke outputs in {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
