"""Bad input to either recipe is answered with one ``error:`` line that names the fix (no traceback), a
non-zero exit, and nothing half-written. Cases tests/test_recipe_{timm,hf}.py already cover (unknown
model, Hub dataset offline, missing/ambiguous columns, corrupt images with --strict, too many re-inits,
a class without training images, ...) are not repeated here.

Most cases call the recipe's ``main`` through `rifle_hf.cli.one_line_errors`, exactly what the script's
``__main__`` runs; a Hub that cannot be reached (set through the environment) runs the real command
line in a subprocess.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {"timm": ROOT / "recipes" / "train_timm.py", "hf": ROOT / "recipes" / "train_hf.py"}
TOKEN = "hf_FAKEbadinput0123456789abcdefXYZ"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread, set before the module's fixtures train anything: bitwise comparisons need every run
    to use the same thread count, and an oversubscribed 2-thread torch is ~100x slower on tiny models."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------- data
def _png(path: Path, rng: np.random.Generator, cls: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(rng.normal(50 + 70 * cls, 25, (20, 20, 3)), 0, 255).astype(np.uint8)).save(path)


def _folder(root: Path, classes=("ant", "bee", "cat"), n_train: int = 6, n_test: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(classes):
            for i in range(n):
                _png(root / split / name / f"{i}.png", rng, c)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_input")
    good = _folder(root / "good")
    one_class = _folder(root / "one_class", classes=("ant",))
    empty = root / "empty"
    for name in ("ant", "bee"):
        (empty / "train" / name).mkdir(parents=True)
    all_corrupt = root / "all_corrupt"
    for name in ("ant", "bee"):
        for i in range(3):
            (all_corrupt / "train" / name).mkdir(parents=True, exist_ok=True)
            (all_corrupt / "train" / name / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_vit
    from transformers import ViTImageProcessor

    vit = root / "tiny-vit"
    tiny_vit(num_labels=2, image_size=16).save_pretrained(vit)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(vit)
    return {"good": good, "one_class": one_class, "empty": empty, "all_corrupt": all_corrupt, "vit": vit}


# ------------------------------------------------------------------------------------------- recipes
@pytest.fixture(scope="module")
def recipes():
    sys.path.insert(0, str(ROOT / "recipes"))
    import train_timm

    spec = importlib.util.spec_from_file_location("train_hf_reliability", SCRIPTS["hf"])
    train_hf = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = train_hf  # dataclasses need the module registered
    spec.loader.exec_module(train_hf)
    return {"timm": train_timm.main, "hf": train_hf.main}


def base_args(recipe: str, data: dict[str, Path], dataset: str = "good") -> list[str]:
    if recipe == "timm":
        return ["--model", "test_resnet", "--no-pretrained", "--image_size", "32", "--batch_size", "8", "--quiet",
                "--num_epochs", "3", "--dataset", str(data[dataset])]
    return ["--model_name_or_path", str(data["vit"]), "--per_device_train_batch_size", "8", "--disable_tqdm", "true",
            "--num_train_epochs", "3", "--dataset", str(data[dataset])]


HEAD_NOT_CLASSIFIER = {"timm": "layer4.0.conv2", "hf": "vit.embeddings.patch_embeddings.projection"}

# case -> (recipes it applies to, extra argv, dataset, words the error line must contain)
CASES = {
    "head not found": (["timm"], ["--rifle_num_reinits", "1", "--rifle_head", "no.such.layer"], "good",
                       ["no.such.layer", "named_modules"]),
    "head is not the classifier": (["timm", "hf"], ["--rifle_num_reinits", "1", "--rifle_head", "{head}"], "good",
                                   ["{head}", "3 classes"]),
    "reinit_at past the end (epochs)": (["timm", "hf"], ["--rifle_reinit_at", "3"], "good", ["reinit_at", "below"]),
    "reinit_at past the end (steps)": (["timm", "hf"], ["--rifle_unit", "step", "--rifle_reinit_at", "500"], "good",
                                       ["reinit_at", "below"]),
    "empty dataset": (["timm", "hf"], [], "empty", ["no images", "--dataset"]),
    "one class": (["timm", "hf"], [], "one_class", ["only class 'ant'", ">= 2 classes"]),
    "every image corrupt": (["timm", "hf"], [], "all_corrupt", ["no readable training images", "check"]),
    "output dir under a file": (["timm", "hf"], ["--output_dir", "/dev/null/rifle_out"], "good",
                                ["--output_dir", "writable"]),
    "output dir on a read-only file system": (["timm", "hf"], ["--output_dir", "/proc/rifle_out"], "good",
                                              ["--output_dir", "writable"]),
}
PENDING: dict = {}
PARAMS = [
    pytest.param(case, recipe, id=f"{recipe}: {case}", marks=PENDING.get((case, recipe), ()))
    for case, (applies, *_) in CASES.items()
    for recipe in applies
]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize(("case", "recipe"), PARAMS)
def test_bad_input_is_one_line_naming_the_fix(case, recipe, recipes, data, tmp_path, capsys):
    from rifle_hf.cli import one_line_errors

    _, extra, dataset, words = CASES[case]
    fill = {"head": HEAD_NOT_CLASSIFIER[recipe]}
    extra = [a.format(**fill) for a in extra]
    words = [w.format(**fill) for w in words]
    out = tmp_path / "out"
    argv = [*base_args(recipe, data, dataset), "--output_dir", str(out), *extra]
    with pytest.raises(SystemExit) as exc:
        one_line_errors(recipes[recipe])(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1, err[-3000:]
    assert all(w in lines[0] for w in words), lines[0]
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written


# ------------------------------------------------------------------------------------------- command line
def run_cli(recipe: str, args: list[str], **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("RIFLE_", "ACCELERATE_"))}
    full_env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
                    TOKENIZERS_PARALLELISM="false")
    full_env.update(env)
    return subprocess.run([sys.executable, str(SCRIPTS[recipe]), *args], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["hf", "timm"])
def test_cli_push_to_unreachable_hub_is_one_line_and_loses_nothing(recipe, data, tmp_path):
    """The Hub is switched on but cannot be reached: one line naming the repo and the fix, the token never
    printed, and either nothing written (refused up front) or the finished outputs kept (push failed at the
    end), never a run whose results were deleted."""
    out = tmp_path / "out"
    args = [*base_args(recipe, data), "--num_train_epochs" if recipe == "hf" else "--num_epochs", "1",
            "--output_dir", str(out), "--push_to_hub", "--hub_model_id", "someone/rifle-test", "--hub_token", TOKEN]
    proc = run_cli(recipe, args, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "someone/rifle-test" in lines[0], proc.stderr[-2000:]
    assert "output_dir" in lines[0]  # the fix: upload the folder later / drop --push_to_hub
    assert TOKEN not in proc.stdout + proc.stderr
    assert not out.exists() or (out / "model.safetensors").is_file()
