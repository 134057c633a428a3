"""When to re-initialize: `RifleConfig` (what the user asks for) and `RifleScheduler` (a timm-style
scheduler that turns it into re-init points, the cyclic head LR, and a resumable history).

The schedule follows the reference implementation: the run is split into ``num_reinits + 1`` equal
periods and the head is re-initialized at the end of every period but the last. Everything else
(Trainer callback, timm wrapper, recipes) is a thin adapter around `RifleScheduler`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch
from torch import nn

from .optim import HEAD_GROUP_KEY, head_param_groups, schedule_factor, set_head_lr
from .reinit import INITIALIZERS, copy_head_values, reinit_head

logger = logging.getLogger(__name__)

Unit = Literal["auto", "epoch", "step"]
HeadLR = Literal["cyclic", "none"]
_UNITS = ("auto", "epoch", "step")
_HEAD_LR = ("cyclic", "none")


@dataclass
class RifleConfig:
    """Settings of RIFLE (Li et al., ICML 2020). The defaults are the reference implementation's.

    Args:
        num_reinits: R, the number of re-initializations; the run is split into R + 1 equal periods
            and the head is re-initialized at the end of each period but the last. 0 = vanilla fine-tuning.
        reinit_at: explicit re-init points (in ``unit``) instead of equal periods; overrides ``num_reinits``.
        unit: ``"epoch"`` or ``"step"`` (optimizer steps); ``"auto"`` follows the run: epochs when it is
            defined by epochs, steps when it is defined by ``max_steps``.
        no_reinit_in_last: no re-init within the last N units of training, so the final head is not
            under-trained (the authors' PaddlePaddle version uses 5 epochs). The periods are laid out
            over the run minus this tail.
        reset_optimizer_state: drop the head's optimizer state (momentum, Adam moments) at each re-init,
            so stale momentum does not drag the fresh weights back.
        head_lr: ``"cyclic"``: the head's LR follows a cosine that restarts at every re-init (the
            reference's ``fc_lr_util=cyclic``; needs the head in its own optimizer param group).
            Until the first re-init it never exceeds the main schedule's factor, so an LR warmup
            applies to the head too.
            ``"none"``: the head follows the optimizer's own schedule.
        head: module path(s) of the head, overriding detection (see `find_head`).
        init: how new head weights are drawn; one of `rifle_hf.reinit.INITIALIZERS`.
        seed: re-init values derive from (seed, re-init index), identical on every rank.
            None: the Trainer's ``args.seed`` (callback) or 0 (scheduler).
    """

    num_reinits: int = 3
    reinit_at: Sequence[float] | None = None
    unit: Unit = "auto"
    no_reinit_in_last: float = 0.0
    reset_optimizer_state: bool = True
    head_lr: HeadLR = "cyclic"
    head: str | Sequence[str] | None = None
    init: str = "default"
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.unit not in _UNITS:
            raise ValueError(f"RifleConfig: unit={self.unit!r} is not one of {_UNITS}.")
        if self.head_lr not in _HEAD_LR:
            raise ValueError(f"RifleConfig: head_lr={self.head_lr!r} is not one of {_HEAD_LR}.")
        if self.init not in INITIALIZERS:
            raise ValueError(f"RifleConfig: init={self.init!r} is not one of {tuple(INITIALIZERS)}.")
        if self.no_reinit_in_last < 0:
            raise ValueError(f"RifleConfig: no_reinit_in_last={self.no_reinit_in_last} must be >= 0.")
        if self.reinit_at is not None:
            points = [float(p) for p in self.reinit_at]
            if any(p <= 0 for p in points):
                raise ValueError(f"RifleConfig: reinit_at={list(self.reinit_at)} must hold positive numbers.")
            if len(set(points)) != len(points):
                raise ValueError(f"RifleConfig: reinit_at={list(self.reinit_at)} has duplicates.")
            self.reinit_at = sorted(points)
            self.num_reinits = len(points)
        if not isinstance(self.num_reinits, int) or self.num_reinits < 0:
            raise ValueError(f"RifleConfig: num_reinits={self.num_reinits!r} must be an integer >= 0.")
        if self.head is not None and not isinstance(self.head, str):
            self.head = list(self.head)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RifleConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def resolve_points(self, total: float, unit: str) -> list[float]:
        """Re-init points in ``unit`` for a run of ``total`` units. Raises ValueError if they do not fit."""
        if self.num_reinits == 0:
            return []
        span = total - self.no_reinit_in_last
        if self.reinit_at is not None:
            late = [p for p in self.reinit_at if p >= span]
            if late:
                where = f"the last {self.no_reinit_in_last:g} {unit}s" if self.no_reinit_in_last else "the end"
                raise ValueError(
                    f"RIFLE: reinit_at {late} is at or past {where} of a {total:g}-{unit} run; "
                    f"pick points below {span:g} {unit}s."
                )
            return list(self.reinit_at)
        period = math.floor(span / (self.num_reinits + 1))
        if period < 1:
            raise ValueError(
                f"RIFLE: num_reinits={self.num_reinits} needs at least {self.num_reinits + 1} {unit}s"
                f"{f' plus the last {self.no_reinit_in_last:g}' if self.no_reinit_in_last else ''}, "
                f"but the run has {total:g}; lower num_reinits or train longer."
            )
        return [float(k * period) for k in range(1, self.num_reinits + 1)]


def reinit_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for re-init number ``index``: same values on every rank and every device."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index * 7_919 + 1) % (2**63 - 1))


@dataclass
class ReinitEvent:
    index: int
    step: int | None
    epoch: float | None
    names: list[str] = field(default_factory=list)


class RifleScheduler:
    """A timm-style scheduler that re-initializes the head on schedule.

    Call ``step(epoch)`` after each epoch (``epoch`` = epochs completed) and ``step_update(num_updates)``
    after each optimizer step, as with timm's schedulers. When ``updates_per_epoch`` is known, epoch
    points are converted to optimizer steps and fire in ``step_update``; otherwise they fire in
    ``step``. A point fires once: the history is in ``state_dict()``, so restore it on resume.

    Args:
        model: the model (wrapped or not) whose head is re-initialized.
        config: the `RifleConfig`.
        total: length of the run in ``unit`` (epochs or optimizer steps).
        unit: ``"epoch"`` or ``"step"``.
        updates_per_epoch: optimizer steps per epoch, if known.
        optimizer: its head state is reset at re-init and its head param group gets the cyclic LR.
        ema: modules (e.g. timm ``ModelEmaV3``) whose head takes the same new values.
    """

    def __init__(
        self,
        model: nn.Module,
        config: RifleConfig,
        *,
        total: float,
        unit: str,
        updates_per_epoch: int | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        ema: nn.Module | Sequence[nn.Module] | None = None,
    ) -> None:
        if unit not in ("epoch", "step"):
            raise ValueError(f"RifleScheduler: unit must be 'epoch' or 'step', got {unit!r}.")
        if total <= 0:
            raise ValueError(f"RifleScheduler: the run length must be positive, got {total}.")
        self.model = model
        self.config = config
        self.unit = unit
        self.total = float(total)
        self.updates_per_epoch = updates_per_epoch
        self.optimizer = optimizer
        self.ema = [ema] if isinstance(ema, nn.Module) else list(ema or [])
        self.seed = 0 if config.seed is None else int(config.seed)
        self.points = config.resolve_points(self.total, unit)
        # Resolve the head now: a missing head fails at train start, never mid-run.
        from .heads import check_head_outputs, find_head
        from .reinit import check_reinit_supported, head_parameters

        heads = find_head(model, config.head)
        if config.head is not None:
            check_head_outputs(model, heads)
        check_reinit_supported(head_parameters(m for _, m in heads))
        self.head_names = [name for name, _ in heads]
        self.history: list[ReinitEvent] = []
        if config.head_lr == "cyclic" and optimizer is not None and not head_param_groups(optimizer):
            raise ValueError(
                "RIFLE: head_lr='cyclic' needs the head in its own optimizer param group; call "
                "rifle_hf.split_head_param_groups(optimizer, model) before training, or use head_lr='none'."
            )

    # -- where we are -------------------------------------------------------------------------------
    @property
    def point_updates(self) -> list[int] | None:
        """Re-init points in optimizer steps, when they can be known."""
        if self.unit == "step":
            return [round(p) for p in self.points]
        if self.updates_per_epoch:
            return [round(p * self.updates_per_epoch) for p in self.points]
        return None

    @property
    def num_done(self) -> int:
        return len(self.history)

    def head_lr_factor(self, progress: float) -> float:
        """Cosine factor in [0, 1] that restarts at every re-init point (``progress`` in ``unit``)."""
        bounds = [0.0, *self.points, self.total]
        for start, end in zip(bounds[:-1], bounds[1:]):
            if progress < end or end == bounds[-1]:
                frac = min(max((progress - start) / max(end - start, 1e-12), 0.0), 1.0)
                return 0.5 * (1.0 + math.cos(math.pi * frac))
        return 0.0

    # -- timm scheduler API ---------------------------------------------------------------------------
    def step(self, epoch: int | float, metric: float | None = None) -> list[str]:
        """End of an epoch (``epoch`` epochs completed): fires epoch points when steps are unknown."""
        del metric  # accepted for timm's ``scheduler.step(epoch, metric)`` call convention
        if self.unit == "epoch" and self.point_updates is None:
            self._apply_head_lr(float(epoch))
            return self._fire_due(float(epoch), epoch=float(epoch), step=None)
        return []

    def step_update(self, num_updates: int, metric: float | None = None) -> list[str]:
        """After optimizer step ``num_updates``: fires due points and sets the head LR for the next step."""
        del metric
        points = self.point_updates
        if points is None:  # epoch unit without updates_per_epoch: `step(epoch)` does the work
            return []
        epoch = num_updates / self.updates_per_epoch if self.updates_per_epoch else None
        touched = self._fire_due(num_updates, epoch=epoch, step=num_updates, points=points)
        progress = float(num_updates) if self.unit == "step" else num_updates / self.updates_per_epoch
        self._apply_head_lr(progress)
        return touched

    def _apply_head_lr(self, progress: float) -> None:
        if self.config.head_lr == "cyclic" and self.optimizer is not None:
            factor = self.head_lr_factor(progress)
            main = schedule_factor(self.optimizer) if self.num_done == 0 else None
            if main is not None:  # before the first re-init the head warms up with the rest of the model
                factor = min(factor, main)
            set_head_lr(self.optimizer, factor)

    def _fire_due(
        self, now: float, *, epoch: float | None, step: int | None, points: Sequence[float] | None = None
    ) -> list[str]:
        # ">=" rather than "==": a point whose step was missed (e.g. a checkpoint written just before it)
        # fires late instead of never; the restored history keeps done points from firing twice.
        points = self.points if points is None else points
        touched: list[str] = []
        while self.num_done < len(points) and now >= points[self.num_done]:
            touched = self.reinit_now(epoch=epoch, step=step)
        return touched

    def reinit_now(self, *, epoch: float | None = None, step: int | None = None) -> list[str]:
        """Re-initialize the head now, as re-init number ``len(history)``, and record it."""
        index = self.num_done
        names = reinit_head(
            self.model,
            head=self.config.head,
            optimizer=self.optimizer if self.config.reset_optimizer_state else None,
            generator=reinit_generator(self.seed, index),
            init=self.config.init,
        )
        for ema in self.ema:
            copy_head_values(self.model, ema, names)
        self.history.append(ReinitEvent(index=index, step=step, epoch=epoch, names=names))
        logger.info("RIFLE: re-initialized %s (re-init %d, step %s, epoch %s)", names, index, step, epoch)
        return names

    # -- checkpointing (Accelerate's register_for_checkpointing uses these) ---------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "points": list(self.points),
            "history": [asdict(e) for e in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = [float(p) for p in state.get("points", [])]
        if saved and saved != self.points:
            raise ValueError(
                f"RIFLE: the checkpoint's re-init points {saved} differ from this run's {self.points}; "
                "resume with the same RIFLE settings and run length."
            )
        self.history = [ReinitEvent(**e) for e in state.get("history", [])]


__all__ = ["HEAD_GROUP_KEY", "ReinitEvent", "RifleConfig", "RifleScheduler", "reinit_generator"]
