"""The head's own optimizer param group, which the cyclic head LR needs.

`split_head_param_groups` moves the head's parameters out of whatever groups an optimizer was built
with (Trainer's decay / no-decay split, timm's ``create_optimizer_v2`` groups, layer-decay groups) into
copies of those groups marked ``rifle_head``: weight decay and every other setting stay as they were.
Call it before building the LR scheduler and before loading optimizer state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

HEAD_GROUP_KEY = "rifle_head"
BASE_LR_KEY = "rifle_base_lr"


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    # Accelerate's AcceleratedOptimizer (and similar wrappers) keep the real optimizer in `.optimizer`.
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def head_param_groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    return [g for g in optimizer.param_groups if g.get(HEAD_GROUP_KEY)]


def split_head_param_groups(
    optimizer: torch.optim.Optimizer, model: nn.Module, head: str | Sequence[str] | None = None
) -> int:
    """Move the head's parameters into their own groups; returns how many parameters moved.

    Idempotent: parameters already in a head group are left alone.
    """
    from .heads import find_head
    from .reinit import head_parameters

    head_ids = {id(p) for p in head_parameters(m for _, m in find_head(model, head))}
    inner = _inner(optimizer)
    moved = 0
    for group in list(inner.param_groups):
        if group.get(HEAD_GROUP_KEY):
            continue
        head_params = [p for p in group["params"] if id(p) in head_ids]
        if not head_params:
            continue
        group["params"] = [p for p in group["params"] if id(p) not in head_ids]
        new_group = {k: v for k, v in group.items() if k != "params"}
        new_group.update(params=head_params, **{HEAD_GROUP_KEY: True})
        inner.param_groups.append(new_group)
        moved += len(head_params)
    # Groups left empty (e.g. a no-decay group that held only the head bias) are kept: schedulers and
    # saved optimizer states index groups by position.
    return moved


def set_head_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every head group's LR to its base LR times ``factor``.

    The base LR is the group's ``initial_lr`` (set by torch and timm schedulers) or, failing that,
    its LR the first time this is called.
    """
    for group in head_param_groups(optimizer):
        base = group.setdefault(BASE_LR_KEY, group.get("initial_lr", group["lr"]))
        group["lr"] = base * factor


def schedule_factor(optimizer: torch.optim.Optimizer) -> float | None:
    """The LR scheduler's current factor (``lr / initial_lr``) of the first non-head group, if it has one."""
    for group in optimizer.param_groups:
        if not group.get(HEAD_GROUP_KEY) and group.get("initial_lr"):
            return group["lr"] / group["initial_lr"]
    return None
