"""RifleCallback / RifleTrainer inside a real `Trainer.train()` on a tiny model and generated images."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import ImageDataset, tiny_convnext, tiny_vit
from transformers import Trainer, TrainerCallback, TrainingArguments

from rifle_hf import RifleCallback, RifleConfig, RifleTrainer
from rifle_hf.callback import HEAD_LR_LOG_KEY, REINIT_LOG_KEY


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        learning_rate=0.05,
        optim="sgd",
        num_train_epochs=4,
        logging_steps=4,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _reinit_steps(trainer) -> list[int]:
    return [e["step"] for e in trainer.state.log_history if REINIT_LOG_KEY in e]


@pytest.mark.parametrize("trainer_cls", [Trainer, RifleTrainer])
def test_reinits_at_epoch_ends(tmp_path, trainer_cls):
    # 64 images / batch 8 = 8 steps per epoch; 4 epochs, R=3 -> end of epochs 1, 2, 3
    trainer = trainer_cls(
        model=tiny_vit(), args=_args(tmp_path), train_dataset=ImageDataset(64),
        callbacks=[RifleCallback(num_reinits=3)],
    )
    trainer.train()
    assert _reinit_steps(trainer) == [8, 16, 24]
    cb = [c for c in trainer.callback_handler.callbacks if isinstance(c, RifleCallback)][0]
    assert [h["step"] for h in cb.history] == [8, 16, 24]
    assert [round(h["epoch"]) for h in cb.history] == [1, 2, 3]


def test_reinits_with_max_steps(tmp_path):
    trainer = RifleTrainer(
        model=tiny_vit(), args=_args(tmp_path, max_steps=20), train_dataset=ImageDataset(64),
        rifle=RifleConfig(num_reinits=3),
    )
    trainer.train()
    assert _reinit_steps(trainer) == [5, 10, 15]


class HeadWatch(TrainerCallback):
    """Records whether the head changed inside a gradient-accumulation window (it must not)."""

    def __init__(self, head: torch.nn.Module) -> None:
        self.head, self.at_step_end, self.changed_mid_accumulation, self.substeps = head, None, False, 0

    def on_step_end(self, args, state, control, **kwargs):
        self.at_step_end = self.head.weight.detach().clone()

    def on_substep_end(self, args, state, control, **kwargs):
        self.substeps += 1
        if self.at_step_end is not None and not torch.equal(self.head.weight, self.at_step_end):
            self.changed_mid_accumulation = True


def test_gradient_accumulation_reinits_on_optimizer_steps(tmp_path):
    # batch 4 x accumulation 2: 16 micro-batches, 8 optimizer steps per epoch
    trainer = RifleTrainer(
        model=tiny_vit(),
        args=_args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2),
        train_dataset=ImageDataset(64),
        rifle=RifleConfig(num_reinits=3),
    )
    watch = HeadWatch(trainer.model.classifier)
    trainer.add_callback(watch)
    trainer.train()
    assert _reinit_steps(trainer) == [8, 16, 24]
    assert watch.substeps == 32 and not watch.changed_mid_accumulation


def test_cyclic_head_lr_restarts_at_each_reinit(tmp_path):
    trainer = RifleTrainer(
        model=tiny_vit(), args=_args(tmp_path, logging_steps=1, lr_scheduler_type="constant"),
        train_dataset=ImageDataset(64), rifle=RifleConfig(num_reinits=1),
    )
    trainer.train()
    head_lr = {e["step"]: e[HEAD_LR_LOG_KEY] for e in trainer.state.log_history if HEAD_LR_LOG_KEY in e}
    # 32 steps, re-init after step 16: the head LR decays towards 0, then restarts at the base LR
    assert head_lr[16] == pytest.approx(0.05)  # set at step 16's end for step 17
    assert head_lr[15] < 0.001 and head_lr[31] < 0.001
    assert head_lr[8] == pytest.approx(0.025, rel=0.05)
    # the backbone keeps Trainer's own (constant) schedule
    lrs = {e["step"]: e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e}
    assert set(lrs.values()) == {0.05}


def test_plain_trainer_with_cyclic_warns_and_keeps_training(tmp_path, caplog):
    trainer = Trainer(
        model=tiny_vit(), args=_args(tmp_path, num_train_epochs=2), train_dataset=ImageDataset(64),
        callbacks=[RifleCallback(num_reinits=1)],
    )
    with caplog.at_level(logging.WARNING, logger="rifle_hf.callback"):
        trainer.train()
    assert "RifleTrainer" in caplog.text
    assert _reinit_steps(trainer) == [8]


def test_too_many_reinits_fail_at_train_start(tmp_path):
    model = tiny_vit()
    before = {n: p.clone() for n, p in model.named_parameters()}
    trainer = RifleTrainer(
        model=model, args=_args(tmp_path, num_train_epochs=2), train_dataset=ImageDataset(64),
        rifle=RifleConfig(num_reinits=3),
    )
    with pytest.raises(ValueError, match="lower num_reinits"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing trained


def test_tensorboard_sees_the_reinits(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = RifleTrainer(
        model=tiny_vit(),
        args=_args(tmp_path, num_train_epochs=2, report_to="tensorboard"),
        train_dataset=ImageDataset(64), rifle=RifleConfig(num_reinits=1),
    )
    trainer.train()
    events = list(tmp_path.rglob("events.out.tfevents*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/rifle/reinit" in tags, tags
    assert [e.step for e in acc.Scalars("train/rifle/reinit")] == [8]


def _train_with_checkpoints(tmp_path, resume_from=None, **kw):
    # ConvNext: transformers 5.25 resumes it exactly (a ViT checkpoint loses its encoder on resume;
    # tests/reliability covers that case).
    args = _args(tmp_path, save_strategy="steps", save_steps=4, **kw)
    trainer = RifleTrainer(
        model=tiny_convnext(), args=args, train_dataset=ImageDataset(64), rifle=RifleConfig(num_reinits=3),
    )
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("resume_step", [4, 8, 12])  # before, at and after the first re-init (step 8)
def test_resume_has_same_history_and_weights(tmp_path, resume_step):
    full = _train_with_checkpoints(tmp_path / "full")
    resumed = _train_with_checkpoints(
        tmp_path / "full", resume_from=str(tmp_path / "full" / f"checkpoint-{resume_step}")
    )
    assert _reinit_steps(resumed) == [8, 16, 24]
    cb = [c for c in resumed.callback_handler.callbacks if isinstance(c, RifleCallback)][0]
    assert [h["step"] for h in cb.history] == [8, 16, 24]
    for (n, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), f"{n} differs after resuming from step {resume_step}"
