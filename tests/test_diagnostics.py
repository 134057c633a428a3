"""Backpropagation-in-depth diagnostics on real small timm / HF models, hand loops and a real Trainer."""

from __future__ import annotations

import csv
import re

import pytest
import timm
import torch
from conftest import ImageDataset, tiny_convnext, tiny_vit
from torch import nn
from transformers import TrainerCallback

from rifle_hf import find_head, reinit_head
from rifle_hf.diagnostics import (
    DepthDiagnosticsCallback,
    DepthTracker,
    compare_depth,
    depth_groups,
    lowest_third,
    lowest_third_ratios,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def _head_names(model: nn.Module) -> list[str]:
    return [f"{name}.{pn}" for name, m in find_head(model) for pn, _ in m.named_parameters()]


def _check_partition(model: nn.Module, groups: dict[str, list[str]]) -> None:
    flat = [n for names in groups.values() for n in names]
    assert sorted(flat) == sorted(n for n, _ in model.named_parameters())
    assert len(flat) == len(set(flat))
    assert groups["head"] == _head_names(model)
    assert all(groups.values())


def _tiny_hf_vit(layers: int):
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=32, num_labels=3,
    )
    return ViTForImageClassification(cfg)


# ----------------------------------------------------------------------------------------------- groups
@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        (lambda: timm.create_model("test_resnet", num_classes=5),
         ["stem", "stage1", "stage2", "stage3", "stage4", "head"]),
        (lambda: timm.create_model("test_efficientnet", num_classes=5), None),
        (lambda: timm.create_model("test_vit", num_classes=5), None),
        (lambda: tiny_convnext(4), ["stem", "stage1", "stage2", "neck", "head"]),
        (lambda: tiny_vit(4), ["stem", "stage1", "neck", "head"]),
        (lambda: _tiny_hf_vit(3), ["stem", "stage1", "stage2", "stage3", "neck", "head"]),
    ],
    ids=["timm_resnet", "timm_efficientnet", "timm_vit", "hf_convnext", "hf_vit1", "hf_vit3"],
)
def test_depth_groups_partition_params_in_depth_order(factory, expected):
    model = factory()
    groups = depth_groups(model)
    _check_partition(model, groups)
    keys = list(groups)
    assert keys[0] == "stem" and keys[-1] == "head" and "stage1" in keys
    if expected is not None:
        assert keys == expected
    order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    stage_keys = [k for k in keys if k.startswith("stage")]
    firsts = [min(order[n] for n in groups[k]) for k in stage_keys]
    assert firsts == sorted(firsts)  # stages run from input to output


def test_depth_groups_timm_stem_and_stage_contents():
    groups = depth_groups(timm.create_model("test_resnet", num_classes=5))
    assert all(n.startswith("conv1") or n.startswith("bn1") for n in groups["stem"])
    assert all(n.startswith("layer2.") for n in groups["stage2"])
    vit = depth_groups(timm.create_model("test_vit", num_classes=5))
    assert "pos_embed" in vit["stem"] and "norm.weight" in list(vit.values())[-2]


def test_depth_groups_num_groups_merges_and_generic_fallback():
    model = _tiny_hf_vit(4)
    merged = depth_groups(model, num_groups=2)
    assert list(merged) == ["stem", "stage1-2", "stage3-4", "neck", "head"]
    assert all(re.search(r"\.layers?\.[01]\.", n) for n in merged["stage1-2"])  # "layer" before transformers 5
    _check_partition(model, merged)
    assert list(depth_groups(model, num_groups=10)) == list(depth_groups(model))

    mlp = nn.Sequential()
    mlp.add_module("inp", nn.Linear(4, 8))
    mlp.add_module("hidden", nn.Linear(8, 8))
    mlp.add_module("mid", nn.Linear(8, 8))
    mlp.add_module("fc", nn.Linear(8, 3))
    groups = depth_groups(mlp, num_groups=3, head="fc")
    assert list(groups) == ["stage1", "stage2", "stage3", "head"]
    assert [len(v) for v in groups.values()] == [2, 2, 2, 2]
    assert groups["head"] == ["fc.weight", "fc.bias"]
    with pytest.raises(ValueError, match="num_groups"):
        depth_groups(mlp, num_groups=0, head="fc")


def test_lowest_third_by_parameter_position():
    groups = {"stem": ["a"] * 3, "stage1": ["b"] * 15, "stage2": ["c"] * 15, "stage3": ["d"] * 15, "head": ["h"] * 2}
    assert lowest_third(groups) == ["stem", "stage1"]
    vit_like = {"stem": ["s"] * 4, **{f"stage{i}": ["x"] * 12 for i in range(1, 13)}, "neck": ["n"] * 2}
    assert lowest_third(vit_like) == ["stem", "stage1", "stage2", "stage3", "stage4"]
    assert lowest_third({"stage1": ["a"] * 100, "stage2": ["b"]}) == ["stage1"]
    with pytest.raises(ValueError, match="depth_groups"):
        lowest_third({"head": ["w"]})


# ---------------------------------------------------------------------------------------------- tracker
def _train(model: nn.Module, tracker: DepthTracker, steps: int, reinit_at: int | None = None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    model.train()
    for step in range(1, steps + 1):
        x = torch.randn(8, 3, 32, 32, generator=g)
        y = torch.randint(0, 5, (8,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        tracker.record_grads(model)
        opt.step()
        tracker.record_weights(model, step)
        if reinit_at is not None and step == reinit_at:
            reinit_head(model, optimizer=opt)
            tracker.mark_reinit(step)


def test_tracker_hand_loop_distances_grads_csv_plot(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5)
    tracker = DepthTracker(model)
    _check_partition(model, tracker.groups)
    start = tracker.record_weights(model, 0)
    assert all(v == 0.0 for v in start.values())

    _train(model, tracker, steps=4)
    assert [row["step"] for row in tracker.history] == [0, 1, 2, 3, 4]
    last = tracker.history[-1]
    for g in tracker.groups:
        assert last[f"dist/{g}"] > 0
        assert last[f"grad/{g}"] > 0
    assert "grad/stem" not in tracker.history[0]

    csv_path = tracker.to_csv(tmp_path / "depth.csv")
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 5 and rows[0]["grad/stem"] == "" and float(rows[-1]["dist/head"]) == pytest.approx(last["dist/head"])
    png = tracker.plot(tmp_path / "plots" / "depth.png", reinit_steps=[2], title="resnet")
    _assert_png(png)

    summary = tracker.summary()
    assert summary["final_step"] == 4
    low = summary["lowest_third_groups"]
    assert low == lowest_third(tracker.groups) and low[0] == "stem"
    assert summary["lowest_third_mean"] == pytest.approx(sum(last[f"dist/{g}"] for g in low) / len(low))


def test_tracker_distance_is_relative_to_w0():
    model = tiny_vit(4)
    tracker = DepthTracker(model)
    head = [p for _, m in find_head(model) for p in m.parameters()]
    w0_norm = torch.sqrt(sum(p.detach().pow(2).sum() for p in head)).item()
    with torch.no_grad():
        for p in head:
            p.add_(0.01)
    expected = 0.01 * (sum(p.numel() for p in head) ** 0.5) / w0_norm
    dists = tracker.distances(model)
    assert dists["head"] == pytest.approx(expected, rel=1e-4)
    assert all(v == 0.0 for g, v in dists.items() if g != "head")


def test_tracker_errors_name_the_fix():
    model = timm.create_model("test_resnet", num_classes=5)
    tracker = DepthTracker(model)
    with pytest.raises(RuntimeError, match="record_weights"):
        tracker.summary()
    tracker.record_weights(model, 3)
    with pytest.raises(ValueError, match="record steps in order"):
        tracker.record_weights(model, 2)
    with pytest.raises(KeyError, match="depth_groups"):
        DepthTracker(model, groups={"stage1": ["nope.weight"]})
    model.reset_classifier(7)
    with pytest.raises(ValueError, match="after resizing the head"):
        tracker.distances(model)


def test_compare_depth_plots_and_returns_lowest_third_ratio(tmp_path):
    runs = {}
    for name, reinit_at in (("vanilla", None), ("rifle", 2)):
        torch.manual_seed(0)
        model = timm.create_model("test_resnet", num_classes=5)
        tracker = DepthTracker(model)
        _train(model, tracker, steps=4, reinit_at=reinit_at)
        runs[name] = tracker
    assert runs["rifle"].reinit_steps == [2]
    ratio = compare_depth(runs, tmp_path / "compare.png")
    _assert_png(tmp_path / "compare.png")
    means = {k: t.summary()["lowest_third_mean"] for k, t in runs.items()}
    assert ratio == pytest.approx(means["rifle"] / means["vanilla"])
    assert lowest_third_ratios(runs) == pytest.approx({"vanilla": 1.0, "rifle": ratio})
    with pytest.raises(ValueError, match="at least two"):
        compare_depth({"vanilla": runs["vanilla"]}, tmp_path / "x.png")


# ---------------------------------------------------------------------------------------------- Trainer
class _Seen(TrainerCallback):
    """A plain reporter stand-in: records what every on_log call receives."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


@pytest.mark.slow
def test_callback_in_real_trainer_logs_depth_and_plots(tmp_path):
    from transformers import Trainer, TrainingArguments

    from rifle_hf import RifleCallback

    model = tiny_vit(4)
    seen = _Seen()
    depth = DepthDiagnosticsCallback(plot_path=tmp_path / "depth.png", csv_path=tmp_path / "depth.csv")
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=8, logging_steps=2, per_device_train_batch_size=8,
        learning_rate=5e-3, report_to="none", use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=ImageDataset(64),
        callbacks=[seen, RifleCallback(num_reinits=1, unit="step", head_lr="none")],
    )
    depth.attach(trainer)
    assert trainer.callback_handler.callbacks[0] is depth
    trainer.train()

    groups = list(depth.tracker.groups)
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(train_logs) == 4
    for entry in train_logs:
        for g in groups:
            assert entry[f"depth/dist/{g}"] > 0
            assert entry[f"depth/grad/{g}"] > 0
    # a reporter registered before attach() still receives the depth values
    assert all(f"depth/dist/{groups[0]}" in logs for logs in seen.logs if "loss" in logs)
    assert depth.tracker.reinit_steps == [4]
    _assert_png(tmp_path / "depth.png")
    rows = list(csv.DictReader((tmp_path / "depth.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8]


@pytest.mark.slow
def test_callback_every_n_steps_without_attach(tmp_path):
    from transformers import Trainer, TrainingArguments

    depth = DepthDiagnosticsCallback(every_n_steps=1)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, logging_steps=2, per_device_train_batch_size=8,
        report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
    )
    Trainer(model=tiny_convnext(4), args=args, train_dataset=ImageDataset(32), callbacks=[depth]).train()
    steps_with_grads = [r["step"] for r in depth.tracker.history if "grad/stage1" in r]
    assert steps_with_grads == [1, 2, 3, 4]
    assert [r["step"] for r in depth.tracker.history if "dist/stage1" in r] == [2, 4]
