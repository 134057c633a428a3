"""RIFLE for timm-style training loops: a wrapper that keeps timm's model API and state_dict.

    model = RifleWrapper(timm.create_model(...), num_reinits=3, num_epochs=E, updates_per_epoch=U,
                         optimizer=optimizer, ema=model_ema)
    ...
    optimizer.step(); lr_scheduler.step_update(num_updates); model.step_update(num_updates)
    ...
    lr_scheduler.step(epoch + 1); model.step(epoch + 1)

``step`` / ``step_update`` mirror timm's schedulers; call them after the LR scheduler's, so the head's
cyclic LR is the last word. ``state_dict()`` has the plain model's keys (no wrapper prefix), so a
checkpoint loads straight into ``timm.create_model(...)``; the RIFLE history is in ``rifle_state_dict()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .optim import split_head_param_groups
from .schedule import RifleConfig, RifleScheduler

_INNER = "model."


def _strip_inner_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    inner, inner_root = prefix + _INNER, prefix + _INNER[:-1]
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:  # version info of the inner modules, under the plain model's names
        for key in [k for k in metadata if k == inner_root or k.startswith(inner)]:
            metadata[prefix + key[len(inner) :] if key != inner_root else prefix.rstrip(".")] = metadata.pop(key)


def _add_inner_prefix(
    module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any, *args: Any
) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + _INNER)]:
        state_dict[prefix + _INNER + key[len(prefix) :]] = state_dict.pop(key)


class RifleWrapper(nn.Module):
    """A timm-compatible module that re-initializes its model's classifier on RIFLE's schedule.

    Args:
        model: a timm model (any ``nn.Module`` works; the timm methods are forwarded when present).
        config: a `RifleConfig`, or its fields as keyword arguments.
        num_epochs: length of the run in epochs (for ``unit="epoch"``, the default when given).
        updates_per_epoch: optimizer steps per epoch; lets epoch points fire at the exact step and the
            cyclic head LR move every step.
        total_steps: length of the run in optimizer steps (for ``unit="step"``).
        optimizer: its head state is reset at each re-init; with ``head_lr="cyclic"`` the head is moved
            into its own param groups here (do this before loading optimizer state).
        ema: EMA model(s), e.g. timm ``ModelEmaV3``: their head takes the same new values at each re-init.
    """

    def __init__(
        self,
        model: nn.Module,
        config: RifleConfig | None = None,
        *,
        num_epochs: int | None = None,
        updates_per_epoch: int | None = None,
        total_steps: int | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        ema: nn.Module | Sequence[nn.Module] | None = None,
        **config_kwargs: Any,
    ) -> None:
        super().__init__()
        if config is not None and config_kwargs:
            raise ValueError("RifleWrapper: pass a RifleConfig or keyword arguments, not both.")
        config = config if config is not None else RifleConfig(**config_kwargs)
        unit = config.unit
        if unit == "auto":
            unit = "epoch" if num_epochs is not None else "step"
        if unit == "epoch" and num_epochs is None:
            raise ValueError("RifleWrapper: unit='epoch' needs num_epochs=...")
        if unit == "step" and total_steps is None:
            if num_epochs is None or updates_per_epoch is None:
                raise ValueError("RifleWrapper: pass num_epochs=... (epochs) or total_steps=... (steps).")
            total_steps = num_epochs * updates_per_epoch
        self.model = model
        if optimizer is not None and config.head_lr == "cyclic":
            split_head_param_groups(optimizer, model, config.head)
        self.rifle = RifleScheduler(
            model,
            config,
            total=num_epochs if unit == "epoch" else total_steps,
            unit=unit,
            updates_per_epoch=updates_per_epoch,
            optimizer=optimizer,
            ema=ema,
        )
        self._register_state_dict_hook(_strip_inner_prefix)
        self._register_load_state_dict_pre_hook(_add_inner_prefix, with_module=True)

    # -- the timm model API, forwarded --------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.model.forward_head(x, pre_logits=pre_logits)

    def get_classifier(self) -> nn.Module:
        return self.model.get_classifier()

    def reset_classifier(self, num_classes: int, *args: Any, **kwargs: Any) -> None:
        """timm's reset_classifier *replaces* the head module: re-resolve the head afterwards."""
        self.model.reset_classifier(num_classes, *args, **kwargs)
        from .heads import find_head

        self.rifle.head_names = [name for name, _ in find_head(self.model, self.rifle.config.head)]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    @property
    def pretrained_cfg(self) -> dict:
        return self.model.pretrained_cfg

    @property
    def default_cfg(self) -> dict:
        return getattr(self.model, "default_cfg", self.model.pretrained_cfg)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def num_features(self) -> int:
        return self.model.num_features

    def __getattr__(self, name: str) -> Any:
        # Anything else timm code reaches for (feature_info, group_matcher, no_weight_decay, ...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    # -- the scheduler API, like timm's schedulers ------------------------------------------------------
    def step(self, epoch: int, metric: float | None = None) -> list[str]:
        """Call after each epoch with the number of epochs completed."""
        return self.rifle.step(epoch, metric)

    def step_update(self, num_updates: int, metric: float | None = None) -> list[str]:
        """Call after each optimizer step with the number of optimizer steps done."""
        return self.rifle.step_update(num_updates, metric)

    def rifle_state_dict(self) -> dict[str, Any]:
        return self.rifle.state_dict()

    def load_rifle_state_dict(self, state: dict[str, Any]) -> None:
        self.rifle.load_state_dict(state)
