"""RifleConfig validation and RifleScheduler: points, head LR, history, resume."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from rifle_hf import RifleConfig, RifleScheduler, split_head_param_groups


def test_equal_periods_like_the_reference():
    # 40 epochs, R=3 -> P=4 periods of 10 epochs; re-init at the end of all but the last.
    assert RifleConfig(num_reinits=3).resolve_points(40, "epoch") == [10, 20, 30]
    # E rounded down to a multiple of P: 42 epochs, P=4 -> period 10
    assert RifleConfig(num_reinits=3).resolve_points(42, "epoch") == [10, 20, 30]
    assert RifleConfig(num_reinits=0).resolve_points(40, "epoch") == []


def test_last_epochs_guard_lays_periods_over_the_rest():
    assert RifleConfig(num_reinits=3, no_reinit_in_last=5).resolve_points(45, "epoch") == [10, 20, 30]
    with pytest.raises(ValueError, match="last 5"):
        RifleConfig(reinit_at=[38], no_reinit_in_last=5).resolve_points(40, "epoch")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_reinits": -1}, "num_reinits"),
        ({"reinit_at": [0, 3]}, "positive"),
        ({"reinit_at": [3, 3]}, "duplicates"),
        ({"unit": "minute"}, "unit"),
        ({"head_lr": "step"}, "head_lr"),
        ({"init": "zeros"}, "init"),
        ({"no_reinit_in_last": -1}, "no_reinit_in_last"),
    ],
)
def test_invalid_settings_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RifleConfig(**kwargs)


def test_more_reinits_than_the_run_allows_is_one_clear_line():
    with pytest.raises(ValueError) as err:
        RifleConfig(num_reinits=5).resolve_points(4, "epoch")
    assert "lower num_reinits or train longer" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="past"):
        RifleConfig(reinit_at=[10]).resolve_points(10, "step")


def test_reinit_at_overrides_num_reinits_and_is_sorted():
    cfg = RifleConfig(reinit_at=[7, 3])
    assert cfg.num_reinits == 2 and cfg.resolve_points(10, "step") == [3, 7]


def _opt(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    split_head_param_groups(opt, model)
    return opt


def test_scheduler_fires_in_step_update_and_cycles_head_lr():
    model = timm.create_model("test_resnet", num_classes=3)
    opt = _opt(model)
    sched = RifleScheduler(model, RifleConfig(num_reinits=1, seed=0), total=10, unit="step", optimizer=opt)
    head_group = [g for g in opt.param_groups if g.get("rifle_head")][0]
    lrs, fired = [], []
    for step in range(1, 11):
        if sched.step_update(step):
            fired.append(step)
        lrs.append(head_group["lr"])
    assert fired == [5]
    assert lrs[4] == pytest.approx(0.1)  # restarts at the re-init
    assert lrs[3] < 0.02 and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[:4], lrs[1:4]))  # decreasing within a cycle
    # the backbone groups were not touched
    assert all(g["lr"] == 0.1 for g in opt.param_groups if not g.get("rifle_head"))


def test_cyclic_head_lr_follows_the_warmup_until_the_first_reinit():
    """A warmup applies to the head too; after a re-init the fresh head restarts at its full LR."""
    model = timm.create_model("test_resnet", num_classes=3)
    opt = _opt(model)
    warmup, total = 4, 20
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
    )
    sched = RifleScheduler(model, RifleConfig(num_reinits=1, seed=0), total=total, unit="step", optimizer=opt)
    head = [g for g in opt.param_groups if g.get("rifle_head")][0]
    body = [g for g in opt.param_groups if not g.get("rifle_head")][0]
    head_lrs, body_lrs = [], []
    for step in range(1, total + 1):
        opt.step()
        lr_sched.step()
        sched.step_update(step)
        head_lrs.append(head["lr"])
        body_lrs.append(body["lr"])
    assert head_lrs[: warmup - 1] == pytest.approx(body_lrs[: warmup - 1])  # warming up: same LR
    assert head_lrs[0] == pytest.approx(0.1 / warmup)
    assert all(h <= b + 1e-12 for h, b in zip(head_lrs[:9], body_lrs[:9]))  # first period: never above
    assert head_lrs[9] == pytest.approx(0.1) and body_lrs[9] < 0.1  # the re-init at step 10 restarts it


def test_epoch_points_fire_at_the_exact_step_when_updates_per_epoch_known():
    model = timm.create_model("test_resnet", num_classes=3)
    sched = RifleScheduler(
        model, RifleConfig(num_reinits=3, head_lr="none"), total=8, unit="epoch", updates_per_epoch=4
    )
    assert sched.point_updates == [8, 16, 24]
    fired = [s for s in range(1, 33) if sched.step_update(s)]
    assert fired == [8, 16, 24]
    assert sched.step(2) == []  # epoch calls do not fire a second time


def test_epoch_points_fire_in_step_without_updates_per_epoch():
    model = timm.create_model("test_resnet", num_classes=3)
    sched = RifleScheduler(model, RifleConfig(num_reinits=1, head_lr="none"), total=4, unit="epoch")
    assert [e for e in range(1, 5) if sched.step(e)] == [2]


def test_history_state_dict_prevents_repeats_and_mismatch_is_refused():
    model = timm.create_model("test_resnet", num_classes=3)
    cfg = RifleConfig(num_reinits=2, head_lr="none", seed=1)
    first = RifleScheduler(model, cfg, total=9, unit="step")
    for s in range(1, 4):
        first.step_update(s)
    state = first.state_dict()
    assert [e["step"] for e in state["history"]] == [3]

    resumed = RifleScheduler(model, cfg, total=9, unit="step")
    resumed.load_state_dict(state)
    assert [s for s in range(3, 10) if resumed.step_update(s)] == [6]

    other = RifleScheduler(model, RifleConfig(num_reinits=1, head_lr="none"), total=9, unit="step")
    with pytest.raises(ValueError, match="same RIFLE settings"):
        other.load_state_dict(state)


def test_cyclic_without_head_group_is_refused_at_start():
    model = timm.create_model("test_resnet", num_classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="split_head_param_groups"):
        RifleScheduler(model, RifleConfig(num_reinits=1), total=10, unit="step", optimizer=opt)


def test_missing_head_fails_at_start_not_mid_run():
    from rifle_hf import HeadNotFoundError

    model = timm.create_model("test_resnet", num_classes=0)
    with pytest.raises(HeadNotFoundError):
        RifleScheduler(model, RifleConfig(num_reinits=1, head_lr="none"), total=10, unit="step")
