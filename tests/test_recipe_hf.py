"""recipes/train_hf.py (transformers.Trainer + RIFLE) end to end, and the pieces in rifle_hf/hf_training.py.

Real tiny models (ViT / ConvNeXt configs saved with save_pretrained), real PNG folders and parquet files in
tmp dirs, real subprocess runs of the script; the rest calls ``main(argv)`` in-process (same code path, no
interpreter start-up). Everything runs single-threaded: the CI box's cores are shared, and an oversubscribed
2-thread torch is ~100x slower on these tiny models.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_convnext, tiny_vit
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "recipes" / "train_hf.py"
CLASSES = ("ant", "bee", "cat")
FRUITS = ("apple", "fig", "pear", "plum")
FAST = ["--disable_tqdm", "true", "--per_device_train_batch_size", "8", "--seed", "0"]


# ------------------------------------------------------------------------------------------------ helpers
def load_recipe():
    spec = importlib.util.spec_from_file_location("train_hf_recipe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


def run_script(args: list[str], *, launcher: list[str] | None = None, env: dict | None = None, timeout: int = 300):
    full_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    cmd = [*(launcher or [sys.executable]), str(SCRIPT), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=timeout)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def image(rng: np.random.Generator, cls: int, gray: bool) -> Image.Image:
    """20x20 image whose class shows in its brightness (learnable), with noise."""
    pixels = np.clip(rng.normal(50 + 70 * cls, 25, (20, 20, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    return img.convert("L") if gray else img


def losses_and_lrs(output_dir: Path) -> tuple[list[float], list[float]]:
    logs = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    train = [e for e in logs if "loss" in e]
    return [e["loss"] for e in train], [e["learning_rate"] for e in train]


def accuracy_from_saved(output_dir: Path, dataset: Path, seed: int = 0) -> dict[str, float]:
    """Top-1 of the saved folder, loaded with plain transformers, on the run's validation/test splits."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from rifle_hf.data import BatchTransform, PreprocessConfig, load_image_dataset, make_image_dataset

    model = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    cfg = PreprocessConfig.from_hf(AutoImageProcessor.from_pretrained(output_dir))
    splits, info = load_image_dataset(dataset, seed=seed)
    out = {}
    for split in ("validation", "test"):
        if split in splits:
            data = make_image_dataset(splits[split], info, cfg)
            with torch.no_grad():
                logits = model(pixel_values=BatchTransform(cfg)(data.images)).logits
            out[split] = float((logits.argmax(-1) == data.labels).float().mean())
    return out


def same_tensors(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    ta, tb = load_file(a), load_file(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def recipe():
    return load_recipe()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf_recipe_data")


@pytest.fixture(scope="module")
def folder_dataset(data_root) -> Path:
    """root/{train,test}/<class>/*.png, 3 classes, every third image grayscale."""
    rng = np.random.default_rng(0)
    root = data_root / "folder"
    for split, n in (("train", 10), ("test", 4)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                image(rng, c, gray=i % 3 == 0).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def parquet_dataset(data_root) -> Path:
    """One parquet file (train only), string labels, columns image/label."""
    import datasets

    rng = np.random.default_rng(1)
    names = [FRUITS[i % 4] for i in range(32)]
    ds = datasets.Dataset.from_dict(
        {"image": [image(rng, FRUITS.index(n) % 3, gray=i % 4 == 0) for i, n in enumerate(names)], "label": names},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")}),
    )
    path = data_root / "fruits.parquet"
    ds.to_parquet(str(path))
    return path


@pytest.fixture(scope="module")
def vit_dir(data_root) -> Path:
    from transformers import ViTImageProcessor

    path = data_root / "tiny-vit"
    tiny_vit(num_labels=2, image_size=16).save_pretrained(path)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def convnext_dir(data_root) -> Path:
    from transformers import ConvNextImageProcessor

    path = data_root / "tiny-convnext"
    tiny_convnext(num_labels=2).save_pretrained(path)
    ConvNextImageProcessor(size={"shortest_edge": 16}).save_pretrained(path)
    return path


def _e2e_args(model: Path, dataset: Path, output_dir: Path) -> list[str]:
    # 4 epochs, R=1: the re-init lands at the end of epoch 2; every epoch is checkpointed and kept.
    return [
        "--model_name_or_path", str(model), "--dataset", str(dataset), "--output_dir", str(output_dir),
        "--num_train_epochs", "4", "--rifle_num_reinits", "1", "--save_total_limit", "5", *FAST,
    ]


@pytest.fixture(scope="module")
def vit_run(vit_dir, folder_dataset, data_root):
    out = data_root / "vit-run"
    args = _e2e_args(vit_dir, folder_dataset, out)
    return run_script(args), out, args


@pytest.fixture(scope="module")
def convnext_run(convnext_dir, parquet_dataset, data_root):
    out = data_root / "convnext-run"
    args = _e2e_args(convnext_dir, parquet_dataset, out)
    return run_script(args), out, args


def check_e2e(proc, out: Path, dataset: Path, labels: tuple[str, ...]) -> dict:
    from transformers import AutoConfig

    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    per_epoch = results["updates_per_epoch"]
    # RIFLE: one re-init, at the end of epoch 2, recorded in the per-epoch history and Trainer's log.
    assert results["reinit_steps"] == [2 * per_epoch]
    assert results["num_updates"] == 4 * per_epoch
    history = json.loads((out / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1.0, 2.0, 3.0, 4.0]
    assert [row["reinit_steps"] for row in history] == [[], [2 * per_epoch], [], []]
    assert all(row["validation_top1"] is not None and row["train_loss"] is not None for row in history)
    log = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in log if "rifle/reinit" in e] == [2 * per_epoch]
    # Cyclic head LR: its cosine restarts at the re-init, so it is back at the full 0.01 right after it.
    assert [row["head_lr"] for row in history] == pytest.approx([0.005, 0.01, 0.005, 0.0], abs=1e-9)
    # Saved with plain transformers names: loads back, labels in the config, same accuracy as reported.
    config = AutoConfig.from_pretrained(out)
    assert config.id2label == dict(enumerate(labels))
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    accuracy = accuracy_from_saved(out, dataset)
    assert accuracy["validation"] == pytest.approx(results["validation_top1"])
    if "test" in accuracy:
        assert accuracy["test"] == pytest.approx(results["test_top1"])
    # Atomic checkpoints: all complete, no staging folders left.
    from rifle_hf.hf_training import checkpoint_problems

    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in checkpoints] == [f"checkpoint-{k * per_epoch}" for k in (1, 2, 3, 4)]
    assert all(not checkpoint_problems(p) for p in checkpoints)
    assert not list(out.glob("*.tmp"))
    return results


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_vit_image_folder_end_to_end(vit_run, folder_dataset):
    proc, out, _ = vit_run
    results = check_e2e(proc, out, folder_dataset, CLASSES)
    assert results["eval_split"] == "test"
    card = (out / "README.md").read_text()
    assert "RIFLE" in card and "recipes/train_hf.py" in card and "ant" in card
    # the card's "How to use" snippet classifies an image with a plain transformers pipeline
    snippet = card.split("## How to use")[1].split("```python")[1].split("```")[0]
    image = next((folder_dataset / "test").rglob("*.png"))
    namespace: dict = {}
    exec(snippet.replace("path/to/this/folder", str(out)).replace("image.jpg", str(image)), namespace)
    assert {p["label"] for p in namespace["classifier"](str(image), top_k=3)} == set(CLASSES)


@pytest.mark.slow
def test_convnext_parquet_string_labels_end_to_end(convnext_run, parquet_dataset):
    proc, out, _ = convnext_run
    results = check_e2e(proc, out, parquet_dataset, FRUITS)
    assert results["eval_split"] == "validation"  # a single parquet file: validation carved from train


@pytest.mark.slow
@pytest.mark.parametrize("which", ["vit", "convnext"])
def test_resume_matches_uninterrupted_run(which, recipe, vit_run, convnext_run, tmp_path):
    """Resuming from the epoch-1 checkpoint (before the re-init) ends with the uninterrupted run's weights,
    bit for bit, and the same re-init history. For ViT this needs the strict checkpoint load: transformers 5
    saves ViT under legacy key names that Trainer's own resume silently skips."""
    proc, out, args = vit_run if which == "vit" else convnext_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    per_epoch = json.loads((out / "all_results.json").read_text())["updates_per_epoch"]
    resumed = tmp_path / "resumed"
    result = recipe.main(
        [*args, "--output_dir", str(resumed), "--resume_from_checkpoint", str(out / f"checkpoint-{per_epoch}")]
    )
    assert result["reinit_steps"] == [2 * per_epoch]
    assert same_tensors(resumed / "model.safetensors", out / "model.safetensors")
    old = json.loads((out / "history.json").read_text())
    new = json.loads((resumed / "history.json").read_text())
    assert [r["reinit_steps"] for r in new] == [r["reinit_steps"] for r in old]
    assert [r["validation_top1"] for r in new] == [r["validation_top1"] for r in old]


@pytest.mark.slow
def test_resume_latest_after_a_kill_while_saving(recipe, vit_run, tmp_path):
    """`latest` skips a checkpoint left half-written (no trainer_state.json) and a staging folder."""
    import shutil

    proc, out, args = vit_run
    per_epoch = json.loads((out / "all_results.json").read_text())["updates_per_epoch"]
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(out / f"checkpoint-{per_epoch}", run / f"checkpoint-{per_epoch}")
    half = run / f"checkpoint-{2 * per_epoch}"
    shutil.copytree(out / f"checkpoint-{2 * per_epoch}", half)
    (half / "trainer_state.json").write_text('{"global_step": ')  # killed mid-write
    (run / f"checkpoint-{3 * per_epoch}.tmp").mkdir()
    result = recipe.main([*args, "--output_dir", str(run), "--resume_from_checkpoint", "latest"])
    assert result["reinit_steps"] == [2 * per_epoch]
    assert same_tensors(run / "model.safetensors", out / "model.safetensors")


@pytest.mark.slow
def test_offline_default_timm_lite0(recipe, folder_dataset, tmp_path):
    """No --model_name_or_path: timm/tf_efficientnet_lite0.in1k through TimmWrapper with the real ImageNet weights
    shipped offline; the saved folder reloads with plain transformers at the trained 32 px."""
    from transformers import (
        AutoImageProcessor,
        AutoModelForImageClassification,
        TimmWrapperForImageClassification,
    )

    from rifle_hf.data import PreprocessConfig
    from rifle_hf.pretrained import load_offline_state_dict

    out = tmp_path / "lite0"
    result = recipe.main([
        "--dataset", str(folder_dataset), "--output_dir", str(out), "--image_size", "32", "--max_steps", "3",
        "--rifle_num_reinits", "1", "--eval_strategy", "no", "--save_strategy", "no", *FAST,
    ])
    assert result["reinit_steps"] == [1]  # step-based run: R=1 over 3 steps -> step 1
    model = AutoModelForImageClassification.from_pretrained(out)
    assert isinstance(model, TimmWrapperForImageClassification)
    assert model.config.id2label == dict(enumerate(CLASSES))
    assert PreprocessConfig.from_hf(AutoImageProcessor.from_pretrained(out)).image_size == (32, 32)
    # Backbone = the ImageNet weights after 3 small SGD steps (a random init would be uncorrelated).
    stem = model.timm_model.conv_stem.weight.detach().flatten()
    pretrained = load_offline_state_dict("tf_efficientnet_lite0")["conv_stem.weight"].flatten()
    assert torch.nn.functional.cosine_similarity(stem, pretrained, dim=0) > 0.99
    assert not torch.equal(stem, pretrained)
    assert accuracy_from_saved(out, folder_dataset)["test"] == pytest.approx(result["metrics"]["top1"])


@pytest.mark.slow
def test_two_processes_identical_ranks(vit_dir, folder_dataset, tmp_path):
    """torchrun, 2 CPU processes (gloo): ranks end bit-identical across a re-init; only rank 0 writes outputs."""
    out, dump = tmp_path / "ddp", tmp_path / "dump"
    proc = run_script(
        ["--model_name_or_path", str(vit_dir), "--dataset", str(folder_dataset), "--output_dir", str(out),
         "--num_train_epochs", "2", "--rifle_num_reinits", "1", *FAST[:2], "--per_device_train_batch_size", "4"],
        launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
        env={"RIFLE_DUMP_PARAMS": str(dump)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["num_processes"] == 2
    per_epoch = results["updates_per_epoch"]
    assert per_epoch == -(-27 // 8)  # 27 train images, 2 x 4 per step
    assert results["reinit_steps"] == [per_epoch]
    assert same_tensors(dump / "rank0.safetensors", dump / "rank1.safetensors")
    from safetensors.torch import load_file
    from transformers import AutoModelForImageClassification

    saved = AutoModelForImageClassification.from_pretrained(out).state_dict()  # (ViT keys renamed on save)
    rank0 = load_file(dump / "rank0.safetensors")
    assert rank0.keys() == saved.keys() and all(torch.equal(rank0[k], saved[k]) for k in saved)
    logs = proc.stdout + proc.stderr
    assert logs.count("train_hf: done:") == 1  # the summary comes from rank 0 only
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("checkpoint-")) == sorted([
        "README.md", "all_results.json", "config.json", "history.csv", "history.json", "model.safetensors",
        "preprocessor_config.json", "trainer_state.json", "training_args.bin",
    ])
    ckpt = out / f"checkpoint-{per_epoch}"
    assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.slow
def test_unknown_model_one_error_line(folder_dataset, tmp_path):
    out = tmp_path / "never"
    proc = run_script(["--model_name_or_path", "no-such-org/no-such-model", "--dataset", str(folder_dataset),
                       "--output_dir", str(out), *FAST])
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "no-such-org/no-such-model" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.fixture(scope="module")
def broken_datasets(data_root) -> dict[str, Path]:
    import datasets

    rng = np.random.default_rng(2)
    corrupt = data_root / "corrupt"
    for c, name in enumerate(CLASSES):
        (corrupt / "train" / name).mkdir(parents=True)
        for i in range(4):
            image(rng, c, gray=False).save(corrupt / "train" / name / f"{i}.png")
    good = (corrupt / "train" / "ant" / "0.png").read_bytes()
    (corrupt / "train" / "ant" / "broken.png").write_bytes(good[: len(good) // 2])
    # A ClassLabel with a class that has no rows.
    empty_class = data_root / "empty_class.parquet"
    datasets.Dataset.from_dict(
        {"image": [image(rng, i % 2, False) for i in range(8)], "label": [i % 2 for i in range(8)]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])}),
    ).to_parquet(str(empty_class))
    return {"corrupt": corrupt, "empty_class": empty_class}


BAD_INPUTS = {
    "push without repo": (["--push_to_hub"], "--hub_model_id"),
    "push while offline": (["--push_to_hub", "--hub_model_id", "me/model"], "HF_HUB_OFFLINE"),
    "cyclic warmup past the restart": (["--lr_schedule", "cyclic", "--lr_cycles", "1", "--num_train_epochs", "2",
                                        "--warmup_steps", "5"], "first restart"),
    "too many re-inits": (["--rifle_num_reinits", "5", "--num_train_epochs", "2"], "num_reinits=5"),
    "cyclic too many cycles": (["--lr_schedule", "cyclic", "--lr_cycles", "9", "--num_train_epochs", "2"],
                               "--lr_schedule cyclic"),
    "missing label column": (["--label_column", "nope"], "nope"),
    "missing image column": (["--image_column", "nope"], "nope"),
    "hub dataset offline": (["--dataset", "some-user/some-dataset"], "image folder"),
    "no stochastic depth": (["--drop_path_rate", "0.1"], "drop_path_rate"),
    "resume without checkpoint": (["--resume_from_checkpoint", "latest"], "no complete checkpoint"),
    "resume from a non-checkpoint": (["--resume_from_checkpoint", "{data}"], "not a complete Trainer checkpoint"),
    "corrupt image with --strict": (["--dataset", "{corrupt}", "--strict", "true"], "broken.png"),
    "class without training images": (["--dataset", "{empty_class}"], "no training images"),
    "bad mixed precision": (["--mixed_precision", "fp8"], "mixed_precision"),
    "unknown flag": (["--rifle_num_reinit", "2"], "--rifle_num_reinit"),
    "head not found": (["--rifle_num_reinits", "1", "--rifle_head", "no.such.module"], "no.such.module"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_and_nothing_written(case, recipe, capsys, vit_dir, folder_dataset, broken_datasets,
                                                 data_root, tmp_path):
    from rifle_hf.cli import one_line_errors

    extra, expected = BAD_INPUTS[case]
    fill = {"data": str(data_root), **{k: str(v) for k, v in broken_datasets.items()}}
    extra = [a.format(**fill) for a in extra]
    out = tmp_path / "out"
    argv = ["--model_name_or_path", str(vit_dir), "--dataset", str(folder_dataset), "--output_dir", str(out),
            *FAST, *extra]
    with pytest.raises(SystemExit) as exc:
        one_line_errors(recipe.main)(argv)
    assert exc.value.code not in (0, None)
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and expected in lines[0], lines
    assert not out.exists()


@pytest.mark.slow
def test_existing_output_dir_is_refused_and_untouched(recipe, capsys, vit_run):
    from rifle_hf.cli import one_line_errors

    proc, out, args = vit_run
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(SystemExit):
        one_line_errors(recipe.main)(args)
    assert "already holds a run" in error_lines(capsys.readouterr().err)[0]
    assert sorted(p.name for p in out.rglob("*")) == before


# ------------------------------------------------------------------------------------------------ competitors
def _short_run(recipe, model: Path, dataset: Path, out: Path, *extra: str) -> dict:
    return recipe.main([
        "--model_name_or_path", str(model), "--dataset", str(dataset), "--output_dir", str(out), "--max_steps", "4",
        "--logging_strategy", "steps", "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
        *FAST, *extra,
    ])


@pytest.fixture(scope="module")
def vanilla_vit(recipe, vit_dir, folder_dataset, data_root) -> Path:
    out = data_root / "vanilla-vit"
    _short_run(recipe, vit_dir, folder_dataset, out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("flag", [["--drop_rate", "0.5"], ["--drop_connect", "0.5"], ["--disturb_label", "0.5"]])
def test_feature_and_label_noise_change_training(flag, recipe, vit_dir, folder_dataset, vanilla_vit, tmp_path):
    """Same seed, same batches: the first step's loss differs from vanilla only if the method is active."""
    result = _short_run(recipe, vit_dir, folder_dataset, tmp_path / "run", *flag)
    losses, _ = losses_and_lrs(tmp_path / "run")
    vanilla, _ = losses_and_lrs(vanilla_vit)
    assert len(losses) == 4 and losses[0] != vanilla[0]
    if flag[0] == "--disturb_label":
        # alpha=0.5 over 3 classes changes a label with probability 1/3 (32 labels drawn).
        assert 0.1 < result["results"]["disturb_label_changed"] < 0.6
    # Hooks only: the saved model loads into the plain architecture with no extra keys.
    from transformers import AutoModelForImageClassification

    AutoModelForImageClassification.from_pretrained(tmp_path / "run")


@pytest.mark.slow
def test_l2sp_adds_its_penalty_to_the_loss(recipe, vit_dir, folder_dataset, vanilla_vit, tmp_path):
    _short_run(recipe, vit_dir, folder_dataset, tmp_path / "run", "--l2sp", "0.1", "1.0")
    logs = [e for e in json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    vanilla, _ = losses_and_lrs(vanilla_vit)
    assert all(e["l2sp/penalty"] > 0 for e in logs)
    # Step 1 sees the same weights and batch as vanilla: the loss differs by exactly the penalty.
    assert logs[0]["loss"] - vanilla[0] == pytest.approx(logs[0]["l2sp/penalty"], rel=1e-3, abs=1e-6)


@pytest.mark.slow
def test_drop_path_rate_reaches_the_config(recipe, convnext_dir, folder_dataset, tmp_path):
    from transformers import AutoConfig

    _short_run(recipe, convnext_dir, folder_dataset, tmp_path / "run", "--drop_path_rate", "0.2")
    assert AutoConfig.from_pretrained(tmp_path / "run").drop_path_rate == 0.2


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["cyclic", "constant"])
def test_lr_schedules(schedule, recipe, vit_dir, folder_dataset, tmp_path):
    extra = ["--lr_schedule", schedule] + (["--rifle_num_reinits", "1"] if schedule == "cyclic" else [])
    result = _short_run(recipe, vit_dir, folder_dataset, tmp_path / "run", *extra)
    _, lrs = losses_and_lrs(tmp_path / "run")
    if schedule == "constant":
        assert lrs == [0.01] * 4
    else:  # R=1 over 4 steps: re-init and LR restart at step 2 -> step 3 runs at the full LR again
        assert result["reinit_steps"] == [2]
        assert lrs[0] == lrs[2] == 0.01 and lrs[1] < lrs[0] and lrs[3] < lrs[2]


@pytest.mark.slow
def test_gradient_accumulation_and_tensorboard(recipe, vit_dir, folder_dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = _short_run(recipe, vit_dir, folder_dataset, tmp_path / "run", "--gradient_accumulation_steps", "2",
                        "--rifle_num_reinits", "1", "--report_to", "tensorboard")
    assert result["reinit_steps"] == [2] and result["results"]["num_updates"] == 4
    events = EventAccumulator(str(next((tmp_path / "run").rglob("events.out.tfevents.*")).parent)).Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/rifle/reinit", "train/rifle/head_lr"} <= set(tags)
    assert [e.step for e in events.Scalars("train/rifle/reinit")] == [2]


@pytest.mark.slow
def test_bf16_mixed_precision_runs(recipe, convnext_dir, folder_dataset, tmp_path):
    from safetensors.torch import load_file

    result = _short_run(recipe, convnext_dir, folder_dataset, tmp_path / "run", "--mixed_precision", "bf16")
    assert np.isfinite(result["results"]["train_loss"])
    assert all(t.dtype == torch.float32 for t in load_file(tmp_path / "run" / "model.safetensors").values())


# ------------------------------------------------------------------------------------------------ library pieces
def test_strict_checkpoint_load_fixes_legacy_vit_keys(tmp_path):
    """The bug the recipe works around: a plain load_state_dict of a ViT save_pretrained folder misses keys."""
    from rifle_hf.hf_training import load_checkpoint_weights_strict, read_checkpoint_state_dict

    saved = tiny_vit(num_labels=3)
    with torch.no_grad():
        for p in saved.parameters():
            p.add_(0.1)  # differ from any fresh init
    saved.save_pretrained(tmp_path)
    torch.manual_seed(123)
    fresh = type(saved)(saved.config)
    raw = read_checkpoint_state_dict(tmp_path)
    report = load_checkpoint_weights_strict(fresh, tmp_path)
    for key, value in saved.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    if report.via == "from_pretrained":  # transformers renamed keys on save
        assert report.renamed_file_keys and set(report.renamed_file_keys) <= set(raw)
        missing = type(saved)(saved.config).load_state_dict(raw, strict=False).missing_keys
        assert missing  # what Trainer's own resume would silently leave un-loaded


def test_strict_checkpoint_load_direct_and_mismatch(tmp_path):
    from rifle_hf.hf_training import CheckpointLoadError, load_checkpoint_weights_strict

    saved = tiny_convnext(num_labels=3)
    saved.save_pretrained(tmp_path / "c")
    fresh = tiny_convnext(num_labels=3)
    with torch.no_grad():
        fresh.classifier.weight.zero_()
    params_before = [id(p) for p in fresh.parameters()]
    report = load_checkpoint_weights_strict(fresh, tmp_path / "c")
    assert report.via == "direct"
    assert torch.equal(fresh.classifier.weight, saved.classifier.weight)
    assert [id(p) for p in fresh.parameters()] == params_before  # same Parameters: the optimizer stays valid
    with pytest.raises(CheckpointLoadError, match="classifier.weight has shape"):
        load_checkpoint_weights_strict(tiny_convnext(num_labels=5), tmp_path / "c")


def test_checkpoint_completeness_and_resolution(tmp_path):
    from rifle_hf.hf_training import checkpoint_problems, find_complete_checkpoint, resolve_resume_checkpoint

    def make(step: int, *, state: str | None = '{"global_step": 1}', weights: bool = True) -> Path:
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        if weights:
            tiny_convnext().save_pretrained(path)
        if state is not None:
            (path / "trainer_state.json").write_text(state)
        torch.save({}, path / "optimizer.pt")
        return path

    good = make(10)
    make(20, state='{"global_st')  # killed while writing the state
    make(30, weights=False)
    make(40, state=None)
    (tmp_path / "checkpoint-50.tmp").mkdir()
    assert checkpoint_problems(good) == []
    assert "unreadable trainer_state.json" in checkpoint_problems(tmp_path / "checkpoint-20")[0]
    assert find_complete_checkpoint(tmp_path) == good
    assert resolve_resume_checkpoint("latest", tmp_path) == str(good)
    assert resolve_resume_checkpoint(str(tmp_path), "unused") == str(good)  # a run folder -> its newest
    assert resolve_resume_checkpoint(None, tmp_path) is None
    with pytest.raises(ValueError, match="model weights"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-30"), tmp_path)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resolve_resume_checkpoint("latest", tmp_path / "checkpoint-50.tmp")


def test_train_collator_seeded_per_batch_and_disturbs_only_training_labels():
    from rifle_hf.data import BatchTransform, HFImageCollator, PreprocessConfig, TrainSample
    from rifle_hf.hf_training import TrainCollator

    cfg = PreprocessConfig(input_size=(3, 8, 8), crop_pct=1.0)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 5, (64,), generator=g)
    train_items = [TrainSample((images[i], int(labels[i]))) for i in range(64)]
    eval_items = [(images[i], int(labels[i])) for i in range(64)]

    def make() -> TrainCollator:
        return TrainCollator(HFImageCollator(BatchTransform(cfg, train=True)), seed=3, disturb_label=0.5,
                             num_labels=5, extra_inputs={"interpolate_pos_encoding": True})

    a, b = make(), make()
    first, second = a(train_items), a(train_items)
    assert not torch.equal(first["pixel_values"], second["pixel_values"])  # fresh randomness per batch
    b.next_index = 1  # as after a resume at batch 1
    resumed = b(train_items)
    assert torch.equal(resumed["pixel_values"], second["pixel_values"])
    assert torch.equal(resumed["labels"], second["labels"])
    # DisturbLabel: with alpha 0.5 and 5 classes a label changes with probability 0.4.
    assert 0.2 < a.labels_changed / a.labels_seen < 0.6
    evaluated = a(eval_items)
    assert torch.equal(evaluated["labels"], labels) and evaluated["interpolate_pos_encoding"] is True
    assert torch.equal(evaluated["pixel_values"], BatchTransform(cfg)(images))
    with pytest.raises(ValueError, match="disturb_label"):
        TrainCollator(HFImageCollator(BatchTransform(cfg, train=True)), disturb_label=1.5, num_labels=5)


def test_processor_for_image_size_round_trips(tmp_path):
    from transformers import AutoImageProcessor, ConvNextImageProcessor, ViTImageProcessor

    from rifle_hf.data import PreprocessConfig
    from rifle_hf.hf_training import processor_for_image_size
    from rifle_hf.pretrained import create_hf_timm_wrapper, hf_image_processor_for

    vit, convnext = tiny_vit(), tiny_convnext()
    cases = [(ViTImageProcessor(), vit), (ConvNextImageProcessor(), convnext)]
    wrapper = create_hf_timm_wrapper("tf_efficientnet_lite0", num_labels=3, pretrained=False)
    cases.append((hf_image_processor_for(wrapper), wrapper))
    for i, (processor, model) in enumerate(cases):
        new = processor_for_image_size(processor, model, (40, 40))
        assert PreprocessConfig.from_hf(new).image_size == (40, 40)
        folder = tmp_path / str(i)
        model.save_pretrained(folder)
        new.save_pretrained(folder)
        assert PreprocessConfig.from_hf(AutoImageProcessor.from_pretrained(folder)).image_size == (40, 40)


def test_l2sp_trainer_zeroes_weight_decay_and_adds_penalty(tmp_path):
    from rifle_hf.hf_training import RecipeTrainer, RifleTrainingArguments
    from rifle_hf.regularizers import L2SP

    model = tiny_vit(num_labels=3)
    l2sp = L2SP(model, alpha=0.5, beta=0.1)
    args = RifleTrainingArguments(output_dir=str(tmp_path), eval_strategy="no", disable_tqdm=True)
    trainer = RecipeTrainer(model=model, args=args, l2sp=l2sp)
    optimizer = trainer.create_optimizer()
    covered = {id(p) for p in l2sp.parameters(model)}
    assert covered and all(g["weight_decay"] == 0.0 for g in optimizer.param_groups
                           if any(id(p) in covered for p in g["params"]))
    with torch.no_grad():
        for p in model.vit.parameters():
            p.add_(0.05)  # away from the pretrained snapshot
    batch = {"pixel_values": torch.randn(4, 3, 16, 16), "labels": torch.tensor([0, 1, 2, 0])}
    model.train()
    with_penalty = trainer.compute_loss(model, dict(batch))
    plain = model(**batch).loss
    assert (with_penalty - plain).item() == pytest.approx(l2sp.penalty(model).item(), rel=1e-5)
    model.eval()
    assert torch.equal(trainer.compute_loss(model, dict(batch)), model(**batch).loss)  # eval loss stays plain

    # A decayed group only partly under the penalty is split: the uncovered part keeps its weight decay.
    net = torch.nn.Sequential()
    net.add_module("body", torch.nn.Linear(4, 4))
    net.add_module("bn", torch.nn.BatchNorm1d(4))
    net.add_module("classifier", torch.nn.Linear(4, 3))
    l2sp = L2SP(net, alpha=0.5, beta=0.1, include_norm_and_bias=False)
    optimizer = RecipeTrainer(model=net, args=args, l2sp=l2sp).create_optimizer()
    decay = {name: g["weight_decay"] for g in optimizer.param_groups for name, p in net.named_parameters()
             if any(p is q for q in g["params"])}
    assert decay["bn.weight"] == args.weight_decay > 0
    assert decay["body.weight"] == decay["classifier.weight"] == 0.0
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(net.parameters()))


def test_epoch_history_rows():
    from rifle_hf.hf_training import epoch_history

    log = [
        {"loss": 2.0, "learning_rate": 0.01, "epoch": 0.5, "step": 2},
        {"loss": 1.0, "learning_rate": 0.008, "rifle/head_lr": 0.004, "rifle/reinit": 1.0, "epoch": 1.0, "step": 4},
        {"eval_validation_top1": 0.5, "eval_validation_loss": 1.2, "epoch": 1.0, "step": 4},
        {"eval_test_top1": 0.25, "epoch": 1.0, "step": 4},
        {"loss": 0.5, "learning_rate": 0.002, "epoch": 2.0, "step": 8},
        {"eval_validation_top1": 0.75, "epoch": 2.0, "step": 8},
    ]
    rows = epoch_history(log, updates_per_epoch=4)
    assert [r["step"] for r in rows] == [4, 8]
    assert rows[0]["train_loss"] == pytest.approx((2.0 * 2 + 1.0 * 2) / 4)
    assert rows[0]["lr"] == 0.008 and rows[0]["head_lr"] == 0.004
    assert rows[0]["reinit_steps"] == [4] and rows[0]["reinit_epochs"] == [1.0]
    assert rows[0]["validation_top1"] == 0.5 and rows[0]["test_top1"] == 0.25 and rows[0]["validation_loss"] == 1.2
    assert rows[1]["train_loss"] == 0.5 and rows[1]["reinit_steps"] == [] and rows[1]["head_lr"] == 0.002
    # Training and a re-init after the last evaluation still show up, in a last row without eval metrics.
    tail = epoch_history([*log, {"loss": 0.25, "rifle/reinit": 2.0, "epoch": 2.5, "step": 10}], updates_per_epoch=4)
    assert [r["step"] for r in tail] == [4, 8, 10]
    assert tail[2]["reinit_steps"] == [10] and tail[2]["train_loss"] == 0.25 and "validation_top1" not in tail[2]


def test_planned_updates_matches_trainer(tmp_path):
    """The pre-training length check uses the same step count as Trainer's own dataloader."""
    from rifle_hf.hf_training import RecipeTrainer, RifleTrainingArguments, planned_updates

    for n, batch, accum, drop_last in [(27, 8, 1, False), (27, 8, 2, False), (30, 4, 3, True), (5, 8, 1, False)]:
        args = RifleTrainingArguments(output_dir=str(tmp_path), eval_strategy="no", per_device_train_batch_size=batch,
                                      gradient_accumulation_steps=accum, dataloader_drop_last=drop_last,
                                      num_train_epochs=3)
        dataset = torch.utils.data.TensorDataset(torch.zeros(n, 1))
        trainer = RecipeTrainer(model=torch.nn.Linear(1, 1), args=args, train_dataset=dataset)
        loader = trainer.get_train_dataloader()
        expected = max(len(loader) // accum + int(len(loader) % accum > 0), 1)
        assert planned_updates(n, args) == (expected, 3 * expected)
