"""recipes/train_timm.py and rifle_hf/training.py, on tiny real timm models and real image files.

End-to-end runs use timm's ``test_resnet`` (random init) at 32 px over PNG folders written to tmp; one run goes
through a real subprocess (the CLI), one through ``torchrun`` with 2 processes, the rest call ``main(argv)``
in-process to keep the file fast.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "train_timm.py"
CLASSES = ("cat", "dog", "fish")
TINY = ["--model", "test_resnet", "--no-pretrained", "--image_size", "32", "--batch_size", "8",
        "--eval_batch_size", "64", "--quiet", "--seed", "0"]


# --------------------------------------------------------------------------------------------- fixtures
def _image(rng: np.random.Generator, label: int, gray: bool, size=(24, 20)) -> Image.Image:
    arr = (rng.random((size[1], size[0], 3)) * 90 + label * 70).astype(np.uint8)
    img = Image.fromarray(arr)
    return img.convert("L") if gray else img


def write_folder(root: Path, classes=CLASSES, n_train: int = 12, n_test: int = 4, seed: int = 0) -> Path:
    """root/{train,test}/<class>/*.png, a third of them grayscale, class visible in the brightness."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _image(rng, c, gray=i % 3 == 0).save(d / f"{i}.png")
    return root


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(path: Path, columns: dict) -> Path:
    import datasets

    features = datasets.Features(
        {k: datasets.Image() if k.startswith("img") else datasets.Value("string") for k in columns}
    )
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(path))
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("data") / "folder")


@pytest.fixture(scope="module")
def recipe():
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import train_timm

        yield train_timm
    finally:
        sys.path.remove(str(ROOT / "recipes"))


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="2")
    env.pop("RIFLE_DEBUG", None)
    env.update(extra)
    return env


def run_process(cmd: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """subprocess.run in its own session, so a timeout also ends the workers a launcher started."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _run_cli(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return run_process([sys.executable, str(RECIPE), *args], _env(**env))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ end to end, subprocess
@pytest.fixture(scope="module")
def e2e(folder, tmp_path_factory):
    """One real CLI run: 3 epochs of 4 steps, RIFLE R=1 (re-init after epoch 1 = step 4), checkpoints."""
    out = tmp_path_factory.mktemp("e2e") / "run"
    proc = _run_cli([*TINY, "--dataset", str(folder), "--num_epochs", "3", "--rifle_num_reinits", "1",
                     "--checkpointing_steps", "2", "--output_dir", str(out), "--hub_token", "hf_secretsecret123"])
    return proc, out


@pytest.mark.slow
def test_cli_run_reinits_at_expected_step_and_writes_outputs(e2e):
    proc, out = e2e
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["updates_per_epoch"] == 4 and results["num_updates"] == 12
    assert results["reinit_steps"] == [4]
    assert results["eval_split"] == "test" and 0.0 <= results["test_top1"] <= 1.0
    assert "validation_top1" in results
    rows = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["reinit_steps"] for r in rows] == [[4], [], []]
    assert rows[0]["reinit_epochs"] == [1.0]
    assert all(r["validation_top1"] is not None and r["test_top1"] is not None for r in rows)
    # cyclic head LR: its cosine restarts at the re-init (step 4): half-way through the 2-epoch second period
    # at step 8 it is at 0.5 x lr while the backbone's single 12-step cosine is at 0.25 x lr
    assert rows[1]["head_lr"] == pytest.approx(0.005) and rows[1]["lr"] == pytest.approx(0.0025)
    with (out / "history.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert csv_rows[0]["reinit_steps"] == "4" and len(csv_rows) == 3
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "README.md", "all_results.json", "history.json"} <= names
    assert {f"checkpoint-{s}" for s in (2, 4, 6, 8, 10, 12)} <= names
    assert not any(n.endswith(".tmp") for n in names)
    assert "re-init at step 4" in proc.stdout


@pytest.mark.slow
def test_saved_folder_loads_in_plain_timm_with_same_accuracy(e2e, folder):
    import timm

    from rifle_hf.data import BatchTransform, PreprocessConfig, decode_images, load_image_dataset

    proc, out = e2e
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["label_names"] == list(CLASSES)
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    saved = _weights(out / "model.safetensors")
    # timm's documented local loading; num_classes must be in the overlay, or timm drops the classifier
    by_file = timm.create_model("test_resnet", pretrained=True, num_classes=3,
                                pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=3))
    by_dir = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert _same(by_file.state_dict(), saved) and _same(by_dir.state_dict(), saved)
    assert by_dir.pretrained_cfg["label_names"] == list(CLASSES)

    splits, info = load_image_dataset(str(folder), seed=0)
    cfg = PreprocessConfig.from_timm(by_dir)  # preprocessing read back from the saved config
    images = decode_images(splits["test"], info.image_column, cfg)
    labels = torch.tensor(splits["test"][info.label_column])
    by_dir.eval()
    with torch.no_grad():
        preds = by_dir(BatchTransform(cfg)(images)).argmax(-1)
    reported = json.loads((out / "all_results.json").read_text())["test_top1"]
    assert int((preds == labels).sum()) == round(reported * len(labels))


@pytest.mark.slow
def test_model_card_has_rifle_config_and_command_without_token(e2e):
    proc, out = e2e
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = (out / "README.md").read_text()
    assert "library_name: timm" in card
    assert '"num_reinits": 1' in card
    assert "recipes/train_timm.py" in card and "--rifle_num_reinits 1" in card
    assert "hf_secretsecret123" not in card and "<redacted>" in card
    assert "0: cat, 1: dog, 2: fish" in card
    # the card's "How to use" snippet loads the trained model with plain timm
    snippet = card.split("## How to use")[1].split("```python")[1].split("```")[0]
    namespace: dict = {}
    exec(snippet.replace("path/to/this/folder", str(out)), namespace)
    assert namespace["model"].num_classes == 3
    assert namespace["data_config"]["input_size"][-1] == 32


# --------------------------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_resume_before_at_and_after_reinit_matches_uninterrupted_run(recipe, folder, tmp_path):
    args = [*TINY, "--dataset", str(folder), "--num_epochs", "3", "--rifle_num_reinits", "1",
            "--checkpointing_steps", "2"]
    full = recipe.main([*args, "--output_dir", str(tmp_path / "full")])
    final = _weights(tmp_path / "full" / "model.safetensors")
    assert full["reinit_steps"] == [4]
    # step 2: before the re-init; step 4: the re-init's own step (saved before it fires); step 6: after
    for step in (2, 4, 6):
        run = tmp_path / f"resume{step}"
        run.mkdir()
        shutil.copytree(tmp_path / "full" / f"checkpoint-{step}", run / f"checkpoint-{step}")
        (run / "checkpoint-99.tmp").mkdir()  # a half-written later checkpoint is ignored by 'latest'
        resumed = recipe.main([*args, "--output_dir", str(run), "--resume_from_checkpoint", "latest"])
        assert resumed["reinit_steps"] == [4], step
        assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3]
        assert [r["test_top1"] for r in resumed["history"]] == [r["test_top1"] for r in full["history"]]
        assert _same(_weights(run / "model.safetensors"), final), f"resumed from step {step}"


# ------------------------------------------------------------------------------------- 2 processes
@pytest.mark.slow
def test_two_processes_end_bitwise_identical_and_only_main_writes(folder, tmp_path):
    out, dump = tmp_path / "ddp", tmp_path / "dump"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(RECIPE), *TINY, "--batch_size", "4", "--dataset", str(folder), "--num_epochs", "2",
           "--rifle_num_reinits", "1", "--output_dir", str(out)]
    env = _env(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", RIFLE_DUMP_PARAMS=str(dump))
    proc = run_process(cmd, env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    assert proc.stdout.count("done in") == 1  # only the main process reports
    results = json.loads((out / "all_results.json").read_text())
    assert results["num_processes"] == 2
    assert results["updates_per_epoch"] == 4  # 32 images / (4 per rank x 2 ranks)
    assert results["reinit_steps"] == [4]
    rank0, rank1 = _weights(dump / "rank0.safetensors"), _weights(dump / "rank1.safetensors")
    assert _same(rank0, rank1)
    assert _same(rank0, _weights(out / "model.safetensors"))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["README.md", "all_results.json", "config.json", "history.csv", "history.json", "model.safetensors"]
    )


# ------------------------------------------------------------------------------- offline default path
@pytest.mark.slow
def test_default_model_uses_real_offline_imagenet_weights(recipe, folder, tmp_path):
    from rifle_hf.pretrained import load_offline_state_dict

    result = recipe.main(["--model", "tf_efficientnet_lite0", "--dataset", str(folder), "--image_size", "32",
                          "--num_epochs", "1", "--max_train_samples_per_class", "4", "--batch_size", "12",
                          "--lr", "1e-4", "--quiet", "--output_dir", str(tmp_path / "out")])
    assert result["metrics"]["top1"] >= 0.0
    saved = _weights(tmp_path / "out" / "model.safetensors")
    reference = load_offline_state_dict("tf_efficientnet_lite0")
    stem, ref = saved["conv_stem.weight"], reference["conv_stem.weight"]
    assert (stem - ref).norm() / ref.norm() < 0.01  # one tiny step away from the ImageNet weights
    assert saved["classifier.weight"].shape == (3, 1280)


# ------------------------------------------------------------------------------------------ bad input
def _bad_inputs(root: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (extra argv, a word the error line must contain)."""
    folder = write_folder(root / "ok", n_train=4, n_test=2)
    corrupt = write_folder(root / "corrupt", n_train=4, n_test=2)
    (corrupt / "train" / "cat" / "broken.png").write_bytes(_png_bytes(Image.new("RGB", (8, 8)))[:40])
    no_train_class = write_folder(root / "noclass", n_train=4, n_test=2)
    (no_train_class / "test" / "zebra").mkdir()
    _image(np.random.default_rng(0), 0, False).save(no_train_class / "test" / "zebra" / "0.png")
    rng = np.random.default_rng(1)
    imgs = [{"bytes": _png_bytes(_image(rng, i % 2, False)), "path": None} for i in range(8)]
    two_images = write_parquet(root / "two_images.parquet", {"img_a": imgs, "img_b": imgs,
                                                             "label": ["a", "b"] * 4})
    no_label = write_parquet(root / "no_label.parquet", {"img": imgs, "caption": ["x"] * 8})
    data = ["--dataset", str(folder)]
    return {
        "unknown model": (["--model", "resnet_does_not_exist", *data], "timm model"),
        "no offline weights": (["--model", "test_resnet", "--pretrained", *data], "--no-pretrained"),
        "hub dataset offline": (["--dataset", "nobody/no_such_dataset_xyz"], "image folder"),
        "ambiguous image column": (["--dataset", str(two_images)], "--image_column"),
        "no label column": (["--dataset", str(no_label)], "--label_column"),
        "corrupt image with --strict": (["--dataset", str(corrupt), "--strict"], "unreadable image"),
        "class without training images": (["--dataset", str(no_train_class)], "no training images"),
        "too many re-inits": (["--rifle_num_reinits", "3", "--num_epochs", "3", *data], "num_reinits"),
        "push without repo": (["--push_to_hub", *data], "--hub_model_id"),
        "resume without checkpoint": (["--resume_from_checkpoint", "latest", *data], "checkpoint"),
        "bad checkpointing steps": (["--checkpointing_steps", "often", *data], "--checkpointing_steps"),
        "unknown optimizer": (["--opt", "nope", *data], "--opt"),
    }


BAD_IDS = ["unknown model", "no offline weights", "hub dataset offline", "ambiguous image column", "no label column",
           "corrupt image with --strict", "class without training images", "too many re-inits", "push without repo",
           "resume without checkpoint", "bad checkpointing steps", "unknown optimizer"]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, tuple[list[str], str]]:
    cases = _bad_inputs(tmp_path_factory.mktemp("bad"))
    assert sorted(cases) == sorted(BAD_IDS)
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_IDS)
def test_bad_input_is_one_error_line_and_leaves_no_output_dir(recipe, bad_inputs, case, tmp_path, capsys):
    from rifle_hf.cli import one_line_errors

    extra, word = bad_inputs[case]
    out = tmp_path / "out"
    argv = [*[a for a in TINY if a not in ("--model", "test_resnet")], *extra, "--output_dir", str(out)]
    if case == "no offline weights":
        argv = [a for a in argv if a != "--no-pretrained"]
    with pytest.raises(SystemExit) as exc:
        one_line_errors(recipe.main)(argv)
    assert exc.value.code != 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert word in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow
def test_cli_bad_input_exits_nonzero_before_training(tmp_path):
    out = tmp_path / "out"
    proc = _run_cli([*TINY, "--dataset", str(tmp_path / "not_read"), "--rifle_num_reinits", "5",
                     "--num_epochs", "4", "--output_dir", str(out)])
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: RIFLE: num_reinits=5"), proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_corrupt_images_are_skipped_and_counted(recipe, bad_inputs, tmp_path, capsys):
    corrupt = Path(bad_inputs["corrupt image with --strict"][0][1])
    result = recipe.main([*TINY, "--dataset", str(corrupt), "--num_epochs", "1", "--output_dir", str(tmp_path / "o")])
    assert result["results"]["skipped_images"]["train"] + result["results"]["skipped_images"]["validation"] == 1
    assert "skipped 1 unreadable image" in capsys.readouterr().out


@pytest.mark.slow
def test_string_labels_are_mapped_and_saved(recipe, tmp_path):
    rng = np.random.default_rng(2)
    names = ["zebra", "ant", "moth"]
    imgs = [{"bytes": _png_bytes(_image(rng, i % 3, i % 2 == 0)), "path": None} for i in range(30)]
    data = write_parquet(tmp_path / "strings.parquet", {"img": imgs, "label": [names[i % 3] for i in range(30)]})
    result = recipe.main([*TINY, "--dataset", str(data), "--num_epochs", "1", "--output_dir", str(tmp_path / "o")])
    assert result["label_names"] == ["ant", "moth", "zebra"]
    assert result["eval_split"] == "validation"  # no test split: the final metrics are validation's
    assert result["metrics"] == result["validation_metrics"]
    assert json.loads((tmp_path / "o" / "config.json").read_text())["label_names"] == ["ant", "moth", "zebra"]


# ----------------------------------------------------------------------------------------- competitors
@pytest.fixture(scope="module")
def baseline(recipe, folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline") / "run"
    return recipe.main([*TINY, "--dataset", str(folder), "--num_epochs", "2", "--output_dir", str(out)])


def _losses(result) -> list[float]:
    return [r["train_loss"] for r in result["history"]]


COMPETITORS = {
    "drop_rate": ["--drop_rate", "0.5"],
    "drop_connect": ["--drop_connect", "0.5"],
    "drop_path_rate": ["--drop_path_rate", "0.3"],
    "disturb_label": ["--disturb_label", "0.5"],
    "l2sp": ["--l2sp", "50", "0.01"],
    "cyclic": ["--lr_schedule", "cyclic", "--lr_cycles", "1"],
    "constant": ["--lr_schedule", "constant"],
    "grad_accum_bf16": ["--gradient_accumulation_steps", "2", "--mixed_precision", "bf16"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COMPETITORS))
def test_competitor_flag_runs_and_changes_training(recipe, folder, baseline, name, tmp_path):
    result = recipe.main([*TINY, "--dataset", str(folder), "--num_epochs", "2", *COMPETITORS[name],
                          "--output_dir", str(tmp_path / "o")])
    assert all(np.isfinite(_losses(result)))
    # Same seed, same data order: with the flag ignored the run would be bit-identical to the baseline.
    assert _losses(result) != _losses(baseline)
    lrs = [r["lr"] for r in result["history"]]
    if name == "cyclic":  # one restart after epoch 1: the LR for the next step is back at its peak
        assert lrs[0] == pytest.approx(0.01) and lrs[1] == pytest.approx(0.0, abs=1e-12)
    if name == "constant":
        assert lrs == [0.01, 0.01]
    if name == "grad_accum_bf16":
        assert result["updates_per_epoch"] == 2


@pytest.mark.slow
def test_l2sp_pulls_backbone_towards_start_and_depth_diagnostics_are_written(recipe, folder, tmp_path):
    """With a strong L2-SP pull the backbone ends closer to its starting weights (DepthTracker's distance)."""
    common = [*TINY, "--dataset", str(folder), "--num_epochs", "2", "--depth_diagnostics", "--depth_every", "2",
              "--rifle_num_reinits", "1"]
    plain = recipe.main([*common, "--output_dir", str(tmp_path / "plain")])
    pulled = recipe.main([*common, "--l2sp", "50", "0", "--output_dir", str(tmp_path / "l2sp")])

    def final_distances(run: Path) -> dict[str, float]:
        with (run / "depth.csv").open() as f:
            rows = [r for r in csv.DictReader(f) if r.get("dist/head")]
        return {k[5:]: float(v) for k, v in rows[-1].items() if k.startswith("dist/") and v}

    d_plain, d_pulled = final_distances(tmp_path / "plain"), final_distances(tmp_path / "l2sp")
    backbone = [g for g in d_plain if g != "head"]
    assert backbone and all(d_pulled[g] < d_plain[g] for g in backbone)
    assert (tmp_path / "plain" / "depth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plain["reinit_steps"] == pulled["reinit_steps"] == [4]


@pytest.mark.slow
def test_tensorboard_logging(recipe, folder, tmp_path):
    recipe.main([*TINY, "--dataset", str(folder), "--num_epochs", "1", "--report_to", "tensorboard",
                 "--output_dir", str(tmp_path / "o")])
    assert list((tmp_path / "o" / "runs").rglob("events.out.tfevents.*"))


# ------------------------------------------------------------------------------ rifle_hf.training units
def test_weight_decay_groups_exclude_biases_norms_and_extra_names():
    import timm

    from rifle_hf.training import weight_decay_param_groups

    model = timm.create_model("test_resnet", num_classes=3)
    groups = weight_decay_param_groups(model, 1e-4, no_decay_names={"fc.weight"})
    by_id = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_id[id(named["conv1.0.weight"])] == 1e-4
    assert by_id[id(named["fc.weight"])] == 0.0
    assert by_id[id(named["fc.bias"])] == 0.0
    assert by_id[id(named["bn1.weight"])] == 0.0
    assert len(by_id) == len(named)


def test_build_optimizer_names_timm_optimizers():
    import timm

    from rifle_hf.training import build_optimizer

    model = timm.create_model("test_resnet", num_classes=3)
    assert isinstance(build_optimizer(model, opt="adamw", lr=1e-3, weight_decay=0.05), torch.optim.AdamW)
    with pytest.raises(ValueError, match="--opt"):
        build_optimizer(model, opt="not_an_optimizer", lr=1e-3)


def test_lr_lambdas():
    from rifle_hf.training import make_lr_lambda

    cos = make_lr_lambda("cosine", total_steps=10)
    assert cos(0) == 1.0 and cos(10) == pytest.approx(0.0) and cos(5) == pytest.approx(0.5)
    cyc = make_lr_lambda("cyclic", total_steps=12, restart_steps=[4, 8])
    assert cyc(4) == 1.0 and cyc(8) == 1.0 and cyc(3) < 0.2
    const = make_lr_lambda("constant", total_steps=10, warmup_steps=2)
    assert [const(s) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="warmup"):
        make_lr_lambda("cosine", total_steps=4, warmup_steps=4)


def test_epoch_sampler_depends_only_on_seed_and_epoch():
    from rifle_hf.training import EpochSampler

    a, b = EpochSampler(50, seed=3), EpochSampler(50, seed=3)
    b.set_epoch(1)
    first, second = list(a), list(b)
    assert sorted(first) == list(range(50)) and first != second
    a.set_epoch(1)
    assert list(a) == second
    assert list(EpochSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_checkpoints_are_atomic_and_latest_skips_incomplete(tmp_path):
    from accelerate import Accelerator

    from rifle_hf.training import (
        find_latest_checkpoint,
        load_checkpoint,
        resolve_checkpoint,
        save_checkpoint,
    )

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    first = save_checkpoint(accelerator, tmp_path, 5, {"epochs_done": 1}, total_limit=2)
    save_checkpoint(accelerator, tmp_path, 10, {"epochs_done": 2}, total_limit=2)
    save_checkpoint(accelerator, tmp_path, 15, {"epochs_done": 3}, total_limit=2)
    assert not first.exists()  # pruned to the newest 2
    (tmp_path / "checkpoint-20.tmp").mkdir()  # a kill while saving
    (tmp_path / "checkpoint-25").mkdir()  # no trainer_state.json: incomplete
    latest = find_latest_checkpoint(tmp_path)
    assert latest == tmp_path / "checkpoint-15"
    assert resolve_checkpoint("latest", tmp_path) == latest
    assert resolve_checkpoint(str(tmp_path), tmp_path / "elsewhere") == latest
    with torch.no_grad():
        model.weight.zero_()
    state = load_checkpoint(accelerator, latest)
    assert state["step"] == 15 and state["epochs_done"] == 3
    assert model.weight.abs().sum() > 0  # weights restored
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        resolve_checkpoint("latest", tmp_path / "empty")


def test_staged_output_and_guard_leave_nothing_half_written(tmp_path):
    from rifle_hf.training import History, output_dir_guard, staged_output

    out = tmp_path / "run"
    with pytest.raises(RuntimeError), output_dir_guard(out), staged_output(out) as stage:
        (stage / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("crash while writing")
    assert not out.exists()
    with output_dir_guard(out), staged_output(out) as stage:
        History([{"epoch": 1, "reinit_steps": [3, 6]}]).write(stage)
    assert sorted(p.name for p in out.iterdir()) == ["history.csv", "history.json"]
    assert "3;6" in (out / "history.csv").read_text()


def test_save_timm_model_channels_last_round_trip(tmp_path):
    import timm

    from rifle_hf.training import save_timm_model

    model = timm.create_model("test_resnet", num_classes=2).to(memory_format=torch.channels_last)
    save_timm_model(model, tmp_path, label_names=["no", "yes"], data_config={"input_size": (3, 48, 48)})
    assert model.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)  # left as it was
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    assert _same(loaded.state_dict(), {k: v.contiguous() for k, v in model.state_dict().items()})
    assert loaded.pretrained_cfg["input_size"] == (3, 48, 48)
    with pytest.raises(ValueError, match="label names"):
        save_timm_model(model, tmp_path / "x", label_names=["only one"])

    from rifle_hf import RifleWrapper

    save_timm_model(RifleWrapper(model, num_reinits=1, num_epochs=2), tmp_path / "wrapped")
    assert json.loads((tmp_path / "wrapped" / "config.json").read_text())["architecture"] == "test_resnet"
    assert _same(_weights(tmp_path / "wrapped" / "model.safetensors"), _weights(tmp_path / "model.safetensors"))
