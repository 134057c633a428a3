"""reinit_head on real small timm and HF models: what changes, what must not."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import tiny_convnext, tiny_vit

from rifle_hf import INITIALIZERS, find_head, reinit_head, split_head_param_groups
from rifle_hf.schedule import reinit_generator


def _models():
    return {
        "timm_resnet": lambda: timm.create_model("test_resnet", num_classes=5),
        "timm_vit": lambda: timm.create_model("test_vit", num_classes=5),
        "timm_efficientnet": lambda: timm.create_model("test_efficientnet", num_classes=5),
        "timm_deit_distilled": lambda: timm.create_model(
            "deit_tiny_distilled_patch16_224", num_classes=5, img_size=32, depth=1
        ),
        "hf_vit": lambda: tiny_vit(5),
        "hf_convnext": lambda: tiny_convnext(5),
    }


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(_models()))
def test_head_changes_backbone_does_not_and_params_keep_identity(name):
    model = _models()[name]()
    head_param_ids = {id(p) for _, m in find_head(model) for p in m.parameters()}
    before = _snapshot(model)
    ids_before = {n: id(p) for n, p in model.named_parameters()}

    names = reinit_head(model, generator=reinit_generator(0, 0))

    assert names == [n for n, _ in find_head(model)]
    assert {n: id(p) for n, p in model.named_parameters()} == ids_before  # same Parameter objects
    for n, p in model.named_parameters():
        if id(p) in head_param_ids:
            assert not torch.equal(p, before[n]), f"{n} was not re-initialized"
            if p.dim() >= 2:
                assert p.abs().sum() > 0
        else:
            assert torch.equal(p, before[n]), f"{n} is not in the head but changed"


def test_zero_initialized_head_gets_random_values():
    model = timm.create_model("test_vit", num_classes=5)
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    reinit_head(model, generator=reinit_generator(1, 0))
    assert model.head.weight.abs().min() >= 0 and model.head.weight.std() > 0
    assert model.head.bias.abs().sum() > 0


def test_default_init_matches_linear_reset_parameters_distribution():
    head = torch.nn.Linear(400, 300)
    model = torch.nn.Sequential(torch.nn.Linear(8, 400), torch.nn.ReLU(), head)
    reinit_head(model, head="2", generator=reinit_generator(0, 0))
    bound = 1 / 400**0.5
    assert head.weight.abs().max() <= bound
    # U(-b, b) has std b / sqrt(3)
    assert abs(head.weight.std().item() - bound / 3**0.5) < 0.02 * bound
    ref = torch.nn.Linear(400, 300)  # PyTorch's own reset_parameters
    assert abs(head.weight.std().item() - ref.weight.std().item()) < 0.02 * bound


def test_deterministic_for_a_seed_and_different_across_indices():
    a, b = timm.create_model("test_resnet", num_classes=5), timm.create_model("test_resnet", num_classes=5)
    reinit_head(a, generator=reinit_generator(3, 0))
    reinit_head(b, generator=reinit_generator(3, 0))
    assert torch.equal(a.get_classifier().weight, b.get_classifier().weight)
    reinit_head(b, generator=reinit_generator(3, 1))
    assert not torch.equal(a.get_classifier().weight, b.get_classifier().weight)


@pytest.mark.parametrize("init", list(INITIALIZERS))
def test_every_initializer_gives_random_nonzero_weights(init):
    model = timm.create_model("test_resnet", num_classes=5)
    reinit_head(model, init=init, generator=reinit_generator(0, 0))
    w = model.get_classifier().weight
    assert w.std() > 0 and torch.isfinite(w).all()


def test_unknown_init_is_refused():
    with pytest.raises(ValueError, match="init="):
        reinit_head(timm.create_model("test_resnet", num_classes=5), init="zeros")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_get_values_of_their_dtype(dtype):
    model = timm.create_model("test_resnet", num_classes=5).to(dtype)
    reference = timm.create_model("test_resnet", num_classes=5)
    reinit_head(model, generator=reinit_generator(0, 0))
    reinit_head(reference, generator=reinit_generator(0, 0))
    head = model.get_classifier()
    assert head.weight.dtype == dtype
    assert torch.equal(head.weight, reference.get_classifier().weight.to(dtype))


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_optimizer_state_dropped_for_head_only(opt_name):
    model = timm.create_model("test_resnet", num_classes=5)
    params = list(model.parameters())
    opt = (
        torch.optim.SGD(params, lr=0.1, momentum=0.9)
        if opt_name == "sgd"
        else torch.optim.AdamW(params, lr=1e-3)
    )
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    assert all(p in opt.state for p in params)
    kept = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params if id(p) not in head_ids}

    reinit_head(model, optimizer=opt, generator=reinit_generator(0, 0))

    for p in params:
        if id(p) in head_ids:
            assert p not in opt.state
        else:
            assert all(torch.equal(opt.state[p][k], v) for k, v in kept[id(p)].items())
    # training goes on: the head's state is rebuilt from scratch on the next step
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    assert all(p in opt.state for p in params)


def test_split_head_param_groups_keeps_group_settings():
    model = timm.create_model("test_resnet", num_classes=5)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}], lr=0.1
    )
    moved = split_head_param_groups(opt, model)
    assert moved == 2
    assert split_head_param_groups(opt, model) == 0  # idempotent
    head = model.get_classifier()
    groups = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert groups[id(head.weight)]["rifle_head"] and groups[id(head.weight)]["weight_decay"] == 1e-4
    assert groups[id(head.bias)]["rifle_head"] and groups[id(head.bias)]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_wrapped_models_reinit_the_same_parameters():
    model = timm.create_model("test_resnet", num_classes=5)
    compiled = torch.compile(model)
    w = model.get_classifier().weight
    before = w.detach().clone()
    names = reinit_head(compiled, generator=reinit_generator(0, 0))
    assert names == ["fc"] or names == [n for n, _ in find_head(model)]
    assert model.get_classifier().weight is w and not torch.equal(w, before)
