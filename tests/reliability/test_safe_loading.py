"""Safe loading: nothing rifle-hf reads can run code, nothing it writes leaks a token.

* every ``torch.load`` in rifle_hf/, recipes/, benchmarks/, scripts/ passes ``weights_only=True`` (AST scan),
  and no other unpickler, ``weights_only=False`` or hard-wired ``trust_remote_code=True`` appears;
* the recipes' outputs hold weights only as safetensors, and resuming from a checkpoint whose pickled
  files were replaced by a code-running pickle does not run that code;
* ``trust_remote_code`` stays off unless passed: a local model folder whose config points at custom code
  (``auto_map``) trains with the built-in class or is refused, and its code never runs;
* a Hub token passed on the command line appears in no log line and no output file.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("rifle_hf", "recipes", "benchmarks", "scripts")
SCRIPTS = {"timm": ROOT / "recipes" / "train_timm.py", "hf": ROOT / "recipes" / "train_hf.py"}
TOKENS = {"timm": "hf_FAKEtimmToken0123456789abcdef", "hf": "tok-NOThfprefix-0123456789-secret"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread before the module's fixtures train (an oversubscribed 2-thread torch is ~100x
    slower on these tiny models)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------- source scan
def _python_files() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py") if ".venv" not in p.parts)


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _unsafe_calls(tree: ast.AST) -> tuple[list[str], int]:
    """(problems, number of torch.load calls seen) in one module."""
    aliases = {"torch.load": "torch.load", "torch.serialization.load": "torch.load"}
    for node in ast.walk(tree):  # from torch import load [as x]; import pickle as p ...
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            aliases.update({a.asname or a.name: "torch.load" for a in node.names if a.name == "load"})
        if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "dill", "cloudpickle", "joblib", "_pickle"):
            aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
        if isinstance(node, ast.Import):
            aliases.update({f"{a.asname}.load": f"{a.name}.load" for a in node.names if a.asname})
            aliases.update({f"{a.asname}.loads": f"{a.name}.loads" for a in node.names if a.asname})
    problems, torch_loads = [], 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = aliases.get(_dotted(node.func), _dotted(node.func))
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        where = f"line {node.lineno}: {name}"
        if name == "torch.load":
            torch_loads += 1
            value = keywords.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                problems.append(f"{where} without weights_only=True")
        elif name.split(".")[0] in ("pickle", "_pickle", "dill", "cloudpickle", "joblib") and name.endswith(
            (".load", ".loads", ".Unpickler")
        ):
            problems.append(f"{where}: unpickles arbitrary objects")
        elif name in ("np.load", "numpy.load") and isinstance(keywords.get("allow_pickle"), ast.Constant) and (
            keywords["allow_pickle"].value
        ):
            problems.append(f"{where} with allow_pickle=True")
        elif name.endswith(("register_for_checkpointing", "load_custom_state")):
            problems.append(f"{where}: Accelerate unpickles custom checkpoint state with weights_only=False")
        for key in ("weights_only", "trust_remote_code"):
            value = keywords.get(key)
            expected_safe = key == "weights_only"
            if isinstance(value, ast.Constant) and value.value is (not expected_safe):
                problems.append(f"{where} with {key}={value.value}")
    return problems, torch_loads


def test_every_load_in_the_source_tree_is_safe():
    problems, torch_loads = [], 0
    for path in _python_files():
        found, n = _unsafe_calls(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        torch_loads += n
        problems += [f"{path.relative_to(ROOT)} {p}" for p in found]
    assert not problems, "\n".join(problems)
    assert torch_loads >= 3  # the scan does see the real calls (hf_training.py, pretrained.py)


def test_the_scan_catches_unsafe_code():
    bad = """
import pickle as pk
import torch as th
from torch import load as tl
th.load(f)
th.load(f, weights_only=False)
tl(f, map_location="cpu")
pk.loads(b)
AutoModel.from_pretrained(name, trust_remote_code=True)
accelerator.register_for_checkpointing(obj)
th.load(f, weights_only=True)
"""
    problems, n = _unsafe_calls(ast.parse(bad))
    assert n == 4 and len(problems) == 7, problems


# ------------------------------------------------------------------------------------------- recipe runs
def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RIFLE_", "ACCELERATE_"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("safe_loading")


@pytest.fixture(scope="module")
def dataset(workdir) -> Path:
    rng = np.random.default_rng(0)
    root = workdir / "data"
    for split, n in (("train", 8), ("test", 2)):
        for c, name in enumerate(("ant", "bee", "cat")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(50 + 70 * c, 25, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def _save_tiny_vit(path: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_vit
    from transformers import ViTImageProcessor

    tiny_vit(num_labels=2, image_size=16).save_pretrained(path)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vit_dir(workdir) -> Path:
    return _save_tiny_vit(workdir / "tiny-vit")


def recipe_args(recipe: str, dataset: Path, vit_dir: Path) -> list[str]:
    common = ["--dataset", str(dataset), "--seed", "0", "--rifle_num_reinits", "1"]
    if recipe == "timm":
        return [*common, "--model", "test_resnet", "--no-pretrained", "--image_size", "32", "--batch_size", "8",
                "--quiet", "--num_epochs", "2", "--checkpointing_steps", "2"]
    return [*common, "--model_name_or_path", str(vit_dir), "--per_device_train_batch_size", "8",
            "--num_train_epochs", "2", "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "20",
            "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def runs(workdir, dataset, vit_dir) -> dict[str, tuple[Path, str]]:
    """One real command-line run per recipe, with a Hub token (``--hub_token X`` for timm, ``--hub_token=X``
    for HF): ``{recipe: (output_dir, everything it printed)}``."""
    found = {}
    for recipe in ("timm", "hf"):
        out = workdir / f"{recipe}-run"
        token = ["--hub_token", TOKENS[recipe]] if recipe == "timm" else [f"--hub_token={TOKENS[recipe]}"]
        proc = subprocess.run(
            [sys.executable, str(SCRIPTS[recipe]), *recipe_args(recipe, dataset, vit_dir), "--output_dir", str(out),
             *token], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        found[recipe] = (out, proc.stdout + proc.stderr)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["timm", "hf"])
def test_hub_token_is_in_no_log_and_no_output_file(recipe, runs):
    out, printed = runs[recipe]
    token = TOKENS[recipe]
    assert token not in printed
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "README.md" for p in files) and any("checkpoint-" in str(p) for p in files)
    leaking = [str(p.relative_to(out)) for p in files if token.encode() in p.read_bytes()]
    assert not leaking, f"the Hub token is written in {leaking}"
    card = (out / "README.md").read_text()
    assert "<redacted>" in card  # the command line is in the card, the token hidden


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["timm", "hf"])
def test_outputs_hold_weights_only_as_safetensors(recipe, runs):
    from safetensors.torch import load_file

    out, _ = runs[recipe]
    final = [p for p in out.iterdir() if p.is_file()]
    assert len(load_file(str(out / "model.safetensors"))) > 0
    # The final folder (what --push_to_hub uploads): no pickle, except Trainer's own training_args.bin
    # (its arguments, no tensors; tested token-free above).
    pickles = [p for p in final if p.suffix in PICKLE_SUFFIXES]
    assert [p.name for p in pickles] == ([] if recipe == "timm" else ["training_args.bin"])
    assert all(b"_rebuild_tensor" not in p.read_bytes() for p in pickles)
    # Checkpoints: the model weights are safetensors; the rest is JSON or the optimizer / scheduler / RNG
    # state that Trainer and Accelerate load with weights_only=True (see the tampered-checkpoint test).
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert checkpoints
    for checkpoint in checkpoints:
        assert len(load_file(str(checkpoint / "model.safetensors"))) > 0
        assert not [p.name for p in checkpoint.iterdir() if p.name.startswith(("model", "pytorch_model"))
                    and p.suffix in PICKLE_SUFFIXES]


class _Payload:
    """Unpickling this runs code: it opens (creates) ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _recipe_main(recipe: str):
    if recipe == "timm":
        sys.path.insert(0, str(ROOT / "recipes"))
        import train_timm

        return train_timm.main
    spec = importlib.util.spec_from_file_location("train_hf_reliability", SCRIPTS["hf"])
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module.main


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["timm", "hf"])
def test_resume_never_runs_code_from_a_tampered_checkpoint(recipe, runs, dataset, vit_dir, tmp_path):
    """Each pickled file of a checkpoint in turn is replaced by a pickle that creates a file when
    unpickled; resuming from it may fail, but the file is never created."""
    out, _ = runs[recipe]
    source = out / "checkpoint-2"
    targets = sorted(p.name for p in source.iterdir() if p.suffix in PICKLE_SUFFIXES and p.name != "training_args.bin")
    assert targets  # optimizer / scheduler / RNG state
    control = tmp_path / "control"
    payload = pickle.dumps(_Payload(str(control / "ran")))
    control.mkdir()
    pickle.loads(payload)  # the payload does run when unpickled unsafely
    assert (control / "ran").exists()
    main = _recipe_main(recipe)
    refused = []
    for name in targets:
        run = tmp_path / f"resume-{name}"
        run.mkdir()
        shutil.copytree(source, run / "checkpoint-2")
        marker = tmp_path / f"ran-{name}"
        torch.save(_Payload(str(marker)), run / "checkpoint-2" / name)
        try:  # refusing the file is fine; running it is not
            main([*recipe_args(recipe, dataset, vit_dir), "--output_dir", str(run), "--resume_from_checkpoint", "latest"])
        except Exception as err:
            refused.append((name, "Weights only load failed" in str(err)))
        assert not marker.exists(), f"resuming ran code from {name}"
    # the resume did reach the tampered optimizer state, and torch's safe unpickler is what refused it
    assert [ok for name, ok in refused if name.startswith("optimizer")] == [True], refused


# ------------------------------------------------------------------------------------------- remote code
def _model_with_remote_code(path: Path, marker: Path, model_type: str | None = None) -> Path:
    """A local model folder whose config points (auto_map) at custom code that creates ``marker``."""
    _save_tiny_vit(path)
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig",
                          "AutoModelForImageClassification": "custom.CustomModel"}
    if model_type:
        config["model_type"] = model_type
    (path / "config.json").write_text(json.dumps(config))
    (path / "custom.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('custom code ran')\n"
        "from transformers import ViTConfig, ViTForImageClassification\n\n\n"
        "class CustomConfig(ViTConfig):\n"
        f"    model_type = {model_type or 'vit'!r}\n\n\n"
        "class CustomModel(ViTForImageClassification):\n"
        "    config_class = CustomConfig\n"
    )
    return path


@pytest.mark.slow
def test_remote_code_in_a_local_model_never_runs_without_the_flag(dataset, tmp_path, capsys):
    from rifle_hf.cli import one_line_errors

    main = _recipe_main("hf")
    marker = tmp_path / "custom-code-ran"
    fast = ["--dataset", str(dataset), "--per_device_train_batch_size", "8", "--max_steps", "1",
            "--eval_strategy", "no", "--save_strategy", "no", "--disable_tqdm", "true"]
    # A known architecture with an auto_map: transformers' own ViT class is used, the custom code ignored.
    known = _model_with_remote_code(tmp_path / "known", marker)
    result = main(["--model_name_or_path", str(known), "--output_dir", str(tmp_path / "out-known"), *fast])
    assert result["files"] and not marker.exists()
    config = json.loads((tmp_path / "out-known" / "config.json").read_text())
    assert config["architectures"] == ["ViTForImageClassification"]
    # An architecture only the custom code defines: refused with one line naming the flag.
    custom = _model_with_remote_code(tmp_path / "custom", marker, model_type="customnet")
    with pytest.raises(SystemExit):
        one_line_errors(main)(["--model_name_or_path", str(custom), "--output_dir", str(tmp_path / "out-custom"), *fast])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "trust_remote_code" in lines[0], lines
    assert not marker.exists() and not (tmp_path / "out-custom").exists()


@pytest.mark.slow
def test_remote_code_runs_only_with_the_flag(dataset, tmp_path):
    """The control for the test above: with --trust_remote_code true the same folder's code does run."""
    marker = tmp_path / "custom-code-ran"
    custom = _model_with_remote_code(tmp_path / "custom", marker, model_type="customnet")
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS["hf"]), "--model_name_or_path", str(custom), "--trust_remote_code", "true",
         "--dataset", str(dataset), "--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "8",
         "--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no", "--disable_tqdm", "true"],
        capture_output=True, text=True, env=_env(HF_MODULES_CACHE=str(tmp_path / "modules")), cwd=ROOT, timeout=600,
    )
    assert marker.exists(), proc.stderr[-3000:]
