"""A resumed run holds the weights it resumed from, or stops with one line that says how to fix it.

transformers 5 writes some architectures (ViT) under legacy key names, and ``Trainer.train(
resume_from_checkpoint=...)`` loads the file with ``strict=False``: every renamed tensor is skipped with
a warning and training continues from the un-resumed weights. `RifleTrainer` loads checkpoints strictly;
`RifleCallback` in a plain Trainer detects the mismatch and refuses to train on. Also here: resumes with
the stochastic regularizers (Dropout, DisturbLabel) are exact in both recipes.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ImageDataset, tiny_convnext, tiny_vit
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from rifle_hf import RifleCallback, RifleConfig, RifleTrainer
from rifle_hf.callback import checkpoint_mismatches

ROOT = Path(__file__).resolve().parents[2]
# head_lr="none": a plain Trainer has no head param group, and every run here must share one optimizer layout.
RIFLE = {"num_reinits": 1, "head_lr": "none"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread, set before the module's fixtures train anything: bitwise comparisons need every run
    to use the same thread count, and an oversubscribed 2-thread torch is ~100x slower on tiny models."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _args(output_dir: Path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(output_dir), per_device_train_batch_size=8, num_train_epochs=2, learning_rate=0.05,
        optim="sgd", save_strategy="steps", save_steps=4, logging_steps=2, report_to="none", use_cpu=True,
        seed=0, data_seed=0, disable_tqdm=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _reinit_steps(trainer: Trainer) -> list[int]:
    return [e["step"] for e in trainer.state.log_history if "rifle/reinit" in e]


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """An uninterrupted plain Trainer + RifleCallback run of a tiny ViT: 8 steps, re-init at 4, checkpoints 4, 8."""
    out = tmp_path_factory.mktemp("vit_run")
    trainer = Trainer(model=tiny_vit(), args=_args(out), train_dataset=ImageDataset(32),
                      callbacks=[RifleCallback(**RIFLE)])
    trainer.train()
    assert _reinit_steps(trainer) == [4]
    return out, _state(trainer.model)


def test_trainer_checkpoint_of_vit_uses_other_key_names(vit_run):
    """The premise: the file's keys are not the model's, so a strict=False load misses tensors."""
    out, final = vit_run
    stored = load_file(str(out / "checkpoint-4" / "model.safetensors"))
    assert set(final) - set(stored), "transformers now saves ViT under its own names: the legacy path is untested"


def test_plain_trainer_resume_with_rifle_callback_fails_with_one_line(vit_run, tmp_path):
    out, _ = vit_run
    trainer = Trainer(model=tiny_vit(), args=_args(out), train_dataset=ImageDataset(32),
                      callbacks=[RifleCallback(**RIFLE)])
    with pytest.raises(ValueError, match="RifleTrainer") as err:
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    message = str(err.value)
    assert "\n" not in message and "checkpoint-4" in message
    assert trainer.state.global_step == 4  # stopped before training a single step on the wrong weights


def test_rifle_trainer_resume_equals_uninterrupted_run(vit_run):
    out, final = vit_run
    trainer = RifleTrainer(model=tiny_vit(), args=_args(out), train_dataset=ImageDataset(32),
                           rifle=RifleConfig(**RIFLE))
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    assert _same(_state(trainer.model), final)
    assert _reinit_steps(trainer) == [4]


def test_no_false_alarm_when_keys_match_or_checkpoint_is_another_runs(tmp_path):
    """ConvNeXt's keys are stored as they are: the plain Trainer resume is right and nothing is raised,
    also when output_dir holds another run's checkpoint of the same step (it is not compared)."""
    first = tmp_path / "first"
    trainer = Trainer(model=tiny_convnext(), args=_args(first), train_dataset=ImageDataset(32),
                      callbacks=[RifleCallback(**RIFLE)])
    trainer.train()
    final = _state(trainer.model)
    other = tmp_path / "other"
    Trainer(model=tiny_convnext(), args=_args(other, seed=1, max_steps=4), train_dataset=ImageDataset(32, seed=3),
            callbacks=[RifleCallback(**RIFLE)]).train()
    assert (other / "checkpoint-4").is_dir()
    for output_dir in (first, other):
        resumed = Trainer(model=tiny_convnext(), args=_args(output_dir), train_dataset=ImageDataset(32),
                          callbacks=[RifleCallback(**RIFLE)])
        resumed.train(resume_from_checkpoint=str(first / "checkpoint-4"))
        assert _same(_state(resumed.model), final), output_dir.name


def test_checkpoint_mismatches_names_the_tensors_that_differ(vit_run, tmp_path):
    out, _ = vit_run
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(out / "checkpoint-8")
    assert checkpoint_mismatches(model, out / "checkpoint-8") == []
    assert len(checkpoint_mismatches(model, out / "checkpoint-4")) == len(model.state_dict())
    with torch.no_grad():
        model.vit.layernorm.weight.add_(1.0)
    assert checkpoint_mismatches(model, out / "checkpoint-8") == ["vit.layernorm.weight"]
    (tmp_path / "adapter_only").mkdir()
    assert checkpoint_mismatches(model, tmp_path / "adapter_only") is None


def test_rifle_trainer_loads_the_best_model_strictly(tmp_path):
    """load_best_model_at_end goes through the same strict load (Trainer's own would skip the ViT encoder)."""
    from transformers import ViTForImageClassification

    trainer = RifleTrainer(
        model=tiny_vit(), train_dataset=ImageDataset(32), eval_dataset=ImageDataset(16, seed=1),
        args=_args(tmp_path, eval_strategy="steps", eval_steps=4, load_best_model_at_end=True,
                   metric_for_best_model="loss", greater_is_better=False, save_total_limit=5),
        rifle=RifleConfig(**RIFLE),
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    expected = ViTForImageClassification.from_pretrained(best).state_dict()
    assert _same(_state(trainer.model), {k: v for k, v in expected.items()})
    assert checkpoint_mismatches(trainer.model, best) == []


# ------------------------------------------------------------------------------------------- recipes
def _folder(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for c, name in enumerate(("ant", "bee", "cat")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(50 + 70 * c, 25, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def _recipe(name: str):
    if name == "timm":
        sys.path.insert(0, str(ROOT / "recipes"))
        import train_timm

        return train_timm.main
    spec = importlib.util.spec_from_file_location("train_hf_reliability", ROOT / "recipes" / "train_hf.py")
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module.main


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["timm", "hf"])
def test_resume_with_dropout_and_disturb_label_is_exact(recipe, tmp_path):
    """The stochastic regularizers draw the same masks/labels after a mid-run resume."""
    data = _folder(tmp_path / "data")
    noisy = ["--drop_rate", "0.3", "--disturb_label", "0.3", "--seed", "0", "--dataset", str(data)]
    if recipe == "timm":
        args = [*noisy, "--model", "test_resnet", "--no-pretrained", "--image_size", "32", "--batch_size", "8",
                "--quiet", "--num_epochs", "2", "--checkpointing_steps", "2"]
    else:
        vit = tmp_path / "vit"
        tiny_vit(num_labels=2, image_size=16).save_pretrained(vit)
        from transformers import ViTImageProcessor

        ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(vit)
        args = [*noisy, "--model_name_or_path", str(vit), "--per_device_train_batch_size", "8", "--num_train_epochs",
                "2", "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "20", "--disable_tqdm", "true"]
    main = _recipe(recipe)
    main([*args, "--output_dir", str(tmp_path / "full")])
    run = tmp_path / "resumed"
    run.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", run / "checkpoint-2")  # mid epoch 1
    main([*args, "--output_dir", str(run), "--resume_from_checkpoint", "latest"])
    assert _same(load_file(str(run / "model.safetensors")), load_file(str(tmp_path / "full" / "model.safetensors")))
    full = json.loads((tmp_path / "full" / "history.json").read_text())
    resumed = json.loads((run / "history.json").read_text())
    assert [r.get("validation_top1") for r in resumed] == [r.get("validation_top1") for r in full]
