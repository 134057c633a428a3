"""The competitor methods (DropConnect, DisturbLabel, L2-SP, LR lambdas) on real small timm / HF models."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from conftest import tiny_vit
from torch import nn

from rifle_hf import find_head
from rifle_hf.regularizers import (
    L2SP,
    DropConnect,
    cosine_lambda,
    cycle_starts,
    cyclic_cosine_lambda,
    disturb_labels,
    drop_connect,
    insert_drop_connect,
)


def _resnet(num_classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=num_classes)


def _images(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- DropConnect
def test_drop_connect_masks_whole_samples_and_preserves_the_mean():
    x = torch.ones(4000, 8)
    module = DropConnect(0.5, generator=torch.Generator().manual_seed(0)).train()
    y = module(x)
    rows = y[:, 0]
    assert torch.equal(y, rows[:, None].expand_as(y))  # one decision per sample
    assert set(rows.unique().tolist()) <= {0.0, 2.0}  # survivors scaled by 1 / (1 - p)
    dropped = (rows == 0).float().mean().item()
    assert abs(dropped - 0.5) < 5 * math.sqrt(0.25 / 4000)
    assert abs(y.mean().item() - 1.0) < 5 * math.sqrt(1.0 / 4000)


def test_drop_connect_is_identity_in_eval_mode_and_for_p0():
    x = torch.randn(16, 4)
    assert torch.equal(DropConnect(0.7).eval()(x), x)
    assert torch.equal(DropConnect(0.0).train()(x), x)
    assert torch.equal(drop_connect(x, 0.7, training=False), x)


def test_drop_connect_is_deterministic_with_a_generator_and_handles_feature_maps():
    x = torch.randn(32, 4, 3, 3)
    a = drop_connect(x, 0.3, generator=torch.Generator().manual_seed(7))
    b = drop_connect(x, 0.3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    kept = a.flatten(1).abs().sum(1) > 0
    assert torch.allclose(a[kept], x[kept] / 0.7)
    assert 0 < kept.sum() < 32


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_drop_connect_rejects_bad_rates(p):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        DropConnect(p)


def _reference_mask(batch: int, p: float, seed: int) -> torch.Tensor:
    return drop_connect(torch.ones(batch, 1), p, generator=torch.Generator().manual_seed(seed))[:, 0] > 0


def test_insert_drop_connect_on_timm_masks_head_input_and_keeps_state_dict():
    model = _resnet()
    keys = list(model.state_dict())
    handle = insert_drop_connect(model, 0.5, generator=torch.Generator().manual_seed(3))
    assert handle.head_names == [n for n, _ in find_head(model)]
    assert list(model.state_dict()) == keys

    plain = timm.create_model("test_resnet", num_classes=5)
    plain.load_state_dict(model.state_dict(), strict=True)
    x = _images(16)
    model.eval(), plain.eval()
    assert torch.allclose(model(x), plain(x))  # eval: no DropConnect

    model.train()
    out = model(x)
    head = find_head(model)[0][1]
    dropped = torch.isclose(out, head.bias.expand_as(out)).all(dim=1)  # zero features -> logits = bias
    assert torch.equal(~dropped, _reference_mask(16, 0.5, 3))

    handle.remove()
    out = model(x)
    assert not torch.isclose(out, head.bias.expand_as(out)).all(dim=1).any()
    assert list(model.state_dict()) == keys


def test_insert_drop_connect_on_hf_vit_and_context_manager():
    model = tiny_vit(4).train()
    keys = list(model.state_dict())
    x = _images(12, size=16)
    with insert_drop_connect(model, 0.5, generator=torch.Generator().manual_seed(1)) as handle:
        assert handle.head_names == [n for n, _ in find_head(model)]
        logits = model(pixel_values=x).logits
        bias = model.classifier.bias
        dropped = torch.isclose(logits, bias.expand_as(logits)).all(dim=1)
        assert torch.equal(~dropped, _reference_mask(12, 0.5, 1))
        assert list(model.state_dict()) == keys
    logits = model(pixel_values=x).logits
    assert not torch.isclose(logits, model.classifier.bias.expand_as(logits)).all(dim=1).any()


def test_insert_drop_connect_twice_is_refused_until_removed():
    model = _resnet()
    handle = insert_drop_connect(model, 0.2)
    with pytest.raises(ValueError, match="already inserted"):
        insert_drop_connect(model, 0.2)
    handle.remove()
    insert_drop_connect(model, 0.2).remove()


def test_weight_mode_masks_linear_weights():
    model = _resnet().train()
    head = find_head(model)[0][1]
    handle = insert_drop_connect(model, 0.4, mode="weight", generator=torch.Generator().manual_seed(5))
    feats = torch.randn(6, head.in_features)
    out = head(feats)
    mask = torch.rand(head.weight.shape, generator=torch.Generator().manual_seed(5)) < 0.6
    expected = feats @ (head.weight * mask / 0.6).T + head.bias
    assert torch.allclose(out, expected, atol=1e-6)
    head.eval()
    assert torch.allclose(head(feats), feats @ head.weight.T + head.bias, atol=1e-6)
    handle.remove()


def test_weight_mode_needs_a_linear_head_and_mode_is_checked():
    model = tiny_vit(4)
    with pytest.raises(ValueError, match="mode="):
        insert_drop_connect(model, 0.2, mode="neuron")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="mode='sample'"):
        insert_drop_connect(model, 0.2, head="vit.layernorm", mode="weight")


# ------------------------------------------------------------------------------------------ DisturbLabel
def test_disturb_label_rate_matches_the_multinoulli_definition():
    n, classes, alpha = 20000, 10, 0.2
    labels = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(0))
    out = disturb_labels(labels, classes, alpha, generator=torch.Generator().manual_seed(1))
    changed = (out != labels).float().mean().item()
    expected = alpha * (classes - 1) / classes  # p(true class) = 1 - alpha (C - 1) / C
    assert abs(changed - expected) < 5 * math.sqrt(expected * (1 - expected) / n)
    # changed labels land uniformly on the other classes
    offsets = ((out - labels) % classes)[out != labels]
    counts = torch.bincount(offsets, minlength=classes)[1:].float()
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()
    again = disturb_labels(labels, classes, alpha, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    assert out.dtype == labels.dtype


def test_disturb_label_alpha_zero_is_identity_and_alpha_one_is_uniform():
    labels = torch.randint(0, 5, (5000,), generator=torch.Generator().manual_seed(0))
    same = disturb_labels(labels, 5, 0.0)
    assert torch.equal(same, labels) and same is not labels
    out = disturb_labels(labels, 5, 1.0, generator=torch.Generator().manual_seed(2))
    kept = (out == labels).float().mean().item()
    assert abs(kept - 0.2) < 5 * math.sqrt(0.16 / 5000)


def test_disturb_label_keeps_ignore_index_and_validates():
    labels = torch.tensor([-100, 0, 1, -100, 2] * 200)
    out = disturb_labels(labels, 3, 1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[labels < 0], labels[labels < 0])
    with pytest.raises(TypeError, match="integer class indices"):
        disturb_labels(torch.rand(4, 3), 3, 0.1)
    with pytest.raises(ValueError, match="out of range"):
        disturb_labels(torch.tensor([0, 3]), 3, 0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        disturb_labels(torch.tensor([0, 1]), 3, 1.5)


# ------------------------------------------------------------------------------------------------ L2-SP
def _head_sq(model: nn.Module, reg: L2SP) -> float:
    params = dict(model.named_parameters())
    return sum(params[n].detach().pow(2).sum().item() for n in reg.head_param_names)


def test_l2sp_zero_pull_at_init_and_exact_value_after_perturbation():
    model = _resnet()
    reg = L2SP(model, alpha=0.1, beta=0.01)
    head_names = {f"{name}.{pn}" for name, m in find_head(model) for pn, _ in m.named_parameters()}
    assert set(reg.head_param_names) == head_names
    assert set(reg.backbone_param_names).isdisjoint(reg.head_param_names)
    assert reg.param_names() == {n for n, _ in model.named_parameters()}  # reference: all params covered
    assert reg.penalty(model).item() == pytest.approx(0.5 * 0.01 * _head_sq(model, reg), rel=1e-6)
    assert L2SP(model, alpha=0.1, beta=0.0).penalty(model).item() == 0.0

    name = "layer1.0.conv1.weight"
    param = dict(model.named_parameters())[name]
    with torch.no_grad():
        param.add_(0.1)
    expected = 0.5 * 0.1 * (0.1**2) * param.numel() + 0.5 * 0.01 * _head_sq(model, reg)
    assert reg.penalty(model).item() == pytest.approx(expected, rel=1e-5)


def test_l2sp_gradient_pulls_toward_pretrained_weights():
    model = _resnet()
    reg = L2SP(model, alpha=0.5, beta=0.1)
    params = dict(model.named_parameters())
    w0 = params["layer2.0.conv2.weight"].detach().clone()
    with torch.no_grad():
        params["layer2.0.conv2.weight"].add_(torch.randn_like(w0))
    before = (params["layer2.0.conv2.weight"] - w0).norm().item()
    reg.penalty(model).backward()
    grad = params["layer2.0.conv2.weight"].grad
    assert torch.allclose(grad, 0.5 * (params["layer2.0.conv2.weight"].detach() - w0), atol=1e-6)
    head_w = find_head(model)[0][1].weight
    assert torch.allclose(head_w.grad, 0.1 * head_w.detach())
    untouched = params["layer3.0.conv1.weight"].grad
    assert untouched is not None and untouched.abs().max() == 0
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    assert (params["layer2.0.conv2.weight"] - w0).norm().item() == pytest.approx(0.5 * before, rel=1e-4)


def test_l2sp_skips_frozen_params_and_can_exclude_norm_and_bias():
    model = _resnet()
    reg = L2SP(model, alpha=1.0, beta=0.0)
    conv = dict(model.named_parameters())["layer1.0.conv1.weight"]
    with torch.no_grad():
        conv.add_(1.0)
    assert reg.penalty(model).item() > 0
    conv.requires_grad_(False)
    assert reg.penalty(model).item() == 0.0

    lean = L2SP(_resnet(), include_norm_and_bias=False)
    assert lean.backbone_param_names
    assert all(n.endswith("weight") for n in lean.backbone_param_names)
    bn_weights = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert not any(n.rsplit(".", 1)[0] in bn_weights for n in lean.backbone_param_names)
    assert set(lean.head_param_names) == set(reg.head_param_names)  # head L2 always covers weight and bias


def test_l2sp_through_compile_wrapper_and_hf_model():
    model = tiny_vit(4)
    reg = L2SP(model, alpha=0.2, beta=0.0)
    wrapped = torch.compile(model)  # never run: only the wrapper's parameter names are exercised
    assert reg.penalty(wrapped).item() == 0.0
    assert {n.split(".")[0] for n in reg.head_param_names} == {"classifier"}
    covered = reg.parameters(wrapped)
    assert {id(p) for p in covered} == {id(p) for p in model.parameters()}
    with torch.no_grad():
        model.vit.embeddings.cls_token.add_(0.5)
    expected = 0.5 * 0.2 * 0.25 * model.vit.embeddings.cls_token.numel()
    assert reg.penalty(wrapped).item() == pytest.approx(expected, rel=1e-5)


def test_l2sp_reports_renamed_parameters():
    reg = L2SP(_resnet(), alpha=0.1)
    with pytest.raises(KeyError, match="build L2SP"):
        reg.penalty(tiny_vit(5))


# ------------------------------------------------------------------------------------------- LR lambdas
def test_cosine_lambda_endpoints_warmup_and_monotone():
    f = cosine_lambda(100, warmup_steps=10)
    warm = [f(s) for s in range(10)]
    assert warm == sorted(warm) and warm[0] == pytest.approx(0.1) and warm[-1] == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    decay = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert cosine_lambda(10)(0) == 1.0


def test_cyclic_lambda_restarts_every_period():
    f = cyclic_cosine_lambda(100, 25)
    assert cycle_starts(100, 25) == [25, 50, 75]
    for start in (0, 25, 50, 75):
        cycle = [f(s) for s in range(start, start + 25)]
        assert cycle[0] == pytest.approx(1.0)
        assert all(a > b for a, b in zip(cycle, cycle[1:]))
        assert cycle[-1] < 0.01
        assert f(start + 12.5) == pytest.approx(0.5)
    assert f(100) == 0.0


def test_cyclic_lambda_absorbs_remainder_warmup_and_explicit_restarts():
    f = cyclic_cosine_lambda(110, 25, warmup_steps=5)
    assert cycle_starts(110, 25) == [25, 50, 75]
    assert f(0) == pytest.approx(0.2) and f(4) == pytest.approx(1.0) and f(5) == pytest.approx(1.0)
    assert f(75) == pytest.approx(1.0) and f(75 + 17.5) == pytest.approx(0.5)  # last cycle spans 35 steps
    g = cyclic_cosine_lambda(90, None, restart_steps=[40, 70])
    assert g(40) == 1.0 and g(70) == 1.0 and g(39) < 0.01 and g(55) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="before the first restart"):
        cyclic_cosine_lambda(100, 10, warmup_steps=10)
    with pytest.raises(ValueError, match="period_steps or restart_steps"):
        cyclic_cosine_lambda(100, None)
    with pytest.raises(ValueError, match="total_steps"):
        cosine_lambda(0)


def test_lambdas_drive_lambdalr():
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [param]}, {"params": [nn.Parameter(torch.zeros(1))]}], lr=0.1)
    backbone, head = cosine_lambda(40), cyclic_cosine_lambda(40, 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [backbone, head])
    seen = []
    for step in range(40):
        seen.append([g["lr"] for g in opt.param_groups])
        assert seen[-1] == pytest.approx([0.1 * backbone(step), 0.1 * head(step)])
        opt.step()
        sched.step()
    assert seen[20][1] == pytest.approx(0.1) and seen[20][0] == pytest.approx(0.05)


def test_insert_dropout_masks_head_input_in_training_only():
    from rifle_hf.regularizers import insert_dropout

    model = tiny_vit(4)
    x = torch.randn(8, 3, 16, 16)
    model.eval()
    ref = model(pixel_values=x).logits
    torch.manual_seed(0)
    with insert_dropout(model, 0.5) as handle:
        assert handle.head_names == ["classifier"]
        assert set(model.state_dict()) == set(tiny_vit(4).state_dict())
        out_eval = model(pixel_values=x).logits
        model.classifier.train()  # only the head in train mode: the difference comes from the hook
        out_train = model(pixel_values=x).logits
    model.classifier.eval()
    assert torch.equal(out_eval, ref) and not torch.allclose(out_train, ref)
    assert torch.equal(model(pixel_values=x).logits, ref)  # removed: back to the plain model
