"""Kill and resume: real recipe processes killed with SIGKILL at named points, resumed with
``--resume_from_checkpoint latest``, end with the uninterrupted run's weights (bit for bit, CPU) and
re-init history.

Every run is a fresh process forked from this file's ``__main__ --zygote`` (which imports torch,
transformers, timm... once, instead of ~10 s per run), running the recipe script as ``__main__``. With a
pause point, the run wraps one rifle-hf function so that, at that point, it prints ``PAUSED <point>`` and
sleeps; the test sees the line in the run's log and kills the process with SIGKILL. Nothing is simulated:
the recipe's own code runs, the kill is a signal, and the resumed process starts from what is on disk.
Pause points:

* ``accum:S``   after the first micro-batch of optimizer step S+1 (gradients accumulated, not stepped)
* ``reinit:K``  right after re-init number K (0-based) fired
* ``step:S``    when step S is over (re-init, evaluation and checkpoint of step S done)
* ``ckpt:S``    while checkpoint S is being written (files in ``checkpoint-S.tmp``, not yet renamed)

One chain per recipe: kill, resume, kill, ... then a last resume that finishes. Runs use gradient
accumulation 2, 4 optimizer steps per epoch, 3 epochs, RIFLE R=1 (re-init at step 4), a checkpoint
every 2 steps.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MARKER = "PAUSED"
RECIPES = {"timm": ROOT / "recipes" / "train_timm.py", "hf": ROOT / "recipes" / "train_hf.py"}

# (pause point, complete checkpoints on disk after the kill, half-written checkpoint left behind)
CHAIN = [
    ("accum:2", [2], None),  # mid gradient accumulation, before the re-init
    ("reinit:0", {"timm": [2, 4], "hf": [2]}, None),  # at the re-init (timm checkpoints step 4 first)
    ("step:5", [2, 4], None),  # right after the re-init: one step trained on the new head
    ("ckpt:6", [2, 4], 6),  # while checkpoint-6 is being written
]


# ------------------------------------------------------------------------------------------- launcher
def _pause(point: str) -> None:
    sys.stderr.write(f"{MARKER} {point}\n")
    sys.stderr.flush()
    time.sleep(600)
    os._exit(70)  # the test should have killed us long ago


def _install_pause(point: str, recipe: str) -> None:
    """Wrap one rifle-hf function so the run pauses at ``point`` (the wrapped code still runs)."""
    kind, _, value = point.partition(":")
    n = int(value)
    if kind == "reinit":
        from rifle_hf.schedule import RifleScheduler

        reinit_now = RifleScheduler.reinit_now

        def reinit_and_pause(self, **kwargs):
            names = reinit_now(self, **kwargs)
            if len(self.history) == n + 1:
                _pause(point)
            return names

        RifleScheduler.reinit_now = reinit_and_pause
    elif recipe.endswith("train_timm.py"):
        import rifle_hf.training as T

        if kind == "ckpt":
            write_json = T._write_json

            def write_json_and_pause(path, data):
                if Path(path).parent.name == f"checkpoint-{n}.tmp":
                    _pause(point)  # accelerator.save_state wrote the tensors; trainer_state.json not yet
                return write_json(path, data)

            T._write_json = write_json_and_pause
            return
        train_one_epoch = T.train_one_epoch

        def train_one_epoch_with_pause(*args, **kwargs):
            where = {"updates": kwargs["num_updates"], "micro": 0}
            before_batch, on_update = kwargs["before_batch"], kwargs["on_update"]

            def before(index):
                if where["updates"] == n and where["micro"] == (1 if kind == "accum" else 0):
                    _pause(point)
                where["micro"] += 1
                before_batch(index)

            def update(step):
                where["updates"], where["micro"] = step, 0
                return on_update(step)

            return train_one_epoch(*args, **{**kwargs, "before_batch": before, "on_update": update})

        T.train_one_epoch = train_one_epoch_with_pause
    else:
        from transformers import Trainer

        from rifle_hf.callback import RifleTrainer
        from rifle_hf.hf_training import RecipeTrainerMixin

        if kind == "ckpt":

            def save_checkpoint_and_pause(self, model, trial):
                Trainer._save_checkpoint(self, model, trial)  # into the recipe's checkpoint-N.tmp staging
                if self.state.global_step == n:
                    _pause(point)

            RifleTrainer._save_checkpoint = save_checkpoint_and_pause
            return
        training_step = RecipeTrainerMixin.training_step
        where = {"step": -1, "micro": 0}

        def training_step_with_pause(self, *args, **kwargs):
            if where["step"] != self.state.global_step:
                where.update(step=self.state.global_step, micro=0)
            if where["step"] == n and where["micro"] == (1 if kind == "accum" else 0):
                _pause(point)
            where["micro"] += 1
            return training_step(self, *args, **kwargs)

        RecipeTrainerMixin.training_step = training_step_with_pause


def _launch(argv: list[str]) -> None:
    """``python test_kill_resume.py POINT|none RECIPE ARGS...``: run RECIPE as ``__main__``."""
    import runpy

    import torch

    torch.set_num_threads(1)
    point, recipe, *args = argv
    if point != "none":
        _install_pause(point, recipe)
    sys.argv = [recipe, *args]
    runpy.run_path(recipe, run_name="__main__")


def _zygote() -> None:
    """``python test_kill_resume.py --zygote``: import once, then fork one process per command line.

    Reads ``{"point", "recipe", "args", "log"}`` JSON lines on stdin; for each, forks a child that runs
    the recipe with its output in ``log``, answers ``PID <pid>`` and, once the child is gone,
    ``EXIT <exit code, or -signal>``.
    """
    import torch

    torch.set_num_threads(1)
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import timm  # noqa: F401
    import transformers.trainer  # noqa: F401

    import rifle_hf.data  # noqa: F401
    import rifle_hf.hf_training  # noqa: F401
    import rifle_hf.training  # noqa: F401

    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints cannot corrupt the answers
    while line := sys.stdin.readline():
        command = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                log = os.open(command["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                _launch([command["point"], command["recipe"], *command["args"]])
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        answers.write(f"PID {pid}\n")
        answers.flush()
        _, status = os.waitpid(pid, 0)
        answers.write(f"EXIT {os.waitstatus_to_exitcode(status)}\n")
        answers.flush()


# ------------------------------------------------------------------------------------------- helpers
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RIFLE_", "ACCELERATE_"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    return env


class Zygote:
    """Test side of `_zygote`: start runs, learn their pid and exit code."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--zygote"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
        self._pending = b""  # answers read from the pipe but not consumed yet (never buffered elsewhere)

    def start(self, point: str, recipe: str, args: list[str], log: Path) -> int:
        command = {"point": point, "recipe": str(RECIPES[recipe]), "args": args, "log": str(log)}
        log.write_text("")  # exists before the child opens it
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return int(self._answer("PID", timeout=300))

    def exit_code(self, timeout: float) -> int | None:
        """The current run's exit code, or None if it is still running after ``timeout`` seconds."""
        line = self._line(timeout)
        return None if line is None else int(self._check(line, "EXIT"))

    def _answer(self, kind: str, timeout: float) -> str:
        line = self._line(timeout)
        if line is None:
            pytest.fail(f"no {kind} from the launcher in {timeout}s")
        return self._check(line, kind)

    def _check(self, line: str, kind: str) -> str:
        assert line.startswith(f"{kind} "), f"launcher said {line!r} (exit code {self.proc.poll()})"
        return line.split()[1]

    def _line(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left < 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return f"<launcher gone> {self._pending!r}"
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return line.decode()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def run_to_end(zygote: Zygote, recipe: str, args: list[str], log: Path) -> None:
    zygote.start("none", recipe, args, log)
    assert zygote.exit_code(timeout=600) == 0, log.read_text()[-3000:]


def run_and_kill(zygote: Zygote, recipe: str, args: list[str], point: str, log: Path, timeout: float = 300) -> None:
    """Start the recipe, wait for it to reach ``point``, SIGKILL it."""
    pid = zygote.start(point, recipe, args, log)
    deadline = time.monotonic() + timeout
    try:
        while f"{MARKER} {point}" not in log.read_text(errors="replace"):
            code = zygote.exit_code(timeout=0.05)
            if code is not None:
                pid = None
                pytest.fail(f"{recipe} exited ({code}) before {point}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{recipe} did not reach {point} in {timeout}s:\n{log.read_text()[-3000:]}")
        os.kill(pid, signal.SIGKILL)
        assert zygote.exit_code(timeout=60) == -signal.SIGKILL
        pid = None
    finally:
        if pid is not None:  # a failed wait: do not leave the paused run behind
            os.kill(pid, signal.SIGKILL)
            zygote.exit_code(timeout=60)


def checkpoint_steps(output_dir: Path) -> tuple[list[int], list[str]]:
    """(complete ``checkpoint-N`` steps, half-written ``*.tmp`` names) in ``output_dir``."""
    names = [p.name for p in output_dir.iterdir() if p.name.startswith("checkpoint-")]
    complete = sorted(int(n.split("-")[1]) for n in names if n.split("-")[1].isdigit())
    return complete, sorted(n for n in names if n.endswith(".tmp"))


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def same_tensors(a: Path, b: Path) -> bool:
    import torch

    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def zygote():
    launcher = Zygote()
    yield launcher
    launcher.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kill_resume")


@pytest.fixture(scope="module")
def dataset(workdir) -> Path:
    """root/{train,test}/<class>/*.png: 3 classes, 12 + 4 images each (36 train -> 32 train + 4 validation)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    root = workdir / "data"
    for split, n in (("train", 12), ("test", 4)):
        for c, name in enumerate(("ant", "bee", "cat")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(50 + 70 * c, 25, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).convert("L" if i % 3 == 0 else "RGB").save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def hf_model(workdir) -> Path:
    """A tiny ViT (transformers 5 saves it under legacy key names: the strict resume path is exercised)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_vit
    from transformers import ViTImageProcessor

    path = workdir / "tiny-vit"
    tiny_vit(num_labels=2, image_size=16).save_pretrained(path)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(path)
    return path


def recipe_args(recipe: str, dataset: Path, model: Path | None) -> list[str]:
    common = ["--dataset", str(dataset), "--seed", "0", "--rifle_num_reinits", "1", "--gradient_accumulation_steps", "2"]
    if recipe == "timm":
        return [*common, "--model", "test_resnet", "--no-pretrained", "--image_size", "32", "--batch_size", "4",
                "--num_epochs", "3", "--checkpointing_steps", "2", "--quiet"]
    return [*common, "--model_name_or_path", str(model), "--per_device_train_batch_size", "4",
            "--num_train_epochs", "3", "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "20",
            "--disable_tqdm", "true"]


def reinit_record(output_dir: Path) -> dict:
    """Every place a run records its re-inits."""
    results = json.loads((output_dir / "all_results.json").read_text())
    history = json.loads((output_dir / "history.json").read_text())
    record = {
        "all_results": results["reinit_steps"],
        "history": [(row["epoch"], row["reinit_steps"]) for row in history],
        "eval": [(row["epoch"], row.get("validation_top1"), row.get("test_top1")) for row in history],
    }
    state = output_dir / "trainer_state.json"
    if (output_dir / "preprocessor_config.json").is_file() and state.is_file():  # Trainer's own log
        record["log_history"] = [e["step"] for e in json.loads(state.read_text())["log_history"] if "rifle/reinit" in e]
    return record


# ------------------------------------------------------------------------------------------- the test
@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["timm", "hf"])
def test_killed_at_every_point_then_resumed_equals_uninterrupted(recipe, zygote, workdir, dataset, hf_model):
    args = recipe_args(recipe, dataset, hf_model if recipe == "hf" else None)
    full = workdir / f"{recipe}-full"
    run_to_end(zygote, recipe, [*args, "--output_dir", str(full)], workdir / f"{recipe}-full.log")
    assert checkpoint_steps(full) == ([2, 4, 6, 8, 10, 12], [])
    expected = reinit_record(full)
    assert expected["all_results"] == [4]

    run = workdir / f"{recipe}-killed"
    for i, (point, complete, half_written) in enumerate(CHAIN):
        complete = complete[recipe] if isinstance(complete, dict) else complete
        extra = ["--resume_from_checkpoint", "latest"] if i else []
        run_and_kill(zygote, recipe, [*args, "--output_dir", str(run), *extra], point, workdir / f"{recipe}-{i}.log")
        found, tmp = checkpoint_steps(run)
        assert found == complete, (point, found)
        assert tmp == ([f"checkpoint-{half_written}.tmp"] if half_written else []), (point, tmp)
        # What survived the kill is exactly what the uninterrupted run had at that step.
        latest = f"checkpoint-{found[-1]}"
        assert same_tensors(run / latest / "model.safetensors", full / latest / "model.safetensors"), point

    final = [*args, "--output_dir", str(run), "--resume_from_checkpoint", "latest"]
    run_to_end(zygote, recipe, final, workdir / f"{recipe}-final.log")
    assert same_tensors(run / "model.safetensors", full / "model.safetensors")
    assert reinit_record(run) == expected
    assert checkpoint_steps(run) == ([2, 4, 6, 8, 10, 12], [])  # the stale .tmp was replaced


if __name__ == "__main__":
    _zygote() if sys.argv[1:] == ["--zygote"] else _launch(sys.argv[1:])
