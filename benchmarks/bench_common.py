"""Shared pieces of the benchmark scripts: the recipe entry point, data splits, statistics, output files.

Why a module of its own: every benchmark must measure exactly what users run, so all of them call the
recipes' ``main(argv)`` the same way, draw Fashion-MNIST few-shot splits the same way and write results
the same way (atomically, resumable, with the machine they ran on).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import importlib.util
import io
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
RECIPE_TIMM = ROOT / "recipes" / "train_timm.py"
RECIPE_HF = ROOT / "recipes" / "train_hf.py"
#: The recipes' offline default model (real ImageNet weights without the Hub).
MODEL = "tf_efficientnet_lite0"
HF_MODEL = "timm/tf_efficientnet_lite0.in1k"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ----------------------------------------------------------------------------------------------- CLI
def add_common_args(parser: argparse.ArgumentParser, default_out: Path) -> None:
    """Flags every benchmark takes: device, precision, compile, threads, output folder, smoke mode."""
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: bf16 autocast + channels_last (the GPU mode finishes in ~8 minutes)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (recipes: --compile)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (this machine has 2 cores)")
    parser.add_argument("--out", type=Path, default=default_out, help="results folder")
    parser.add_argument("--smoke", action="store_true",
                        help="a few steps on tiny data into a temporary folder: checks the script runs")


def setup_torch(args: argparse.Namespace) -> None:
    """Thread count and the CUDA check, once, before any model is built (``--device cpu`` hides GPUs)."""
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # Accelerate would otherwise pick a visible GPU
    import torch

    torch.set_num_threads(max(1, args.threads))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is visible; drop --device or use a GPU machine")


def precision_args(args: argparse.Namespace) -> list[str]:
    """Recipe flags for the benchmark's device: bf16 on GPU, fp32 on CPU; channels_last and compile."""
    out = ["--mixed_precision", "bf16" if args.device == "cuda" else "no", "--channels_last", "--quiet"]
    if args.compile:
        out.append("--compile")
    return out


# ------------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    """The CPU's marketing name (from /proc/cpuinfo, else the platform module)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, load, library versions, GPU if used."""
    import timm
    import torch
    import transformers

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_line(info: Mapping[str, Any]) -> str:
    """One human line describing the machine, for results files and the README."""
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    load = "/".join(str(x) for x in info["load_avg_1_5_15"])
    return (
        f"{info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads){gpu}; "
        f"torch {info['torch']}, timm {info['timm']}, transformers {info['transformers']}, "
        f"Python {info['python']}; load average {load} at {info['utc']}"
    )


def command_line() -> str:
    """The exact command that produced the results (relative script path, quoted args)."""
    script = Path(sys.argv[0])
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(ROOT)
    return " ".join(["python", shlex.quote(str(script)), *map(shlex.quote, sys.argv[1:])])


def write_run_info(out: Path, name: str, device: str, extra: Mapping[str, Any] | None = None) -> Path:
    """``<name>_machine.json``: the command, the machine line and the raw machine facts."""
    info = machine_info(device)
    payload = {"command": command_line(), "machine": machine_line(info), **info, **(extra or {})}
    return atomic_write_text(out / f"{name}_machine.json", json.dumps(payload, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------- files
def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file and a rename: a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def atomic_write_json(path: Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """CSV with a header; ``columns`` default to the keys of all rows in first-seen order."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), restval="", extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _fmt(v) for k, v in r.items()})
    return atomic_write_text(path, buf.getvalue())


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return " ".join(str(x) for x in v)
    return v


def save_figure(fig: Any, path: Path) -> Path:
    """Save a matplotlib ``Figure`` (no pyplot global state) as PNG, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------- statistics
def paired_bootstrap_ci(
    a: Sequence[float], b: Sequence[float], n_boot: int = 10000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired seeds and its percentile bootstrap CI (resampling seeds).

    Pairs are resampled jointly, so seed-to-seed variation shared by both arms cancels. With few seeds
    the percentile interval is too narrow rather than too wide; read it as a rough guide.
    """
    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_arr.shape != b_arr.shape or a_arr.ndim != 1 or len(a_arr) == 0:
        raise ValueError(f"paired_bootstrap_ci needs two equally long 1-D samples, got {a_arr.shape}, {b_arr.shape}")
    diff = a_arr - b_arr
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n_boot, len(diff)))
    means = diff[idx].mean(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(diff.mean()), float(lo), float(hi)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


# ---------------------------------------------------------------------------------------------- data
def prepare_fashion_mnist(
    out_dir: Path, per_class: int, seed: int, test_size: int | None, val_per_class: int
) -> Path:
    """A parquet folder (``train``/``validation``/``test``) for one seed; reused when already written.

    ``train``/``test`` are ``rifle_hf.fashion_mnist.few_shot_split(per_class, seed, test_size)``.
    ``validation`` (``val_per_class`` images per class) is drawn from the official training images that
    are NOT in ``train`` (full set), so the recipe does not carve it out of the few-shot training images
    and every method trains on exactly ``per_class`` images per class. Without the full set it is carved
    from the few-shot draw instead (the bundled subset has only 100 training images per class).
    """
    from rifle_hf import fashion_mnist as fm

    out_dir = Path(out_dir)
    marker = out_dir / "split.json"
    spec = {"per_class": per_class, "seed": seed, "test_size": test_size, "val_per_class": val_per_class}

    def ready() -> bool:
        return marker.is_file() and json.loads(marker.read_text()).get("spec") == spec

    if ready():
        return out_dir
    while not try_lock(out_dir):  # another worker is writing this split: wait for it
        time.sleep(2)
    try:
        if ready():
            return out_dir
        _write_split(fm, out_dir, per_class, seed, test_size, val_per_class, spec)
    finally:
        release_lock(out_dir)
    return out_dir


def _write_split(
    fm: Any, out_dir: Path, per_class: int, seed: int, test_size: int | None, val_per_class: int, spec: dict
) -> None:
    import shutil

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    source = "full" if fm.full_available() else "bundled"
    if source == "full":
        dd = fm.few_shot_split(per_class=per_class, seed=seed, test_size=test_size)
        val = _validation_from_rest(fm, per_class, seed, val_per_class)
        splits = {"train": dd["train"], "validation": val, "test": dd["test"]}
    else:  # bundled: 100 per class at most; validation carved from the draw
        n_val = min(val_per_class, max(0, fm.PER_CLASS - per_class))
        dd = fm.few_shot_split(per_class=min(per_class + n_val, fm.PER_CLASS), seed=seed, test_size=test_size)
        labels = np.asarray(dd["train"]["label"])
        val_idx = [i for c in range(len(fm.CLASS_NAMES)) for i in np.flatnonzero(labels == c)[:n_val]]
        train_idx = sorted(set(range(len(labels))) - set(val_idx))
        splits = {"train": dd["train"].select(train_idx), "test": dd["test"]}
        if val_idx:
            splits["validation"] = dd["train"].select(sorted(val_idx))
    for name, ds in splits.items():
        ds.to_parquet(str(tmp / f"{name}.parquet"))
    sizes = {name: ds.num_rows for name, ds in splits.items()}
    (tmp / "split.json").write_text(json.dumps({"spec": spec, "source": source, "rows": sizes}, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def _validation_from_rest(fm: Any, per_class: int, seed: int, val_per_class: int) -> Any:
    """``val_per_class`` images per class from the full training file, disjoint from the few-shot draw.

    Uses the same seeded hash ranking as ``few_shot_split``: the few-shot train images are the
    ``per_class`` best-ranked per class, validation the next ``val_per_class``.
    """
    from datasets import Dataset

    images = fm.read_idx(_idx_file(fm.FULL_DIR, "train-images-idx3-ubyte"))
    labels = fm.read_idx(_idx_file(fm.FULL_DIR, "train-labels-idx1-ubyte"))
    chosen: list[int] = []
    for c in range(len(fm.CLASS_NAMES)):
        pool = np.flatnonzero(labels == c).tolist()
        pool.sort(key=lambda i: fm._rank_key(seed, "train", i))  # the few_shot_split ranking
        chosen.extend(pool[per_class : per_class + val_per_class])
    chosen.sort()
    png = [{"bytes": _png_bytes(images[i]), "path": None} for i in chosen]
    return Dataset.from_dict({"image": png, "label": [int(labels[i]) for i in chosen]}, features=fm.features())


def _idx_file(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (Path(root) / name).is_file():
            return Path(root) / name
    raise FileNotFoundError(f"{stem}(.gz) missing under {root}; install dataset-fashion-mnist")


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# -------------------------------------------------------------------------------------------- recipes
def load_recipe_main(path: Path = RECIPE_TIMM) -> Callable[[Sequence[str]], Any]:
    """The recipe's ``main(argv)``, imported from its file, so benchmarks run exactly what users run."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist yet; the benchmarks run through the recipes")
    name = f"_bench_recipe_{path.stem}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    main = getattr(module, "main", None)
    if not callable(main):
        raise AttributeError(f"{path} has no main(argv) function")
    return main


def recipe_flags(path: Path = RECIPE_TIMM) -> str:
    """The recipe's ``--help`` text (to check which flags it offers)."""
    main = load_recipe_main(path)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        main(["--help"])
    return buf.getvalue()


def recipe_settings(argv: Sequence[str], path: Path = RECIPE_TIMM) -> dict[str, Any]:
    """The recipe's parsed arguments for ``argv`` without where the outputs go: two command lines that
    train exactly the same run give equal dicts (flag order, spelling and defaults do not matter)."""
    parse = load_recipe_main(path).__globals__["parse_args"]
    argv = list(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if "--output_dir" in argv:
            argv[argv.index("--output_dir") + 1] = tmp
        settings = vars(parse(argv))
    return {k: v for k, v in settings.items() if k not in ("output_dir", "quiet")}


def find_equivalent_record(argv: Sequence[str], record_dirs: Sequence[Path]) -> tuple[Path, dict[str, Any]] | None:
    """A finished record (another benchmark's) whose run had exactly these settings, so it is not redone."""
    wanted = recipe_settings(argv)
    for folder in record_dirs:
        for record_path in sorted(Path(folder).glob("*.json")):
            with contextlib.suppress(OSError, ValueError, KeyError, SystemExit):
                record = json.loads(record_path.read_text())
                if _record_settings(tuple(record["argv"])) == wanted:
                    return record_path, record
    return None


@functools.cache
def _record_settings(argv: tuple[str, ...]) -> dict[str, Any]:
    """`recipe_settings` of a finished record, parsed once per process (records never change)."""
    return recipe_settings(argv)


def _reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons; reset them so consecutive in-process runs are independent."""
    with contextlib.suppress(Exception):
        from accelerate.state import AcceleratorState, GradientState, PartialState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        PartialState._reset_state()


def run_recipe(argv: Sequence[str], path: Path = RECIPE_TIMM) -> float:
    """Run the recipe's ``main(argv)`` in this process; return its wall time. Raises if it fails."""
    import gc

    main = load_recipe_main(path)
    _reset_accelerate()
    start = time.perf_counter()
    try:
        main(list(argv))
    except SystemExit as exc:  # one_line_errors turns bad input into sys.exit(2)
        if exc.code not in (None, 0):
            raise RuntimeError(f"recipe exited with {exc.code}: {' '.join(argv)}") from exc
    wall = time.perf_counter() - start
    _reset_accelerate()
    gc.collect()
    return wall


def read_recipe_output(output_dir: Path) -> dict[str, Any]:
    """``all_results.json`` and the per-epoch history the recipe wrote into ``output_dir``."""
    output_dir = Path(output_dir)
    results_file = output_dir / "all_results.json"
    if not results_file.is_file():
        raise FileNotFoundError(f"{results_file} missing: the recipe did not finish")
    out: dict[str, Any] = {"results": json.loads(results_file.read_text())}
    for name in ("history.json", "train_history.json", "log_history.json"):
        if (output_dir / name).is_file():
            out["history"] = json.loads((output_dir / name).read_text())
            break
    else:
        for name in ("history.csv", "train_history.csv"):
            if (output_dir / name).is_file():
                with (output_dir / name).open() as f:
                    out["history"] = list(csv.DictReader(f))
                break
    return out


def find_metric(results: Mapping[str, Any], split: str, metric: str = "top1") -> float | None:
    """A metric from ``all_results.json`` whatever the prefix style (``test_top1``, ``eval/top1``...)."""
    candidates = [
        f"{split}_{metric}", f"{split}/{metric}", f"{split}_accuracy", f"eval_{split}_{metric}",
        f"{split}_top1_accuracy", f"final_{split}_{metric}",
    ]
    for key in candidates:
        if key in results and isinstance(results[key], (int, float)):
            return float(results[key])
    nested = results.get(split)
    if isinstance(nested, Mapping):
        for key in (metric, f"{metric}_accuracy", "accuracy"):
            if isinstance(nested.get(key), (int, float)):
                return float(nested[key])
    return None


@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """Silence a recipe's stdout (progress bars go to stderr and are kept in the log)."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cached_run(
    record_path: Path,
    argv: Sequence[str],
    output_dir: Path,
    meta: Mapping[str, Any],
    recipe: Path = RECIPE_TIMM,
    keep_outputs: bool = False,
    quiet_stdout: bool = True,
) -> dict[str, Any]:
    """Run the recipe once and record the outcome in ``record_path``; reuse the record if it exists.

    The record (JSON) holds ``meta``, the argv, wall time, test/validation top-1 and the recipe's
    history; it is written only after the run finished, so an interrupted run is simply redone. The
    recipe's own output folder is removed afterwards unless ``keep_outputs`` (model files are large).
    """
    import shutil

    record_path = Path(record_path)
    if record_path.is_file():
        return json.loads(record_path.read_text())
    output_dir = Path(output_dir)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with quiet(quiet_stdout):
        wall = run_recipe(argv, recipe)
    produced = read_recipe_output(output_dir)
    results = produced["results"]
    record = {
        **meta,
        "argv": list(argv),
        "wall_s": wall,
        "test_top1": find_metric(results, "test"),
        "val_top1": find_metric(results, "validation") or find_metric(results, "val")
        or find_metric(results, "eval"),
        "results": results,
        "history": produced.get("history"),
    }
    if record["test_top1"] is None:
        raise KeyError(f"no test top-1 in {output_dir / 'all_results.json'}: keys {sorted(results)}")
    atomic_write_json(record_path, record)
    if not keep_outputs:
        shutil.rmtree(output_dir, ignore_errors=True)
    return record


def try_lock(record_path: Path) -> bool:
    """Claim a run for this process (``<record>.lock`` holding our pid), so several worker processes
    can share one results folder; a lock left by a dead process is taken over."""
    lock = Path(str(record_path) + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid == os.getpid():
                return True
            alive = False
            if pid > 0:
                try:
                    os.kill(pid, 0)
                    alive = True
                except ProcessLookupError:
                    alive = False
                except PermissionError:
                    alive = True
            if alive:
                return False
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def release_lock(record_path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        Path(str(record_path) + ".lock").unlink()


def spawn_workers(n: int, argv: Sequence[str], log_dir: Path = RESULTS_DIR) -> list[Any]:
    """Start ``n - 1`` extra copies of the running script (``--workers 1``) that share the results folder
    through the per-run locks; the caller works too and then waits for them with `wait_workers`."""
    import subprocess

    procs = []
    clean = []
    skip = False
    for a in argv:  # drop any --workers N from the children's command line
        if skip:
            skip = False
            continue
        if a == "--workers":
            skip = True
            continue
        if not a.startswith("--workers="):
            clean.append(a)
    for i in range(1, n):
        log_path = Path(log_dir) / f"{Path(sys.argv[0]).stem}_worker{i}.log"
        with contextlib.suppress(OSError):
            log_path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(log_path, "a")  # noqa: SIM115 - handed to the child process
        procs.append(subprocess.Popen([sys.executable, sys.argv[0], *clean, "--workers", "1"],
                                      stdout=fh, stderr=subprocess.STDOUT))
        time.sleep(5)  # stagger start-up (imports, data preparation)
    return procs


def wait_workers(procs: Sequence[Any]) -> None:
    for p in procs:
        p.wait()
