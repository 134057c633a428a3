"""Reusable pieces of a hand-written Accelerate fine-tuning loop (``recipes/train_timm.py`` and friends).

Everything here works for any ``nn.Module`` classifier whose forward returns logits (timm) or an object
with ``.logits`` (transformers), and batches that are ``(images, labels)`` tuples or
``{"pixel_values", "labels"}`` dicts:

* `weight_decay_param_groups` / `build_optimizer`: the usual decay / no-decay split (biases, norms,
  1-D tensors and the model's own ``no_weight_decay()`` are not decayed), plus extra exclusions such as
  the parameters an L2-SP penalty already regularizes; any optimizer name timm's ``create_optimizer_v2``
  knows.
* `make_lr_lambda`: per-step LR factor for ``LambdaLR``: constant, cosine, or cyclic cosine (restarts).
* `EpochSampler`: a shuffle that depends only on ``(seed, epoch)``, so resuming mid-run sees the same
  batches and every DDP rank agrees on the order without communication.
* `train_one_epoch` / `evaluate`: the inner loops, with no per-step host syncs.
* `save_checkpoint` / `find_latest_checkpoint` / `load_checkpoint`: ``accelerator.save_state`` written
  to ``<name>.tmp`` and renamed, plus a JSON ``trainer_state.json`` for everything that is not a tensor
  (loop position, RIFLE history, LR scheduler, run history), so nothing is unpickled on resume.
* `save_timm_model`: a folder in timm's Hub format (``model.safetensors`` + ``config.json``).
* `History`, `plot_history`, `staged_output`, `output_dir_guard`: per-epoch logs, curves, and writing
  final files so that a failed run never leaves a half-written output folder.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_PREFIX",
    "TRAINER_STATE_NAME",
    "EpochSampler",
    "EpochStats",
    "History",
    "build_optimizer",
    "evaluate",
    "find_latest_checkpoint",
    "format_table",
    "list_checkpoints",
    "load_checkpoint",
    "make_lr_lambda",
    "mix_seed",
    "reseed_batch",
    "output_dir_guard",
    "resolve_checkpoint",
    "plot_history",
    "save_checkpoint",
    "save_timm_model",
    "staged_output",
    "train_one_epoch",
    "unpack_batch",
    "weight_decay_param_groups",
]

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_NAME = "trainer_state.json"
_TMP_SUFFIX = ".tmp"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


# ------------------------------------------------------------------------------------------- optimizer
def weight_decay_param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    no_decay_names: Iterable[str] = (),
    exclude_1d: bool = True,
) -> list[dict[str, Any]]:
    """``[{"params": no-decay, "weight_decay": 0}, {"params": decay, "weight_decay": wd}]``.

    Not decayed: 1-D tensors and biases (norm scales/shifts, as timm and HF do), names the model lists in
    ``no_weight_decay()`` (timm: position embeddings, class tokens), and ``no_decay_names`` -- e.g.
    ``L2SP.param_names()``, whose penalty replaces weight decay there. Names are those of the model as
    passed (strip wrappers first, e.g. with ``rifle_hf.unwrap_model``). Frozen parameters are left out.
    """
    skip = set(no_decay_names)
    model_skip: set[str] = set()
    if callable(getattr(model, "no_weight_decay", None)):
        with contextlib.suppress(Exception):  # some models only define it for certain configs
            model_skip = set(model.no_weight_decay())
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_1d = exclude_1d and (param.ndim <= 1 or name.endswith(".bias"))
        if not weight_decay or is_1d or name in skip or _matches(name, model_skip):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = []
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay)})
    return groups


def _matches(name: str, patterns: set[str]) -> bool:
    # timm's no_weight_decay() returns names ("pos_embed") or prefixes ("cls_token", "blocks.0.attn.rel_pos")
    return any(name == p or name.startswith(p + ".") or name.endswith("." + p) for p in patterns)


def build_optimizer(
    model: nn.Module,
    *,
    opt: str = "sgd",
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    no_decay_names: Iterable[str] = (),
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Any optimizer of timm's ``create_optimizer_v2`` (``sgd``, ``momentum``, ``adamw``, ``lamb``, ...)
    over `weight_decay_param_groups`. Unknown names raise ``ValueError`` listing timm's choices."""
    from timm.optim import create_optimizer_v2, list_optimizers

    name = opt.lower()
    known = set(list_optimizers())
    if name.split("_")[-1] not in known and name not in known:
        raise ValueError(
            f"unknown optimizer --opt {opt!r}; use a timm optimizer name such as sgd, momentum, adamw, lamb or "
            "lion (timm.optim.list_optimizers() lists them all)"
        )
    groups = weight_decay_param_groups(model, weight_decay, no_decay_names=no_decay_names)
    if not groups:
        raise ValueError("the model has no trainable parameters; unfreeze some layers")
    return create_optimizer_v2(groups, opt=name, lr=lr, weight_decay=weight_decay, momentum=momentum, **kwargs)


# ------------------------------------------------------------------------------------------ LR schedules
def make_lr_lambda(
    schedule: str,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    restart_steps: Sequence[int] | None = None,
    period_steps: int | None = None,
) -> Callable[[int], float]:
    """Per-optimizer-step LR factor for ``torch.optim.lr_scheduler.LambdaLR``.

    ``constant``: linear warmup then 1. ``cosine``: warmup then one cosine to 0 at ``total_steps`` (the
    RIFLE reference). ``cyclic``: cosine restarting at ``restart_steps`` (pass RIFLE's re-init steps so the
    restarts line up) or every ``period_steps``.
    """
    from .regularizers import cosine_lambda, cyclic_cosine_lambda

    if total_steps < 1:
        raise ValueError(f"the run has {total_steps} optimizer steps; train for at least one step")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"warmup of {warmup_steps} steps does not fit a {total_steps}-step run; lower --warmup_epochs"
        )
    if schedule == "constant":
        return _ConstantLambda(warmup_steps)
    if schedule == "cosine":
        return cosine_lambda(total_steps, warmup_steps)
    if schedule == "cyclic":
        if restart_steps is not None:
            return cyclic_cosine_lambda(total_steps, None, warmup_steps, restart_steps=list(restart_steps))
        return cyclic_cosine_lambda(total_steps, period_steps, warmup_steps)
    raise ValueError(f"unknown LR schedule {schedule!r}; choose cosine, cyclic or constant")


@dataclass(frozen=True)
class _ConstantLambda:
    warmup_steps: int

    def __call__(self, step: int) -> float:
        return (step + 1) / self.warmup_steps if step < self.warmup_steps else 1.0


# ------------------------------------------------------------------------------------------------ data
class EpochSampler(torch.utils.data.Sampler[int]):
    """Shuffled indices that depend only on ``(seed, epoch)``: same order on every rank and after resume.

    ``set_epoch`` is called by Accelerate's prepared loaders (and by the loop); ``shuffle=False`` gives
    ``0..n-1``.
    """

    def __init__(self, num_samples: int, *, seed: int = 0, shuffle: bool = True) -> None:
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_samples))
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 0x5EED))
        return iter(torch.randperm(self.num_samples, generator=g).tolist())


def mix_seed(*values: int) -> int:
    """A 63-bit seed from a few integers (FNV-style): e.g. ``(seed, rank, epoch, batch)`` for randomness
    that needs no saved state to resume exactly."""
    h = 1469598103934665603
    for v in values:
        h = ((h ^ (int(v) & 0xFFFFFFFFFFFF)) * 1099511628211) % (2**63 - 1)
    return h


def reseed_batch(generator: torch.Generator, seed: int, rank: int, epoch: int, skipped: int, index: int) -> None:
    """Seed every random draw of one micro-batch from (seed, rank, epoch, batch index): ``generator``
    (augmentation) and torch's global RNG (Dropout, drop-path, DisturbLabel). A resumed run then draws
    exactly what the uninterrupted run drew, without restoring pickled RNG state (Accelerate's
    ``random_states_*.pkl`` would need ``weights_only=False``). Use as ``before_batch`` via ``partial``."""
    batch_seed = mix_seed(seed, rank, epoch, index + skipped)
    generator.manual_seed(batch_seed)
    torch.manual_seed(mix_seed(batch_seed, 0xD20F))


def unpack_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` from a tuple/list batch or a ``{"pixel_values", "labels"}`` dict."""
    if isinstance(batch, Mapping):
        return batch["pixel_values"], batch["labels"]
    return batch[0], batch[1]


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


# ------------------------------------------------------------------------------------------ inner loops
@dataclass
class EpochStats:
    """What one epoch did: optimizer steps taken, mean train loss, images seen (all ranks), wall time."""

    num_updates: int
    loss: float
    samples: int
    seconds: float
    reinit_steps: list[int]

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    accelerator: Any,
    *,
    num_updates: int,
    lr_scheduler: Any = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    label_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    penalty_fn: Callable[[], torch.Tensor] | None = None,
    before_batch: Callable[[int], None] | None = None,
    after_backward: Callable[[int], None] | None = None,
    on_update: Callable[[int], Sequence[str] | None] | None = None,
    max_grad_norm: float | None = None,
    progress: Any = None,
    log_every: int = 50,
) -> EpochStats:
    """One pass over ``loader`` under ``accelerator.accumulate``; returns `EpochStats`.

    Per micro-batch: ``before_batch(batch_index)`` (e.g. reseed augmentation), ``transform(images)`` (on
    device), ``label_fn(labels)`` (e.g. DisturbLabel), loss + ``penalty_fn()`` (e.g. L2-SP), backward.
    Per optimizer step (when gradients sync): ``after_backward(next_update)`` (e.g. record gradient norms,
    before clipping/stepping), clip, step, ``lr_scheduler.step()``, then ``on_update(num_updates)`` --
    RIFLE's ``step_update`` goes there, after the LR scheduler, and may return re-initialized names;
    ``on_update`` may also write a checkpoint. The train loss is summed on device and read once at the
    end (no per-step ``.item()``), except every ``log_every`` steps for the progress bar.
    """
    model.train()
    loss_sum = torch.zeros((), device=accelerator.device)
    seen = torch.zeros((), device=accelerator.device, dtype=torch.long)
    reinits: list[int] = []
    start = time.perf_counter()
    for index, batch in enumerate(loader):
        if before_batch is not None:
            before_batch(index)
        images, labels = unpack_batch(batch)
        with accelerator.accumulate(model):
            if transform is not None:
                images = transform(images)
            targets = label_fn(labels) if label_fn is not None else labels
            logits = _logits(model(images))
            loss = loss_fn(logits, targets)
            total = loss + penalty_fn() if penalty_fn is not None else loss
            accelerator.backward(total)
            if accelerator.sync_gradients:
                if after_backward is not None:
                    after_backward(num_updates + 1)
                if max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach().float() * labels.shape[0]
        seen += labels.shape[0]
        if accelerator.sync_gradients:
            if lr_scheduler is not None and not accelerator.optimizer_step_was_skipped:
                lr_scheduler.step()
            num_updates += 1
            touched = on_update(num_updates) if on_update is not None else None
            if touched:
                reinits.append(num_updates)
            if progress is not None:
                progress.update(1)
                if log_every and num_updates % log_every == 0:
                    progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    totals = accelerator.reduce(torch.stack([loss_sum, seen.float()]), reduction="sum")
    loss_total, count = totals.tolist()
    return EpochStats(
        num_updates=num_updates,
        loss=loss_total / count if count else float("nan"),
        samples=int(count),
        seconds=time.perf_counter() - start,
        reinit_steps=reinits,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    accelerator: Any,
    *,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """``{"top1", "top5" (> 5 classes), "loss"}`` over ``loader``, gathered across ranks (no duplicates)."""
    from .metrics import compute_classification_metrics

    was_training = model.training
    model.eval()
    all_logits: list[torch.Tensor] = []
    all_labels: list[torch.Tensor] = []
    for batch in loader:
        images, labels = unpack_batch(batch)
        if transform is not None:
            images = transform(images)
        logits = _logits(model(images)).float()
        logits, labels = accelerator.gather_for_metrics((logits, labels))
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
    model.train(was_training)
    if not all_logits:
        raise ValueError("evaluation split is empty; check the dataset splits")
    logits = torch.cat(all_logits)
    labels = torch.cat(all_labels)
    metrics = compute_classification_metrics(logits, labels)
    metrics["loss"] = float(F.cross_entropy(logits, labels))
    return metrics


# ---------------------------------------------------------------------------------------- checkpoints
def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (``checkpoint-<step>`` folders holding ``trainer_state.json``), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        m = _CHECKPOINT_RE.match(child.name)
        if m and child.is_dir() and (child / TRAINER_STATE_NAME).is_file():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def find_latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``directory`` (half-written ``*.tmp`` folders are ignored)."""
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def resolve_checkpoint(value: str, output_dir: str | os.PathLike) -> Path:
    """``--resume_from_checkpoint`` value -> a checkpoint folder: ``latest`` (newest in ``output_dir``),
    a checkpoint folder, or a run folder (its newest checkpoint). Raises ``FileNotFoundError`` naming
    the fix."""
    if value == "latest":
        found = find_latest_checkpoint(output_dir)
        if found is None:
            raise FileNotFoundError(
                f"--resume_from_checkpoint latest: no complete checkpoint in {os.fspath(output_dir)!r}; "
                "train with --checkpointing_steps first, or drop --resume_from_checkpoint"
            )
        return found
    path = Path(value)
    if (path / TRAINER_STATE_NAME).is_file():
        return path
    found = find_latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(
            f"--resume_from_checkpoint {value!r} is not a complete checkpoint folder (no {TRAINER_STATE_NAME}) "
            "nor a run folder holding one; pass a checkpoint-<step> folder or 'latest'"
        )
    return found


def save_checkpoint(
    accelerator: Any,
    directory: str | os.PathLike,
    step: int,
    state: Mapping[str, Any],
    *,
    total_limit: int | None = None,
) -> Path:
    """``accelerator.save_state`` into ``checkpoint-<step>.tmp``, add ``trainer_state.json``, then rename.

    Every process must call this (ranks save their RNG states); only the main process writes JSON,
    renames, and prunes to the newest ``total_limit`` checkpoints. A kill at any moment leaves the
    previous checkpoints complete; a stale ``.tmp`` from an earlier kill is replaced.
    """
    directory = Path(directory)
    final = directory / f"{CHECKPOINT_PREFIX}{step}"
    tmp = directory / f"{CHECKPOINT_PREFIX}{step}{_TMP_SUFFIX}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(tmp / TRAINER_STATE_NAME, dict(state, step=step))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None and total_limit > 0:
            for old in list_checkpoints(directory)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, path: str | os.PathLike) -> dict[str, Any]:
    """``accelerator.load_state(path)`` (tensors via safetensors / ``weights_only`` loads) and the JSON
    trainer state saved by `save_checkpoint`."""
    path = Path(path)
    state = json.loads((path / TRAINER_STATE_NAME).read_text())
    accelerator.load_state(str(path))
    return state


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


# ---------------------------------------------------------------------------------------------- outputs
def save_timm_model(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    label_names: Sequence[str] | None = None,
    data_config: Mapping[str, Any] | None = None,
    model_args: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Save a timm model in timm's Hub format: ``model.safetensors`` + ``config.json``.

    ``label_names`` go into ``config.json`` (timm's ``label_names``), ``data_config`` (e.g. the
    ``input_size`` trained at) into its ``pretrained_cfg``. It loads back without rifle-hf:
    ``timm.create_model("local-dir:<dir>")`` or ``timm.create_model(name, pretrained=True,
    pretrained_cfg_overlay=dict(file="<dir>/model.safetensors"), num_classes=N)``.
    """
    from timm.models import save_for_hf

    from .heads import unwrap_model
    from .timm_wrapper import RifleWrapper

    model = unwrap_model(model)
    if isinstance(model, RifleWrapper):
        model = unwrap_model(model.model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors refuses non-contiguous tensors (channels-last conv weights): save a contiguous layout,
    # then put the model's memory format back.
    channels_last = any(
        p.ndim == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
        for p in model.parameters()
    )
    model_config: dict[str, Any] = {}
    if label_names is not None:
        if len(label_names) != getattr(model, "num_classes", len(label_names)):
            raise ValueError(
                f"{len(label_names)} label names for a model with {model.num_classes} classes; "
                "pass one name per class"
            )
        model_config["label_names"] = list(label_names)
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    try:
        save_for_hf(
            model,
            str(directory),
            model_config=model_config,
            model_args=dict(model_args) if model_args else None,
            safe_serialization=True,
            data_config=dict(data_config) if data_config else None,
        )
    finally:
        if channels_last:
            model.to(memory_format=torch.channels_last)
    return [directory / "model.safetensors", directory / "config.json"]


@contextlib.contextmanager
def staged_output(directory: str | os.PathLike, *, enabled: bool = True) -> Iterator[Path]:
    """Write final files into ``<directory>/.staging.tmp`` and move them into ``directory`` on success.

    A failure while writing leaves ``directory`` as it was (the staging folder is removed). Files are
    moved one by one with ``os.replace``; only folders named ``checkpoint-*`` already there are kept
    untouched. ``enabled=False`` (non-main ranks) yields a throwaway path and writes nothing.
    """
    directory = Path(directory)
    staging = directory / ".staging.tmp"
    if not enabled:
        yield staging
        return
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for item in sorted(staging.iterdir()):
        target = directory / item.name
        if target.is_dir() and not item.is_dir():
            shutil.rmtree(target)
        elif item.is_dir() and target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(item, target)
    staging.rmdir()


@contextlib.contextmanager
def output_dir_guard(directory: str | os.PathLike, *, enabled: bool = True) -> Iterator[Path]:
    """Remove ``directory`` again if this run created it and then failed before leaving anything usable.

    "Usable" means a complete checkpoint: a run killed or crashing mid-training keeps its checkpoints so
    it can be resumed; a run that fails earlier (bad input found late, a crash in epoch 1) leaves no
    folder behind. A folder that existed before the run is never removed.
    """
    directory = Path(directory)
    existed = directory.exists()
    try:
        yield directory
    except BaseException:
        if enabled and not existed and directory.exists() and not list_checkpoints(directory):
            shutil.rmtree(directory, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------- history
class History:
    """Per-epoch rows (``epoch``, ``step``, ``train_loss``, ``lr``, ``head_lr``, ``validation_top1``,
    ``test_top1``, ``reinit_steps``, ...) written as ``history.json`` and ``history.csv``."""

    def __init__(self, rows: Sequence[Mapping[str, Any]] = ()) -> None:
        self.rows: list[dict[str, Any]] = [dict(r) for r in rows]

    def add(self, row: Mapping[str, Any]) -> dict[str, Any]:
        self.rows.append(dict(row))
        return self.rows[-1]

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rows = [dict(r) for r in state.get("rows", [])]

    @property
    def reinit_steps(self) -> list[int]:
        return [s for r in self.rows for s in r.get("reinit_steps", [])]

    def columns(self) -> list[str]:
        return list(dict.fromkeys(k for r in self.rows for k in r))

    def write(self, directory: str | os.PathLike, stem: str = "history") -> list[Path]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        json_path, csv_path = directory / f"{stem}.json", directory / f"{stem}.csv"
        json_path.write_text(json.dumps(self.rows, indent=2, default=_json_default) + "\n")
        with csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns(), restval="")
            writer.writeheader()
            for row in self.rows:
                writer.writerow(
                    {k: ";".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in row.items()}
                )
        return [json_path, csv_path]


def plot_history(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | os.PathLike,
    *,
    metric: str = "test_top1",
    title: str | None = None,
) -> Path:
    """PNG of ``metric`` (falls back to ``validation_top1``) and train loss per epoch for each run, with
    dashed lines at each run's head re-initializations (``reinit_epochs`` in the rows). Agg, no pyplot."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - matplotlib is in the plot extras
        raise ImportError("plotting needs matplotlib: pip install 'rifle-hf[plot]'") from err
    if not runs:
        raise ValueError("plot_history needs at least one run")
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_acc, ax_loss = fig.subplots(1, 2)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for i, (name, rows) in enumerate(runs.items()):
        color = colors[i % len(colors)]
        key = metric if any(r.get(metric) is not None for r in rows) else "validation_top1"
        acc = [(r["epoch"], 100 * r[key]) for r in rows if r.get(key) is not None]
        loss = [(r["epoch"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
        if acc:
            ax_acc.plot(*zip(*acc), marker="o", markersize=3, color=color, label=f"{name} ({key})")
        if loss:
            ax_loss.plot(*zip(*loss), marker="o", markersize=3, color=color, label=name)
        marks = [e for r in rows for e in r.get("reinit_epochs", [])]
        for j, e in enumerate(marks):
            for ax in (ax_acc, ax_loss):
                ax.axvline(e, color=color, linestyle="--", linewidth=0.9, alpha=0.7,
                           label=f"{name} head re-init" if j == 0 and ax is ax_acc else None)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("top-1 accuracy (%)")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("train loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "Fine-tuning curves")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain-text table (fixed-width columns) for console summaries."""
    cells = [[str(h) for h in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])
