"""RIFLE for `transformers.Trainer`: a small callback, and a Trainer subclass for the extras.

``Trainer(..., callbacks=[RifleCallback(num_reinits=3)])`` re-initializes the head on schedule, resumes
correctly and records every re-init in ``trainer.state.log_history``. `RifleTrainer` (same arguments as
`Trainer`, plus ``rifle=RifleConfig(...)``) additionally gives the head its own param group, which the
reference's cyclic head LR needs, and puts ``rifle/*`` values into the logs every reporter sees
(TensorBoard, W&B, ...).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState, TrainerControl, TrainerState
from transformers.training_args import TrainingArguments

from .heads import unwrap_model
from .optim import head_param_groups, split_head_param_groups
from .schedule import ReinitEvent, RifleConfig, RifleScheduler

logger = logging.getLogger(__name__)

REINIT_LOG_KEY = "rifle/reinit"
HEAD_LR_LOG_KEY = "rifle/head_lr"


def checkpoint_mismatches(model: torch.nn.Module, checkpoint_dir: str | os.PathLike) -> list[str] | None:
    """Names of ``model``'s tensors that differ from those saved in ``checkpoint_dir`` ([] = all equal).

    None when the folder holds no full-model weights to compare (e.g. a PEFT adapter checkpoint). Keys
    are matched after the same conversion ``from_pretrained`` applies: transformers 5 saves some
    architectures (ViT, ...) under legacy names, so a raw key-by-key comparison would be meaningless.
    """
    from .hf_training import CheckpointLoadError, read_checkpoint_state_dict

    base = unwrap_model(model)
    target = base.state_dict()
    try:
        source = read_checkpoint_state_dict(checkpoint_dir)
    except CheckpointLoadError:
        return None
    if not all(k in source for k in target) and hasattr(type(base), "from_pretrained"):
        try:
            config = copy.deepcopy(base.config)
            source = type(base).from_pretrained(os.fspath(checkpoint_dir), config=config).state_dict()
        except (RuntimeError, OSError, ValueError, AttributeError):
            pass  # the keys stay unmatched and are reported below
    return [
        k for k, v in target.items()
        if k not in source or source[k].shape != v.shape or not torch.equal(source[k].to(v.dtype), v.cpu())
    ]


def updates_per_epoch(train_dataloader: Any, gradient_accumulation_steps: int) -> int | None:
    """Optimizer steps per epoch, computed as `Trainer` does (None for loaders without a length)."""
    try:
        batches = len(train_dataloader)
    except TypeError:
        return None
    return max(math.ceil(batches / gradient_accumulation_steps), 1)


class RifleCallback(TrainerCallback, ExportableState):
    """Re-initializes the classifier head on RIFLE's schedule inside `transformers.Trainer`.

    Accepts a `RifleConfig` or its fields as keyword arguments:
    ``RifleCallback(num_reinits=3)`` == ``RifleCallback(RifleConfig(num_reinits=3))``.

    Re-inits happen at ``on_step_end``, i.e. only after a real optimizer step (never inside gradient
    accumulation) and before that step's checkpoint is written, so a checkpoint always contains the
    re-inits up to its step. The history travels in ``TrainerState.stateful_callbacks``: a resumed run
    neither repeats nor skips a re-init.
    """

    def __init__(self, config: RifleConfig | None = None, **kwargs: Any) -> None:
        if config is not None and kwargs:
            raise ValueError("RifleCallback: pass a RifleConfig or keyword arguments, not both.")
        self.config = config if config is not None else RifleConfig(**kwargs)
        self.history: list[dict[str, Any]] = []
        self.scheduler: RifleScheduler | None = None
        self._pending_logs: dict[str, float] = {}

    # -- ExportableState ----------------------------------------------------------------------------
    def state(self) -> dict:
        points = list(self.scheduler.points) if self.scheduler is not None else []
        return {"args": self.config.to_dict(), "attributes": {"history": list(self.history), "points": points}}

    def pop_pending_logs(self) -> dict[str, float]:
        logs, self._pending_logs = self._pending_logs, {}
        return logs

    # -- events ---------------------------------------------------------------------------------------
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        train_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("RifleCallback needs the model; use it inside transformers.Trainer.")
        if state.global_step > 0:
            self._check_resumed_weights(args, state, model)
        config = self.config
        per_epoch = updates_per_epoch(train_dataloader, args.gradient_accumulation_steps)
        unit = config.unit
        if unit == "auto":
            unit = "step" if args.max_steps > 0 or per_epoch is None else "epoch"
        if unit == "epoch" and per_epoch is None:
            raise ValueError(
                "RifleCallback: unit='epoch' needs a training dataloader with a length; "
                "use unit='step' with max_steps for iterable datasets."
            )
        total = state.max_steps if unit == "step" else state.max_steps / per_epoch
        if config.seed is None:
            config = replace(config, seed=args.seed)
        if config.head_lr == "cyclic" and (optimizer is None or not head_param_groups(optimizer)):
            logger.warning(
                "RifleCallback: head_lr='cyclic' needs the head in its own optimizer param group; this "
                "Trainer's optimizer has none, so the head follows the main LR schedule (head_lr='none'). "
                "Use rifle_hf.RifleTrainer for the reference's cyclic head LR."
            )
            config = replace(config, head_lr="none")
        self.scheduler = RifleScheduler(
            model, config, total=total, unit=unit, updates_per_epoch=per_epoch, optimizer=optimizer
        )
        self._restore_history(state)
        self.scheduler.step_update(state.global_step)  # head LR for the first step (also on resume)
        points = self.scheduler.point_updates or []
        logger.info("RIFLE: %d re-init(s) at optimizer steps %s (%s)", len(points), points, config.head_lr)

    @staticmethod
    def _check_resumed_weights(args: TrainingArguments, state: TrainerState, model: torch.nn.Module) -> None:
        """Fail if a resumed run does not hold its checkpoint's weights.

        ``Trainer.train(resume_from_checkpoint=...)`` loads weights with ``strict=False``: keys saved under
        legacy names (transformers 5 writes ViT that way) are skipped with a warning and training goes on
        from the un-resumed weights. We only see ``output_dir/checkpoint-<global_step>``; it is checked when
        its ``trainer_state.json`` is the state just resumed (same log history), i.e. when it is the
        checkpoint we resumed from. Sharded models (FSDP, DeepSpeed) are left to their own loaders.
        """
        folder = Path(args.output_dir or ".") / f"checkpoint-{state.global_step}"
        if not args.output_dir or args.fsdp or args.deepspeed or not folder.is_dir():
            return
        try:
            saved = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if saved.get("global_step") != state.global_step or saved.get("log_history") != state.log_history:
            return  # another run's checkpoint at the same step: not the one resumed from
        wrong = checkpoint_mismatches(model, folder)
        if wrong:
            total = len(unwrap_model(model).state_dict())
            raise ValueError(
                f"RifleCallback: resumed from {folder}, but {len(wrong)} of the model's {total} tensors "
                f"differ from it (e.g. {wrong[0]}): Trainer's resume skipped weights the checkpoint stores "
                "under other names; train with rifle_hf.RifleTrainer, which loads checkpoints strictly"
            )

    def _restore_history(self, state: TrainerState) -> None:
        stored = state.stateful_callbacks.get(type(self).__name__) if state.stateful_callbacks else None
        if isinstance(stored, list):  # several RifleCallbacks: take the first
            stored = stored[0] if stored else None
        attributes = (stored or {}).get("attributes", {})
        # A fresh run starts with no history, even if this callback object trained before.
        history = [] if state.global_step == 0 else attributes.get("history") or self.history
        if not history and state.global_step > 0:
            # A checkpoint without our state: every point up to its step had fired before it was written.
            history = [
                asdict(ReinitEvent(index=i, step=s, epoch=None))
                for i, s in enumerate(self.scheduler.point_updates or [])
                if s <= state.global_step
            ]
        saved_points = attributes.get("points") if state.global_step > 0 else None
        self.scheduler.load_state_dict({"history": history, "points": saved_points or []})
        self.history = [asdict(e) for e in self.scheduler.history]

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.scheduler is None:
            return
        before = self.scheduler.num_done
        self.scheduler.step_update(state.global_step)
        if self.scheduler.num_done > before:
            for event in self.scheduler.history[before:]:
                event.epoch = state.epoch
            self.history = [asdict(e) for e in self.scheduler.history]
            self._pending_logs[REINIT_LOG_KEY] = float(self.scheduler.num_done)
            control.should_log = True

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        # In a plain Trainer the reporters ran before us: keep the record in log_history at least.
        pending = self.pop_pending_logs()
        if pending:
            state.log_history.append({**pending, "epoch": state.epoch, "step": state.global_step})


class RifleTrainer(Trainer):
    """`transformers.Trainer` with RIFLE wired in.

    ``RifleTrainer(model, args, ..., rifle=RifleConfig(num_reinits=3))`` (or a `RifleCallback` in
    ``callbacks``). Compared with a plain Trainer it (1) moves the head into its own optimizer param
    groups, keeping Trainer's decay / no-decay split, so the head can follow the cyclic LR,
    (2) merges ``rifle/reinit`` and ``rifle/head_lr`` into the logs all reporters receive, and
    (3) loads checkpoints strictly (every tensor checked) on resume and for ``load_best_model_at_end``,
    where Trainer's own load silently skips weights saved under legacy names.
    """

    def __init__(self, *args: Any, rifle: RifleConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if rifle is not None:
            if self._rifle_callbacks():
                raise ValueError("RifleTrainer: pass rifle=... or a RifleCallback in callbacks, not both.")
            self.add_callback(RifleCallback(rifle))
        if not self._rifle_callbacks():
            raise ValueError("RifleTrainer: pass rifle=RifleConfig(...) or callbacks=[RifleCallback(...)].")

    def _rifle_callbacks(self) -> list[RifleCallback]:
        return [cb for cb in self.callback_handler.callbacks if isinstance(cb, RifleCallback)]

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        for cb in self._rifle_callbacks():
            if cb.config.head_lr == "cyclic":
                split_head_param_groups(optimizer, model if model is not None else self.model, cb.config.head)
        return optimizer

    def _loads_plain_weights(self, model: torch.nn.Module, checkpoint_dir: str | os.PathLike) -> bool:
        """A full-model weights file that a plain state_dict load handles (not FSDP/DeepSpeed/PEFT)."""
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            return False
        if hasattr(model, "peft_config") and hasattr(model, "active_adapters"):
            return False
        names = ("model.safetensors", "pytorch_model.bin")
        folder = Path(checkpoint_dir)
        return any((folder / n).is_file() for name in names for n in (name, f"{name}.index.json"))

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        """Resume strictly: Trainer's own load (``strict=False``) silently skips weights saved under legacy
        names (e.g. ViT in transformers 5) and would continue from the un-resumed model."""
        target = model if model is not None else self.model
        if not self._loads_plain_weights(target, resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        from .hf_training import load_checkpoint_weights_strict

        load_checkpoint_weights_strict(target, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the same strict load as on resume."""
        best = self.state.best_model_checkpoint
        if not best or not self._loads_plain_weights(self.model, best):
            super()._load_best_model()
            return
        from .hf_training import load_checkpoint_weights_strict

        load_checkpoint_weights_strict(self.model, best)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        for cb in self._rifle_callbacks():
            logs.update(cb.pop_pending_logs())
        if self.optimizer is not None:
            groups = head_param_groups(self.optimizer)
            if groups and "loss" in logs:
                logs[HEAD_LR_LOG_KEY] = groups[0]["lr"]
        super().log(logs, *args, **kwargs)
