"""Mixed precision and torch.compile around re-inits: real training steps, no mocks."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from rifle_hf import RifleConfig, RifleScheduler, reinit_head, split_head_param_groups
from rifle_hf.schedule import reinit_generator


def _batches(n=12, classes=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        y = torch.randint(0, classes, (8,), generator=g)
        yield torch.randn(8, 3, size, size, generator=g) + y.view(-1, 1, 1, 1), y


def test_bf16_autocast_on_cpu_end_to_end(tmp_path):
    from conftest import ImageDataset, tiny_convnext
    from transformers import TrainingArguments

    from rifle_hf import RifleTrainer
    from rifle_hf.callback import REINIT_LOG_KEY

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=2, bf16=True, use_cpu=True,
        report_to="none", save_strategy="no", logging_steps=2, optim="sgd", learning_rate=0.05,
        disable_tqdm=True,
    )
    trainer = RifleTrainer(model=tiny_convnext(), args=args, train_dataset=ImageDataset(64),
                           rifle=RifleConfig(num_reinits=1))
    trainer.train()
    assert [e["step"] for e in trainer.state.log_history if REINIT_LOG_KEY in e] == [8]
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def test_fp16_grad_scaler_keeps_stepping_after_reinit():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    split_head_param_groups(opt, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    sched = RifleScheduler(model, RifleConfig(num_reinits=1, seed=0), total=12, unit="step", optimizer=opt)
    scales, moved = [], []
    for step, (x, y) in enumerate(_batches(), start=1):
        first = next(model.parameters())
        before = first.detach().clone()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        moved.append(not torch.equal(before, first))
        sched.step_update(step)
    assert [e.step for e in sched.history] == [6]
    # every optimizer step after the re-init really updated the weights: none was skipped for inf/nan
    assert all(moved[6:]), moved
    assert min(scales[6:]) >= scales[5]


def test_compiled_model_trains_through_reinits_without_recompiling():
    torch._dynamo.reset()
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(len(gm.graph.nodes))
        return gm.forward

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    compiled = torch.compile(model, backend=counting_backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = RifleScheduler(compiled, RifleConfig(num_reinits=3, head_lr="none", seed=0), total=12, unit="step",
                           optimizer=opt)
    after_warmup = None
    for step, (x, y) in enumerate(_batches(), start=1):
        loss = nn.functional.cross_entropy(compiled(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step_update(step)
        if step == 1:
            after_warmup = len(compiles)
    assert [e.step for e in sched.history] == [3, 6, 9]
    assert after_warmup >= 1 and len(compiles) == after_warmup, f"recompiled: {compiles}"
    torch._dynamo.reset()


def test_channels_last_conv_head_keeps_its_memory_format():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = model.to(memory_format=torch.channels_last)
    head = model[2]
    before = head.weight.detach().clone()
    assert reinit_head(model, head="2", generator=reinit_generator(0, 0)) == ["2"]
    assert head.weight.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(head.weight, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_head_parameters_stay_low_precision(dtype):
    model = timm.create_model("test_resnet", num_classes=3).to(dtype)
    reinit_head(model, generator=reinit_generator(0, 0))
    assert model.fc.weight.dtype == dtype and torch.isfinite(model.fc.weight.float()).all()
