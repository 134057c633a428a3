"""RifleWrapper in a hand-written timm-style loop, with timm's optimizer, scheduler and ModelEmaV3."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from rifle_hf import RifleConfig, RifleWrapper


def _data(n=48, classes=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 3, size, size, generator=g) + y.view(-1, 1, 1, 1) * 0.5
    return list(zip(x.split(8), y.split(8)))


def test_timm_api_is_forwarded():
    base = timm.create_model("test_resnet", num_classes=3)
    model = RifleWrapper(base, num_reinits=1, num_epochs=4, head_lr="none")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), base(x))
    feats = model.forward_features(x)
    assert torch.equal(model.forward_head(feats), base.forward_head(feats))
    assert model.forward_head(feats, pre_logits=True).shape[-1] == model.num_features
    assert model.get_classifier() is base.get_classifier()
    assert model.num_classes == 3 and model.pretrained_cfg == base.pretrained_cfg
    assert model.default_cfg == base.pretrained_cfg
    assert model.group_matcher() == base.group_matcher()  # anything else falls through
    model.set_grad_checkpointing(True)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.rifle.head_names == ["fc"]


def test_state_dict_loads_into_the_plain_model():
    model = RifleWrapper(timm.create_model("test_resnet", num_classes=3), num_reinits=1, num_epochs=4,
                         head_lr="none")
    model.step(2)  # a re-init, so the weights differ from any fresh model
    sd = model.state_dict()
    plain = timm.create_model("test_resnet", num_classes=3)
    assert set(sd) == set(plain.state_dict())
    plain.load_state_dict(sd)
    x = torch.randn(2, 3, 32, 32)
    model.eval(), plain.eval()
    assert torch.equal(model(x), plain(x))
    # and back: a plain checkpoint loads into the wrapper
    other = RifleWrapper(timm.create_model("test_resnet", num_classes=3), num_reinits=1, num_epochs=4,
                         head_lr="none")
    other.load_state_dict(plain.state_dict())
    other.eval()
    assert torch.equal(other(x), plain(x))


def test_timm_style_loop_with_ema_and_cyclic_head_lr():
    torch.manual_seed(0)
    base = timm.create_model("test_resnet", num_classes=3)
    optimizer = create_optimizer_v2(base, opt="momentum", lr=0.05, weight_decay=1e-4)
    ema = ModelEmaV3(base, decay=0.9)
    batches = _data()
    num_epochs, updates_per_epoch = 4, len(batches)
    model = RifleWrapper(
        base, RifleConfig(num_reinits=1, seed=0), num_epochs=num_epochs, updates_per_epoch=updates_per_epoch,
        optimizer=optimizer, ema=ema,
    )
    lr_scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=num_epochs,
                                          updates_per_epoch=updates_per_epoch, warmup_epochs=0)
    loss_fn = torch.nn.CrossEntropyLoss()
    head = model.get_classifier()
    head_group = [g for g in optimizer.param_groups if g.get("rifle_head")]
    assert head_group, "the wrapper puts the head in its own param group"
    num_updates, fired = 0, []
    for epoch in range(num_epochs):
        for x, y in batches:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            num_updates += 1
            lr_scheduler.step_update(num_updates)
            if model.step_update(num_updates):
                fired.append(num_updates)
                # the EMA head holds the new values exactly; its backbone keeps averaging
                assert torch.equal(ema.module.get_classifier().weight, head.weight)
                assert head.weight not in optimizer.state and head.bias not in optimizer.state
                assert head_group[0]["lr"] == pytest.approx(0.05)
            ema.update(model.model, step=num_updates)
        lr_scheduler.step(epoch + 1)
        model.step(epoch + 1)
    assert fired == [2 * updates_per_epoch]
    assert [e.step for e in model.rifle.history] == [12]
    assert head_group[0]["lr"] < 0.01  # the head's cosine ran down again by the end


def test_rifle_state_dict_round_trip_prevents_repeat_on_resume():
    model = RifleWrapper(timm.create_model("test_resnet", num_classes=3), num_reinits=1, num_epochs=4,
                         head_lr="none")
    assert model.step(2)
    state = model.rifle_state_dict()
    resumed = RifleWrapper(timm.create_model("test_resnet", num_classes=3), num_reinits=1, num_epochs=4,
                           head_lr="none")
    resumed.load_rifle_state_dict(state)
    assert resumed.step(2) == [] and resumed.step(3) == []


def test_wrapper_needs_a_run_length():
    with pytest.raises(ValueError, match="num_epochs"):
        RifleWrapper(timm.create_model("test_resnet", num_classes=3), num_reinits=1)


def test_import_for_a_timm_loop_does_not_load_transformers():
    """The transformers adapters load on first use, so a timm-only training script imports quickly."""
    import subprocess
    import sys

    code = ("import sys, rifle_hf; assert 'transformers' not in sys.modules, 'eager transformers import'; "
            "from rifle_hf import RifleTrainer; assert 'transformers' in sys.modules; print(RifleTrainer.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "RifleTrainer"
    import rifle_hf

    assert {"RifleCallback", "RifleTrainer"} <= set(dir(rifle_hf))
