"""Reusable pieces of ``recipes/train_hf.py``: RIFLE + the paper's competitors inside `transformers.Trainer`.

What is here, and why it is not just ``Trainer``:

* `RifleTrainingArguments`: ``TrainingArguments`` with the RIFLE reference's defaults (SGD momentum 0.9,
  weight decay 1e-4, lr 0.01, batch 32, cosine) and ``--mixed_precision no|bf16|fp16``.
* `RecipeTrainer` / `RifleRecipeTrainer` (= `RecipeTrainerMixin` on ``Trainer`` / `rifle_hf.RifleTrainer`): adds
  L2-SP to the training loss, the ``cyclic`` LR schedule with restarts at RIFLE's points, atomic checkpoints
  (written to ``checkpoint-N.tmp/`` and renamed), and a strict checkpoint load on resume.
* `load_checkpoint_weights_strict`: Trainer's resume calls ``model.load_state_dict(..., strict=False)`` on the raw
  checkpoint file. transformers 5 writes some architectures (e.g. ViT) under legacy key names, so that load
  silently misses every renamed tensor and training continues from the un-resumed weights. We load through
  ``from_pretrained`` (which applies the key conversion) when the raw keys do not match, then check every tensor.
* `TrainCollator`: the per-batch training randomness (augmentation, DisturbLabel) drawn from a generator seeded
  by (seed, rank, batch index), so a resumed run sees exactly the batches an uninterrupted one would.
* model / processor loading with the offline fallback for ``timm/...`` ids, and the per-epoch history rows.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    IntervalStrategy,
    SaveStrategy,
    SchedulerType,
    rotate_checkpoints,
)
from transformers.training_args import OptimizerNames

from .callback import RifleTrainer
from .data import HFImageCollator, TrainSample
from .regularizers import L2SP, cyclic_cosine_lambda, disturb_labels
from .schedule import RifleConfig

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointLoadError",
    "CheckpointLoadReport",
    "RecipeTrainer",
    "RecipeTrainerMixin",
    "RifleRecipeTrainer",
    "RifleTrainingArguments",
    "TrainCollator",
    "checkpoint_problems",
    "cyclic_restart_steps",
    "epoch_history",
    "find_complete_checkpoint",
    "forward_accepts",
    "load_checkpoint_weights_strict",
    "load_image_classifier",
    "lr_scheduler_type_for",
    "planned_updates",
    "processor_for_image_size",
    "read_checkpoint_state_dict",
    "resolve_resume_checkpoint",
    "rifle_reinit_steps",
]

#: Extra state the recipe keeps in each checkpoint (next to Trainer's own files).
RECIPE_STATE_NAME = "rifle_hf_state.json"
TRAINER_STATE_NAME = "trainer_state.json"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RifleTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the RIFLE reference's defaults; every Trainer flag still works.

    ``--mixed_precision bf16|fp16`` sets ``bf16``/``fp16``. On a machine without an accelerator ``use_cpu`` is set:
    transformers needs it for CPU autocast and to run several CPU processes (gloo) under torchrun/accelerate.
    """

    output_dir: str | None = field(
        default="outputs/train_hf", metadata={"help": "Where checkpoints and the final model are written."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow an output_dir that already holds a run (it is not emptied)."}
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = field(
        default="no", metadata={"help": "Autocast precision: no, bf16 or fp16 (sets --bf16 / --fp16)."}
    )
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Batch size per device for training."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Batch size per device for evaluation."})
    learning_rate: float = field(default=0.01, metadata={"help": "Initial learning rate (the reference: 0.01)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "Weight decay (the reference: 1e-4)."})
    optim: OptimizerNames | str = field(default="sgd", metadata={"help": "Optimizer (the reference: SGD)."})
    optim_args: str | None = field(default="momentum=0.9", metadata={"help": "Optimizer arguments, e.g. momentum."})
    lr_scheduler_type: SchedulerType | str = field(
        default="cosine", metadata={"help": "LR schedule (see also --lr_schedule)."}
    )
    eval_strategy: IntervalStrategy | str = field(default="epoch", metadata={"help": "When to evaluate."})
    save_strategy: SaveStrategy | str = field(default="epoch", metadata={"help": "When to write checkpoints."})
    logging_strategy: IntervalStrategy | str = field(default="epoch", metadata={"help": "When to log."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept (oldest deleted)."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep dataset columns (our datasets yield (image, label) tuples)."}
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={"help": "Hide nan/inf losses from the logs (checks every step: a device sync, so off by default)."},
    )

    def __post_init__(self) -> None:
        if self.mixed_precision == "bf16":
            self.bf16 = True
        elif self.mixed_precision == "fp16":
            self.fp16 = True
        elif self.mixed_precision != "no":
            raise ValueError(f"--mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if not _has_accelerator():
            # CPU-only machine: transformers needs use_cpu for CPU autocast and for multi-process (gloo) runs.
            self.use_cpu = True
            self.dataloader_pin_memory = False
        super().__post_init__()

    def __getstate__(self) -> dict[str, Any]:
        """Pickles never hold Hub tokens: Trainer writes ``torch.save(args)`` as ``training_args.bin`` into
        every checkpoint and the output folder (which ``--push_to_hub`` uploads). ``TrainingArguments``
        redacts ``*_token`` fields in its repr and ``to_dict``, not in its pickle."""
        state = dict(self.__dict__)
        for key, value in state.items():
            if key.endswith("_token") and isinstance(value, str):
                state[key] = None
        return state

    def __copy__(self) -> RifleTrainingArguments:  # in-process copies keep the token
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def __deepcopy__(self, memo: dict) -> RifleTrainingArguments:
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone


def _has_accelerator() -> bool:
    accel = getattr(torch, "accelerator", None)
    if accel is not None and hasattr(accel, "is_available"):
        return bool(accel.is_available())
    return torch.cuda.is_available()


def lr_scheduler_type_for(lr_schedule: str, current: str) -> str:
    """HF scheduler name for ``--lr_schedule`` (``cyclic`` is built by the trainer; ``cosine`` keeps the user's
    ``--lr_scheduler_type``, whose default is cosine)."""
    if lr_schedule == "constant":
        return "constant_with_warmup"
    return str(getattr(current, "value", current))


# ----------------------------------------------------------------------------------------------------------------
# Run length and schedules
# ----------------------------------------------------------------------------------------------------------------


def planned_updates(num_train: int, args: TrainingArguments) -> tuple[int, int]:
    """``(optimizer steps per epoch, total optimizer steps)`` as Trainer + Accelerate will count them.

    Computed before the Trainer exists, so a RIFLE schedule that does not fit fails before anything is written.
    """
    batch = args.per_device_train_batch_size * max(1, args.n_gpu)
    batches = num_train // batch if args.dataloader_drop_last else math.ceil(num_train / batch)
    per_process = math.ceil(batches / max(1, args.world_size))  # Accelerate's even_batches sharding
    per_epoch = max(math.ceil(per_process / args.gradient_accumulation_steps), 1)
    total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)
    return per_epoch, total


def _unit(config: RifleConfig, by_steps: bool) -> str:
    if config.unit == "auto":
        return "step" if by_steps else "epoch"
    return config.unit


def _points_in_steps(config: RifleConfig, per_epoch: int, total_steps: int, by_steps: bool) -> list[int]:
    unit = _unit(config, by_steps)
    total = total_steps if unit == "step" else total_steps / per_epoch
    points = config.resolve_points(total, unit)
    return [round(p) if unit == "step" else round(p * per_epoch) for p in points]


def rifle_reinit_steps(config: RifleConfig, per_epoch: int, total_steps: int, by_steps: bool) -> list[int]:
    """Optimizer steps of RIFLE's re-inits; raises ValueError (one line) when the run is too short."""
    return _points_in_steps(config, per_epoch, total_steps, by_steps)


def cyclic_restart_steps(
    rifle: RifleConfig | None, lr_cycles: int | None, per_epoch: int, total_steps: int, by_steps: bool
) -> list[int]:
    """Restart steps of ``--lr_schedule cyclic``: RIFLE's own points (same period), or ``lr_cycles`` restarts
    laid out the way RIFLE would lay them out (3 when neither is given)."""
    if rifle is not None and lr_cycles in (None, rifle.num_reinits):
        config = rifle
    else:
        restarts = lr_cycles if lr_cycles is not None else 3
        if restarts < 0:
            raise ValueError(f"--lr_cycles must be >= 0, got {restarts}")
        config = RifleConfig(
            num_reinits=restarts,
            unit=rifle.unit if rifle is not None else "auto",
            no_reinit_in_last=rifle.no_reinit_in_last if rifle is not None else 0.0,
        )
    try:
        return _points_in_steps(config, per_epoch, total_steps, by_steps)
    except ValueError as err:
        raise ValueError(f"--lr_schedule cyclic: {str(err).removeprefix('RIFLE: ')}") from None


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


class CheckpointLoadError(ValueError):
    """A checkpoint's weights could not be loaded completely into the model."""


@dataclass
class CheckpointLoadReport:
    """What `load_checkpoint_weights_strict` did: ``via`` is ``"direct"`` when the file's keys are the model's,
    ``"from_pretrained"`` when they needed transformers' key conversion (e.g. legacy ViT names)."""

    checkpoint: str
    num_tensors: int
    via: str
    renamed_file_keys: list[str] = field(default_factory=list)


def checkpoint_problems(path: str | os.PathLike, *, need_training_state: bool = True) -> list[str]:
    """Why ``path`` is not a complete Trainer checkpoint ([] when it is).

    Trainer writes ``trainer_state.json`` last; we also check that it parses and the weights are present, so a run
    killed while saving is never resumed from.
    """
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is not a directory"]
    problems = []
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        problems.append("no model weights (model.safetensors)")
    state_file = path / TRAINER_STATE_NAME
    try:
        json.loads(state_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append(f"no {TRAINER_STATE_NAME}")
    except (ValueError, OSError):
        problems.append(f"unreadable {TRAINER_STATE_NAME} (partly written?)")
    if need_training_state and not (path / "optimizer.pt").is_file():
        problems.append("no optimizer.pt (saved with --save_only_model?)")
    return problems


def _checkpoint_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for child in output_dir.iterdir() if output_dir.is_dir() else []:
        name = child.name
        if child.is_dir() and name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") and name.split("-", 1)[1].isdigit():
            found.append((int(name.split("-", 1)[1]), child))
    return sorted(found)


def find_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``checkpoint-N`` in ``output_dir`` (incomplete ones are skipped with a warning)."""
    for _, path in reversed(_checkpoint_dirs(Path(output_dir))):
        problems = checkpoint_problems(path)
        if not problems:
            return path
        logger.warning("skipping incomplete checkpoint %s: %s", path, "; ".join(problems))
    return None


def resolve_resume_checkpoint(value: str | None, output_dir: str | os.PathLike) -> str | None:
    """``--resume_from_checkpoint PATH|latest`` -> a complete checkpoint directory (or None).

    ``latest`` is the newest complete checkpoint in ``output_dir``; PATH is a checkpoint folder, or a run folder
    (its newest complete checkpoint)."""
    if value is None or value == "":
        return None
    if value.lower() in ("latest", "last", "true"):
        found = find_complete_checkpoint(output_dir)
        if found is None:
            raise ValueError(
                f"--resume_from_checkpoint latest: no complete checkpoint-N folder in {output_dir}; "
                "check --output_dir or start without --resume_from_checkpoint"
            )
        return str(found)
    if Path(value).is_dir() and not (Path(value) / TRAINER_STATE_NAME).exists() and _checkpoint_dirs(Path(value)):
        found = find_complete_checkpoint(value)
        if found is not None:
            return str(found)
    problems = checkpoint_problems(value)
    if problems:
        raise ValueError(
            f"--resume_from_checkpoint {value}: not a complete Trainer checkpoint ({'; '.join(problems)}); "
            "pass a checkpoint-N folder or 'latest'"
        )
    return str(value)


def read_checkpoint_state_dict(checkpoint_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors exactly as stored in a ``save_pretrained`` folder (safetensors, sharded or not; .bin safely)."""
    from safetensors.torch import load_file

    root = Path(checkpoint_dir)
    if (root / "model.safetensors").is_file():
        return load_file(root / "model.safetensors", device="cpu")
    for index_name, loader in (
        ("model.safetensors.index.json", lambda p: load_file(p, device="cpu")),
        ("pytorch_model.bin.index.json", lambda p: torch.load(p, map_location="cpu", weights_only=True)),
    ):
        index = root / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(loader(root / shard))
            return state
    if (root / "pytorch_model.bin").is_file():
        return torch.load(root / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise CheckpointLoadError(f"no model weights in {root}; pass a folder written by Trainer or save_pretrained")


def load_checkpoint_weights_strict(model: nn.Module, checkpoint_dir: str | os.PathLike) -> CheckpointLoadReport:
    """Load a checkpoint's weights into ``model`` in place and verify every tensor; raise if any is missing.

    When the stored keys are the model's own, they are copied directly. Otherwise (transformers 5 saves e.g. ViT
    under legacy names like ``vit.encoder.layer.0.attention.attention.key``, which a plain ``load_state_dict``
    silently skips) the folder is loaded with ``type(model).from_pretrained``, which applies the key conversion,
    and its tensors are copied over. Either way, every entry of ``model.state_dict()`` must then equal the
    checkpoint's value, or `CheckpointLoadError` is raised. The same Parameter objects are kept (optimizer safe).
    """
    from .heads import unwrap_model

    base = unwrap_model(model)
    target = base.state_dict()
    raw = read_checkpoint_state_dict(checkpoint_dir)
    wrong_shape = [k for k, v in target.items() if k in raw and tuple(raw[k].shape) != tuple(v.shape)]
    if wrong_shape:
        key = wrong_shape[0]
        raise CheckpointLoadError(
            f"checkpoint {checkpoint_dir} does not fit the model: {key} has shape {tuple(raw[key].shape)} there but "
            f"{tuple(target[key].shape)} in the model; resume with the model (and labels) it was written for"
        )
    direct = all(k in raw for k in target)
    renamed: list[str] = []
    if direct:
        source, via = raw, "direct"
    else:
        renamed = sorted(k for k in raw if k not in target)
        if not hasattr(type(base), "from_pretrained"):
            missing = [k for k in target if k not in raw]
            raise CheckpointLoadError(
                f"checkpoint {checkpoint_dir} lacks {len(missing)} of the model's tensors (e.g. {missing[:2]}); "
                "resume with the model it was written for"
            )
        try:
            loaded = type(base).from_pretrained(os.fspath(checkpoint_dir), config=copy.deepcopy(base.config))
        except (RuntimeError, OSError, ValueError) as err:
            raise CheckpointLoadError(
                f"checkpoint {checkpoint_dir} does not fit the model ({_first_line(err)}); resume with the model it "
                "was written for"
            ) from err
        source, via = loaded.state_dict(), "from_pretrained"
    missing = [k for k, v in target.items() if k not in source or tuple(source[k].shape) != tuple(v.shape)]
    if missing:
        raise CheckpointLoadError(
            f"checkpoint {checkpoint_dir} does not hold {len(missing)} of the model's tensors (e.g. {missing[:2]}), "
            "even after transformers' key conversion; resume with the model it was written for"
        )
    with torch.no_grad():
        for key, tensor in target.items():
            tensor.copy_(source[key].to(device=tensor.device, dtype=tensor.dtype))
    after = base.state_dict()
    wrong = [k for k in target if not torch.equal(after[k].cpu(), source[k].to(after[k].dtype).cpu())]
    if wrong:
        raise CheckpointLoadError(
            f"checkpoint {checkpoint_dir}: {len(wrong)} tensors differ after loading (e.g. {wrong[:2]}); "
            "the model shares or ties weights the checkpoint stores separately"
        )
    if via != "direct":
        logger.warning(
            "checkpoint %s stores %d tensors under other names (e.g. %s): loaded through %s.from_pretrained's key "
            "conversion and verified (a plain load_state_dict would have skipped them)",
            checkpoint_dir, len(renamed), renamed[:1], type(base).__name__,
        )
    return CheckpointLoadReport(str(checkpoint_dir), len(target), via, renamed)


# ----------------------------------------------------------------------------------------------------------------
# Training batches: seeded augmentation + DisturbLabel
# ----------------------------------------------------------------------------------------------------------------


def _batch_seed(seed: int, rank: int, index: int, stream: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + index * 104_729 + stream * 15_485_863 + 12_345) % (2**63 - 1)


class TrainCollator:
    """``Trainer(data_collator=...)`` around an `HFImageCollator`, adding resumable training randomness.

    Training batches (items of a ``train=True`` dataset) get their augmentation from a generator seeded by
    ``(seed, rank, batch index)`` and, with ``disturb_label > 0``, DisturbLabel (Xie et al., 2016) on their labels
    from a second such stream. The batch index survives resume (the trainer stores it in the checkpoint), so a
    resumed run draws exactly what the uninterrupted one would. Evaluation batches pass through unchanged.
    ``extra_inputs`` are added to every batch (e.g. ``interpolate_pos_encoding=True`` for a ViT at another size).
    With DataLoader worker processes the indices are per worker (random, but not resumable exactly).
    """

    def __init__(
        self,
        base: HFImageCollator,
        *,
        seed: int = 0,
        rank: int = 0,
        disturb_label: float = 0.0,
        num_labels: int | None = None,
        extra_inputs: Mapping[str, Any] | None = None,
    ) -> None:
        if disturb_label and not num_labels:
            raise ValueError("TrainCollator: disturb_label needs num_labels")
        if not 0.0 <= disturb_label <= 1.0:
            raise ValueError(f"--disturb_label must be in [0, 1], got {disturb_label}")
        self.base, self.seed, self.rank = base, int(seed), int(rank)
        self.disturb_label, self.num_labels = float(disturb_label), num_labels
        self.extra_inputs = dict(extra_inputs or {})
        self.next_index = 0  # index of the next training batch
        self.labels_seen = 0
        self.labels_changed = 0
        self._worker_calls = 0

    def __call__(self, items: list) -> dict[str, Any]:
        train = bool(items) and all(isinstance(item, TrainSample) for item in items)
        if train:
            info = torch.utils.data.get_worker_info()
            if info is None:
                index, rank = self.next_index, self.rank
                self.next_index += 1
            else:  # a worker copy: its own stream, seeded per worker and epoch by the DataLoader
                index, rank = self._worker_calls, info.seed % (2**31)
                self._worker_calls += 1
            self.base.train_transform.generator.manual_seed(_batch_seed(self.seed, rank, index, 0))
        batch = self.base(items)
        if train and self.disturb_label > 0:
            generator = torch.Generator().manual_seed(_batch_seed(self.seed, rank, index, 1))
            labels = batch["labels"]
            new = disturb_labels(labels, self.num_labels, self.disturb_label, generator=generator)
            self.labels_seen += labels.numel()
            self.labels_changed += int((new != labels).sum())
            batch["labels"] = new
        batch.update(self.extra_inputs)
        return batch


# ----------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "active_adapters")


class RecipeTrainerMixin:
    """Mixed into ``Trainer`` / `RifleTrainer` by the recipe. Extra keyword arguments:

    * ``l2sp``: an `rifle_hf.regularizers.L2SP` built from the pretrained model; its penalty is added to the
      training loss and its parameters get ``weight_decay=0`` (the penalty replaces weight decay there).
    * ``lr_schedule="cyclic"`` (+ ``cyclic_rifle``, ``lr_cycles``): cosine restarting at RIFLE's points.
    * ``train_collator``: a `TrainCollator`, whose batch index is checkpointed for an exact resume.
    """

    def __init__(
        self,
        *args: Any,
        l2sp: L2SP | None = None,
        lr_schedule: str = "cosine",
        cyclic_rifle: RifleConfig | None = None,
        lr_cycles: int | None = None,
        train_collator: TrainCollator | None = None,
        **kwargs: Any,
    ) -> None:
        self.l2sp = l2sp
        self.lr_schedule = lr_schedule
        self.cyclic_rifle = cyclic_rifle
        self.lr_cycles = lr_cycles
        self.train_collator = train_collator
        self.cyclic_restarts: list[int] = []
        self.train_batches_consumed = 0
        self.checkpoint_loads: list[CheckpointLoadReport] = []
        self._l2sp_last: torch.Tensor | None = None
        self._train_batches_per_epoch: int | None = None
        self._staging_checkpoint: str | None = None
        super().__init__(*args, **kwargs)

    # -- optimizer / scheduler ----------------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        if self.l2sp is not None:  # the optimizer is not wrapped by Accelerate yet
            covered = {id(p) for p in self.l2sp.parameters(model if model is not None else self.model)}
            for group in list(optimizer.param_groups):
                mine = [p for p in group["params"] if id(p) in covered]
                if not mine or group.get("weight_decay", 0.0) == 0.0:
                    continue
                if len(mine) == len(group["params"]):
                    group["weight_decay"] = 0.0
                else:  # split: the covered parameters get a copy of the group without weight decay
                    group["params"] = [p for p in group["params"] if id(p) not in covered]
                    optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"},
                                               "params": mine, "weight_decay": 0.0})
        return optimizer

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        try:
            self._train_batches_per_epoch = len(loader)
        except TypeError:
            self._train_batches_per_epoch = None
        return loader

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_schedule != "cyclic" or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        batches = self._train_batches_per_epoch
        per_epoch = max(math.ceil(batches / self.args.gradient_accumulation_steps), 1) if batches else 1
        self.cyclic_restarts = cyclic_restart_steps(
            self.cyclic_rifle, self.lr_cycles, per_epoch, num_training_steps, by_steps=self.args.max_steps > 0
        )
        factor = cyclic_cosine_lambda(
            num_training_steps, None, self.args.get_warmup_steps(num_training_steps), restart_steps=self.cyclic_restarts
        )
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
        self._created_lr_scheduler = True
        logger.info("cyclic LR: cosine restarting at optimizer steps %s", self.cyclic_restarts)
        return self.lr_scheduler

    # -- loss ---------------------------------------------------------------------------------------------------
    def training_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        self.train_batches_consumed += 1
        return super().training_step(model, inputs, *args, **kwargs)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if self.l2sp is None or not model.training:
            return result
        penalty = self.l2sp.penalty(model)
        self._l2sp_last = penalty.detach()
        if return_outputs:
            loss, outputs = result
            return loss + penalty.to(loss.dtype), outputs
        return result + penalty.to(result.dtype)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            if self._l2sp_last is not None:
                logs["l2sp/penalty"] = float(self._l2sp_last)
            collator = self.train_collator
            if collator is not None and collator.disturb_label > 0 and collator.labels_seen:
                logs["disturb_label/changed"] = collator.labels_changed / collator.labels_seen
        super().log(logs, *args, **kwargs)

    # -- checkpoints --------------------------------------------------------------------------------------------
    def _get_output_dir(self, trial: Any) -> str:
        run_dir = super()._get_output_dir(trial)
        return self._staging_checkpoint if self._staging_checkpoint else run_dir

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Trainer's checkpoint, written under ``checkpoint-N.tmp/`` and renamed when complete."""
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, f"{name}.tmp")
        if self.args.should_save and os.path.isdir(staging):
            shutil.rmtree(staging)  # left over from a run killed while saving
        self.accelerator.wait_for_everyone()
        self._staging_checkpoint = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_checkpoint = None
        if self.args.should_save:
            with open(os.path.join(staging, name, RECIPE_STATE_NAME), "w", encoding="utf-8") as f:
                json.dump({"train_batches_consumed": self.train_batches_consumed}, f)
        self.accelerator.wait_for_everyone()  # every rank wrote its rng_state file
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            best = self.state.best_model_checkpoint
            if best and os.path.normpath(best) == os.path.normpath(os.path.join(staging, name)):
                self.state.best_model_checkpoint = final
            elif self.state.best_global_step and os.path.isdir(
                os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            ):
                self.state.best_model_checkpoint = os.path.join(
                    run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}"
                )
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
            )
        self.accelerator.wait_for_everyone()

    def _maybe_log_save_evaluate(self, *args: Any, **kwargs: Any) -> None:
        super()._maybe_log_save_evaluate(*args, **kwargs)
        self._refresh_checkpoint_state()

    def _refresh_checkpoint_state(self) -> None:
        """Put what happened after this step's checkpoint (an epoch-end evaluation runs after a step-based
        save of the same step) into that checkpoint's ``trainer_state.json``, atomically; otherwise a run
        resumed from it loses those results from its log and ``history.json``."""
        if not self.args.should_save:
            return
        state_file = Path(self._get_output_dir(None)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}" / (
            TRAINER_STATE_NAME
        )
        try:
            saved = json.loads(state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if saved.get("global_step") != self.state.global_step or saved.get("log_history") == self.state.log_history:
            return
        tmp = state_file.with_name(TRAINER_STATE_NAME + ".tmp")
        self.state.save_to_json(str(tmp))
        os.replace(tmp, state_file)

    def _plain_weights_load(self, model: nn.Module) -> bool:
        return not (
            getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False) or _is_peft(model)
        )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = model if model is not None else self.model
        if self._plain_weights_load(target):
            self.checkpoint_loads.append(load_checkpoint_weights_strict(target, resume_from_checkpoint))
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        state_file = Path(resume_from_checkpoint) / RECIPE_STATE_NAME
        consumed = None
        if state_file.is_file():
            consumed = int(json.loads(state_file.read_text(encoding="utf-8")).get("train_batches_consumed", 0))
        else:
            logger.warning(
                "%s has no %s: the training augmentation stream restarts (the run is not bitwise resumable)",
                resume_from_checkpoint, RECIPE_STATE_NAME,
            )
        self.train_batches_consumed = consumed or 0
        if self.train_collator is not None:
            self.train_collator.next_index = self.train_batches_consumed

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best and self._plain_weights_load(self.model) and not checkpoint_problems(best, need_training_state=False):
            self.checkpoint_loads.append(load_checkpoint_weights_strict(self.model, best))
            return
        super()._load_best_model()

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """The recipe writes its own card (rifle_hf.model_card); Trainer's would overwrite it on push."""
        if not (Path(self.args.output_dir) / "README.md").is_file():
            super().create_model_card(*args, **kwargs)


class RecipeTrainer(RecipeTrainerMixin, Trainer):
    """``Trainer`` + `RecipeTrainerMixin` (vanilla fine-tuning and the competitor methods)."""


class RifleRecipeTrainer(RecipeTrainerMixin, RifleTrainer):
    """`rifle_hf.RifleTrainer` + `RecipeTrainerMixin` (RIFLE, alone or with the competitor methods)."""


# ----------------------------------------------------------------------------------------------------------------
# Model + processor
# ----------------------------------------------------------------------------------------------------------------


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def load_image_classifier(
    name: str,
    *,
    label_names: Sequence[str],
    trust_remote_code: bool = False,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | None = None,
) -> tuple[nn.Module, Any, bool]:
    """``(model, image_processor, native_dropout)`` for any ``AutoModelForImageClassification`` checkpoint.

    The head is resized to ``label_names`` (``ignore_mismatched_sizes``), ``id2label`` set. ``timm/...`` ids whose
    weights ship offline (`rifle_hf.pretrained.OFFLINE_PRETRAINED`) still load when the Hub is unreachable.
    ``drop_path_rate`` goes to the config (``drop_path_rate``, or timm's ``model_args``); ``drop_rate`` only for timm
    wrappers (``native_dropout=True``); other models get Dropout before the head from the caller.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    from .pretrained import (
        _is_hub_unreachable,
        create_hf_timm_wrapper,
        hf_image_processor_for,
        offline_source_for,
    )

    id2label = {i: str(n) for i, n in enumerate(label_names)}
    label2id = {n: i for i, n in id2label.items()}
    hub = {k: v for k, v in {"revision": revision, "cache_dir": cache_dir, "token": token}.items() if v}
    # Always explicit: left unset, transformers asks on the terminal ([y/N]) whether to run a repo's code.
    hub["trust_remote_code"] = bool(trust_remote_code)
    offline_name = name.removeprefix("timm/") if name.startswith("timm/") else None
    try:
        config = AutoConfig.from_pretrained(name, **hub)
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err) and not trust_remote_code:
            raise ValueError(
                f"model {name!r} is defined by its own Python code (auto_map in its config), which is not run "
                "by default; pass --trust_remote_code true only if you have read and trust that code"
            ) from err
        if offline_name and _is_hub_unreachable(err) and offline_source_for(offline_name):
            model = create_hf_timm_wrapper(offline_name, num_labels=len(id2label), id2label=id2label)
            native = _set_timm_rates(model.config, drop_rate, drop_path_rate)
            if native or drop_path_rate:
                from transformers import TimmWrapperForImageClassification

                rebuilt = TimmWrapperForImageClassification(model.config)
                rebuilt.load_state_dict(model.state_dict())
                model = rebuilt
            return model, hf_image_processor_for(model), native
        where = "the Hugging Face Hub is unreachable and it is not cached" if _is_hub_unreachable(err) else (
            _first_line(err)
        )
        raise ValueError(
            f"cannot load model {name!r} ({where}); pass a Hub id you can download (or have cached) or a local "
            "folder written by save_pretrained"
        ) from err
    if drop_path_rate and config.model_type != "timm_wrapper" and not hasattr(config, "drop_path_rate"):
        raise ValueError(
            f"--drop_path_rate: {type(config).__name__} has no stochastic depth setting (no drop_path_rate in "
            "its config); drop the flag for this model"
        )
    native = _set_timm_rates(config, drop_rate, drop_path_rate) if config.model_type == "timm_wrapper" else False
    if drop_path_rate and config.model_type != "timm_wrapper":
        config.drop_path_rate = drop_path_rate
    config.num_labels = len(id2label)
    config.id2label, config.label2id = id2label, label2id
    try:
        model = AutoModelForImageClassification.from_pretrained(
            name, config=config, ignore_mismatched_sizes=True, **hub
        )
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(
            f"cannot load {name!r} as an image classifier ({_first_line(err)}); pass an "
            "AutoModelForImageClassification checkpoint"
        ) from err
    try:
        processor = AutoImageProcessor.from_pretrained(name, **hub)
    except (OSError, ValueError, KeyError) as err:
        if getattr(config, "model_type", None) == "timm_wrapper":
            processor = hf_image_processor_for(model)
        else:
            raise ValueError(
                f"no image processor for {name!r} ({_first_line(err)}); save one next to the model "
                "(image_processor.save_pretrained(folder))"
            ) from err
    return model, processor, native


def _set_timm_rates(config: Any, drop_rate: float, drop_path_rate: float) -> bool:
    """timm's native ``drop_rate`` (Dropout before the classifier) / ``drop_path_rate`` via ``model_args``."""
    model_args = dict(getattr(config, "model_args", None) or {})
    if drop_rate:
        model_args["drop_rate"] = drop_rate
    if drop_path_rate:
        model_args["drop_path_rate"] = drop_path_rate
    if model_args:
        config.model_args = model_args
    return bool(drop_rate)


def processor_for_image_size(processor: Any, model: nn.Module, image_size: tuple[int, int]) -> Any:
    """A copy of ``processor`` whose eval transform outputs ``image_size``, so the saved folder preprocesses like
    the run did when reloaded with plain transformers. Timm wrappers keep it in the model config's
    ``pretrained_cfg`` (updated in place). Best effort for exotic processors: the caller checks the result."""
    height, width = image_size
    config = getattr(model, "config", None)
    pretrained_cfg = getattr(config, "pretrained_cfg", None)
    if getattr(config, "model_type", None) == "timm_wrapper" and isinstance(pretrained_cfg, Mapping):
        from transformers import TimmWrapperImageProcessor

        new_cfg = dict(pretrained_cfg)
        channels = (new_cfg.get("input_size") or [3])[0]
        new_cfg["input_size"] = [channels, height, width]
        new_cfg.pop("test_input_size", None)
        config.pretrained_cfg = new_cfg
        return TimmWrapperImageProcessor(pretrained_cfg=new_cfg, architecture=getattr(config, "architecture", None))
    data = processor.to_dict()
    size = {k: v for k, v in dict(data.get("size") or {}).items() if v is not None}
    crop = {k: v for k, v in dict(data.get("crop_size") or {}).items() if v is not None}
    if "height" in size and "width" in size:
        if data.get("do_center_crop") and crop.get("height"):
            scale = height / crop["height"]
            size = {"height": round(size["height"] * scale), "width": round(size["width"] * scale)}
            data["crop_size"] = {"height": height, "width": width}
        else:
            size = {"height": height, "width": width}
    elif "shortest_edge" in size:
        if data.get("do_center_crop") and crop.get("height"):
            size = {"shortest_edge": round(size["shortest_edge"] * height / crop["height"])}
            data["crop_size"] = {"height": height, "width": width}
        else:
            size = {"shortest_edge": height}
    data["size"] = size
    data.pop("image_processor_type", None)
    data.pop("processor_class", None)
    return type(processor).from_dict(data)


def forward_accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------------------------
# History and outputs
# ----------------------------------------------------------------------------------------------------------------

def epoch_history(log_history: Sequence[Mapping[str, Any]], updates_per_epoch: int | None = None) -> list[dict]:
    """Per-evaluation rows (per epoch by default) from ``trainer.state.log_history``, in the columns
    ``recipes/train_timm.py`` writes (so one plotting/benchmark code reads both recipes' ``history.json``):
    ``epoch, step, train_loss, lr, head_lr, reinit_steps, reinit_epochs, validation_{top1,top5,loss},
    test_{top1,top5,loss}``.

    ``train_loss`` is the step-weighted mean of the train-loss logs since the previous row; ``reinit_steps`` are
    the RIFLE re-inits (``rifle/reinit`` log entries) in that span. Without evaluations the rows are the
    train-loss logs; training after the last evaluation gets a last row without eval metrics.
    """
    prefixes = {"eval_validation_": "validation_", "eval_test_": "test_"}

    def is_eval(entry: Mapping[str, Any]) -> bool:
        return any(k.startswith(tuple(prefixes)) for k in entry)

    train = [e for e in log_history if "loss" in e and "step" in e]
    reinits = [(int(e["step"]), e.get("epoch")) for e in log_history if "rifle/reinit" in e]
    ends = sorted({int(e["step"]) for e in log_history if is_eval(e)}) or sorted({int(e["step"]) for e in train})
    last = max([int(e["step"]) for e in train] + [s for s, _ in reinits], default=0)
    if last > (ends[-1] if ends else 0):  # training (or a re-init) after the last evaluation gets its own row
        ends.append(last)
    rows, previous = [], 0
    for end in ends:
        row: dict[str, Any] = {"epoch": None, "step": end, "train_loss": None, "lr": None, "head_lr": None}
        weight_sum, loss_sum, last = 0, 0.0, previous
        for entry in (e for e in train if previous < int(e["step"]) <= end):
            loss_sum += float(entry["loss"]) * (int(entry["step"]) - last)
            weight_sum += int(entry["step"]) - last
            last = int(entry["step"])
            row["lr"] = entry.get("learning_rate", row["lr"])
            row["head_lr"] = entry.get("rifle/head_lr", entry.get("learning_rate", row["head_lr"]))
        row["train_loss"] = loss_sum / weight_sum if weight_sum else None
        span = [(s, e) for s, e in reinits if previous < s <= end]
        row["reinit_steps"] = [s for s, _ in span]
        row["reinit_epochs"] = [s / updates_per_epoch if updates_per_epoch else e for s, e in span]
        for entry in log_history:
            if int(entry.get("step", -1)) == end:
                row["epoch"] = entry.get("epoch", row["epoch"])
                for key, value in entry.items():
                    for prefix, short in prefixes.items():
                        if key.startswith(prefix) and key.endswith(("top1", "top5", "loss")):
                            row[short + key.removeprefix(prefix)] = value
        rows.append(row)
        previous = end
    return rows
