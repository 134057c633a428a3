"""Backpropagation-in-depth diagnostics: how far, and how hard, each depth of the network moves.

RIFLE's claim is that re-initializing the head sends large gradients deep into the backbone, so the
lower layers move further from the pretrained weights than in vanilla fine-tuning.  This module
measures that for any timm / Hugging Face model:

* :func:`depth_groups` / :func:`lowest_third` -- parameter names grouped from input to output
  (``stem``, ``stage1`` ... ``stageK``, ``neck``, ``head``).
* :class:`DepthTracker` -- per group gradient norm and relative distance ``||W - W0|| / ||W0||``, for
  hand-written loops; CSV and PNG output.
* :class:`DepthDiagnosticsCallback` -- the same inside ``transformers.Trainer`` (keys
  ``depth/dist/<group>`` and ``depth/grad/<group>`` in the logs).
* :func:`compare_depth` -- plot runs side by side (e.g. vanilla vs RIFLE) and return the ratio of
  their lowest-third distances.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import TrainerControl, TrainerState
from transformers.training_args import TrainingArguments

from rifle_hf.heads import find_head, unwrap_model

__all__ = [
    "depth_groups",
    "lowest_third",
    "DepthTracker",
    "DepthDiagnosticsCallback",
    "compare_depth",
    "lowest_third_ratios",
]

logger = logging.getLogger(__name__)

HeadSpec = str | Sequence[str] | None
REINIT_LOG_KEY = "rifle/reinit"
DEFAULT_CHUNKS = 4

# A numbered container of blocks: HF ``encoder.layer.3``, ``encoder.stages.1``, ``encoder.layers.0``,
# ``encoder.blocks.7``, GPT-2 ``h.5``, timm ``blocks.3`` / ``stages.2``, torchvision ``layer2``.
_BLOCK_RE = re.compile(
    r"(?:^|\.)(?:(?:layers?|stages?|blocks?|block_list|resblocks|h)\.(\d+)|layer(\d+))(?=\.)"
)


# ------------------------------------------------------------------------------------------------ groups
def _timm_root(model: nn.Module) -> tuple[str, nn.Module] | None:
    """Outermost timm model inside ``model`` (itself, or e.g. HF ``TimmWrapper``'s ``timm_model``)."""
    for name, module in model.named_modules():
        if type(module).__module__.startswith("timm.") and callable(getattr(module, "group_matcher", None)):
            return name, module
    return None


def _matcher_regexes(matcher: Mapping[str, Any]) -> dict[str, list[re.Pattern]]:
    out: dict[str, list[re.Pattern]] = {}
    for key, spec in matcher.items():
        if spec is None:
            continue
        specs = [s[0] for s in spec] if isinstance(spec, (list, tuple)) else [spec]
        out[key] = [re.compile(s) for s in specs]
    return out


def _timm_stages(
    model: nn.Module, backbone: list[str]
) -> tuple[list[str], list[list[str]], list[str]] | None:
    """(stem, stages, neck) from timm's own ``group_matcher(coarse=True)``; None if unavailable."""
    root = _timm_root(model)
    if root is None:
        return None
    from timm.models._manipulate import group_with_matcher

    prefix = f"{root[0]}." if root[0] else ""
    inside = [n for n in backbone if n.startswith(prefix)]
    if not inside:
        return None
    try:
        matcher = root[1].group_matcher(coarse=True)
        lid_of = group_with_matcher(((n[len(prefix) :], None) for n in inside), matcher, reverse=True)
    except Exception as err:  # a model whose matcher cannot group it: use the name patterns instead
        logger.debug("timm group_matcher failed (%s); falling back to name patterns", err)
        return None
    by_lid: dict[int, list[str]] = {}
    for n in inside:
        by_lid.setdefault(lid_of[n[len(prefix) :]], []).append(n)
    ordered = [by_lid[k] for k in sorted(by_lid)]
    stem: list[str] = []
    neck: list[str] = []
    if isinstance(matcher, Mapping):
        regexes = _matcher_regexes(matcher)
        stem_res = regexes.get("stem", [])
        if stem_res and all(any(r.match(n[len(prefix) :]) for r in stem_res) for n in ordered[0]):
            stem = ordered.pop(0)
        all_res = [r for rs in regexes.values() for r in rs]
        if ordered and not any(r.match(n[len(prefix) :]) for n in ordered[-1] for r in all_res):
            neck = ordered.pop()
    elif len(ordered) > 1:  # callable matchers: timm puts the stem first by convention
        stem = ordered.pop(0)
    if not ordered:
        return None
    first, last = backbone.index(inside[0]), backbone.index(inside[-1])
    outside_before = [n for n in backbone[:first] if not n.startswith(prefix)]
    outside_after = [n for n in backbone[last + 1 :] if not n.startswith(prefix)]
    return outside_before + stem, ordered, neck + outside_after


def _pattern_stages(backbone: list[str]) -> tuple[list[str], list[list[str]], list[str]] | None:
    """(stem, stages, neck) from numbered block containers in the names; None if there are none."""
    keys: list[str | None] = []
    for n in backbone:
        m = _BLOCK_RE.search(n)
        keys.append(n[: m.end()] if m else None)
    distinct = list(dict.fromkeys(k for k in keys if k is not None))
    if not distinct:
        return None
    first = keys.index(distinct[0])
    last = max(i for i, k in enumerate(keys) if k is not None)
    stages: dict[str, list[str]] = {k: [] for k in distinct}
    current = distinct[0]
    for n, k in zip(backbone[first : last + 1], keys[first : last + 1]):
        current = k if k is not None else current  # unnumbered params between blocks join the previous one
        stages[current].append(n)
    return backbone[:first], [stages[k] for k in distinct], backbone[last + 1 :]


def _chunks(items: Sequence, n: int) -> list[list]:
    n = max(1, min(n, len(items)))
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(list(items[start:end]))
        start = end
    return out


def depth_groups(
    model: nn.Module, num_groups: int | None = None, head: HeadSpec = None
) -> dict[str, list[str]]:
    """Parameter names grouped by depth, input to output: ``stem``, ``stage1..K``, ``neck``, ``head``.

    Stages come from timm's ``group_matcher(coarse=True)`` when the model (or a submodule, e.g. HF's
    ``TimmWrapper``) is a timm model; otherwise from numbered block containers in the parameter names
    (``encoder.layer.N``, ``encoder.stages.N``, ``layers.N``, ``blocks.N``, ``h.N``, ``layerN``);
    otherwise the backbone is cut, in registration order, into ``num_groups`` (default 4) chunks of
    equal tensor count.  ``num_groups`` also merges natural stages into that many contiguous groups
    (named ``stageA-B``).  ``stem`` is what precedes the first stage, ``neck`` what follows the last
    (final norm, pooler); ``head`` holds the parameters of ``find_head``'s modules.  Every parameter
    appears exactly once; empty groups are left out.  Names are those of ``unwrap_model(model)``.
    """
    if num_groups is not None and num_groups < 1:
        raise ValueError(f"num_groups={num_groups} must be >= 1 (or None for the model's natural stages).")
    base = unwrap_model(model)
    named = list(base.named_parameters())
    head_ids = {id(p) for _, m in find_head(base, head) for p in m.parameters()}
    head_names = [n for n, p in named if id(p) in head_ids]
    backbone = [n for n, p in named if id(p) not in head_ids]
    split = _timm_stages(base, backbone) or _pattern_stages(backbone)
    if split is None:
        stem, stages, neck = [], _chunks(backbone, num_groups or DEFAULT_CHUNKS), []
    else:
        stem, stages, neck = split
    labels = [f"stage{i}" for i in range(1, len(stages) + 1)]
    if split is not None and num_groups is not None and len(stages) > num_groups:
        index_chunks = _chunks(list(range(len(stages))), num_groups)
        labels = [f"stage{c[0] + 1}" if len(c) == 1 else f"stage{c[0] + 1}-{c[-1] + 1}" for c in index_chunks]
        stages = [[n for i in c for n in stages[i]] for c in index_chunks]
    groups: dict[str, list[str]] = {}
    if stem:
        groups["stem"] = stem
    for label, names in zip(labels, stages):
        if names:
            groups[label] = names
    if neck:
        groups["neck"] = neck
    if head_names:
        groups["head"] = head_names
    return groups


def lowest_third(groups: Mapping[str, Sequence[str]]) -> list[str]:
    """The backbone groups (not ``head``) that make up the lowest third of the backbone by depth.

    Depth is position in the ordered groups, measured in parameter tensors; a group counts if its
    midpoint lies within the first third.  The first group always counts.
    """
    backbone = [(g, len(names)) for g, names in groups.items() if g != "head" and names]
    if not backbone:
        raise ValueError("lowest_third: no backbone groups; pass the dict returned by depth_groups().")
    total = sum(c for _, c in backbone)
    out, start = [], 0
    for g, count in backbone:
        if not out or start + count / 2 <= total / 3:
            out.append(g)
        start += count
    return out


# ------------------------------------------------------------------------------------------------ tracker
def _group_norm(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not tensors:
        return torch.zeros((), device=device)
    norms = [torch.linalg.vector_norm(t.detach().float()).to(device) for t in tensors]
    return torch.linalg.vector_norm(torch.stack(norms))


class DepthTracker:
    """Per depth group gradient norms and distances from the starting weights, for custom loops.

    ``DepthTracker(model)`` snapshots ``W0``; after ``loss.backward()`` call :meth:`record_grads`, after
    ``optimizer.step()`` call :meth:`record_weights` (every step or every few).  ``history`` holds one
    dict per recorded step: ``{"step": s, "dist/<group>": ..., "grad/<group>": ...}``.  Distances are
    relative, ``||W - W0|| / ||W0||`` over the group (absolute where ``||W0|| == 0``).  The snapshot
    costs one copy of the weights; ``snapshot_device="cpu"`` keeps it off the accelerator.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: Mapping[str, Sequence[str]] | None = None,
        num_groups: int | None = None,
        head: HeadSpec = None,
        snapshot_device: torch.device | str | None = None,
    ) -> None:
        base = unwrap_model(model)
        self.groups: dict[str, list[str]] = (
            {g: list(n) for g, n in groups.items()}
            if groups is not None
            else depth_groups(base, num_groups, head)
        )
        params = dict(base.named_parameters())
        unknown = [n for names in self.groups.values() for n in names if n not in params]
        if unknown:
            raise KeyError(
                f"DepthTracker: {unknown[:3]} are not parameters of the model; build groups with depth_groups(model)."
            )
        self.history: list[dict[str, float]] = []
        self.reinit_steps: list[int] = []
        self._pending_grads: dict[str, float] | None = None
        with torch.no_grad():
            self._w0 = {
                n: params[n].detach().to(device=snapshot_device or params[n].device, copy=True)
                for names in self.groups.values()
                for n in names
            }
            self._w0_norm = {
                g: float(_group_norm([self._w0[n] for n in names], torch.device("cpu")))
                for g, names in self.groups.items()
            }

    # -- recording ------------------------------------------------------------------------------------
    def _row(self, step: int) -> dict[str, float]:
        if self.history and self.history[-1]["step"] == step:
            return self.history[-1]
        if self.history and step < self.history[-1]["step"]:
            raise ValueError(
                f"step {step} is before the last recorded step {self.history[-1]['step']}; record steps in order."
            )
        row: dict[str, float] = {"step": step}
        self.history.append(row)
        return row

    def _params(self, model: nn.Module) -> dict[str, torch.Tensor]:
        params = dict(unwrap_model(model).named_parameters())
        missing = [n for n in self._w0 if n not in params]
        if missing:
            raise KeyError(
                f"DepthTracker: {missing[:3]} missing from the model; track the model the tracker was built from."
            )
        return params

    def grad_norms(self, model: nn.Module) -> dict[str, float]:
        """Per group ``||grad||`` of the current ``.grad`` tensors (0 for a group without grads)."""
        params = self._params(model)
        device = next(iter(params.values())).device
        norms = torch.stack(
            [
                _group_norm([params[n].grad for n in names if params[n].grad is not None], device)
                for names in self.groups.values()
            ]
        )
        return dict(zip(self.groups, norms.tolist()))

    def distances(self, model: nn.Module) -> dict[str, float]:
        """Per group ``||W - W0|| / ||W0||`` for the model's current weights."""
        params = self._params(model)
        device = next(iter(params.values())).device
        with torch.no_grad():
            diffs = []
            for names in self.groups.values():
                parts = []
                for n in names:
                    p, w0 = params[n], self._w0[n]
                    if p.shape != w0.shape:
                        raise ValueError(
                            f"DepthTracker: {n} changed shape {tuple(w0.shape)} -> {tuple(p.shape)}; build the tracker after resizing the head."
                        )
                    parts.append(p.detach().float() - w0.to(p.device).float())
                diffs.append(_group_norm(parts, device))
            absolute = torch.stack(diffs).tolist()
        return {g: d / self._w0_norm[g] if self._w0_norm[g] > 0 else d for g, d in zip(self.groups, absolute)}

    def record_grads(self, model: nn.Module, step: int | None = None) -> dict[str, float]:
        """Record per group grad norms (call after backward, before the optimizer step).

        With ``step=None`` the values join the row of the next :meth:`record_weights` call.
        """
        norms = self.grad_norms(model)
        if step is None:
            self._pending_grads = norms
        else:
            self._row(int(step)).update({f"grad/{g}": v for g, v in norms.items()})
        return norms

    def record_weights(self, model: nn.Module, step: int) -> dict[str, float]:
        """Record per group relative distance from ``W0`` at ``step``."""
        dists = self.distances(model)
        row = self._row(int(step))
        row.update({f"dist/{g}": v for g, v in dists.items()})
        if self._pending_grads is not None:
            row.update({f"grad/{g}": v for g, v in self._pending_grads.items()})
            self._pending_grads = None
        return dists

    def mark_reinit(self, step: int) -> None:
        """Note a head re-initialization at ``step`` (drawn as a vertical line by :meth:`plot`)."""
        if int(step) not in self.reinit_steps:
            self.reinit_steps.append(int(step))

    # -- output ---------------------------------------------------------------------------------------
    def series(self, kind: str, group: str) -> tuple[list[int], list[float]]:
        """Steps and values of ``kind`` ("dist" or "grad") for one group, skipping steps without it."""
        key = f"{kind}/{group}"
        rows = [r for r in self.history if key in r]
        return [int(r["step"]) for r in rows], [float(r[key]) for r in rows]

    def columns(self) -> list[str]:
        return ["step"] + [f"{k}/{g}" for k in ("dist", "grad") for g in self.groups]

    def to_csv(self, path: str | Path) -> Path:
        """Write ``history`` as CSV (one row per recorded step; empty cells where not recorded)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns(), restval="")
            writer.writeheader()
            writer.writerows(self.history)
        return path

    def summary(self) -> dict[str, Any]:
        """Final per group distance (and grad norm), the lowest-third groups and their mean distance."""
        dist_rows = [r for r in self.history if any(k.startswith("dist/") for k in r)]
        if not dist_rows:
            raise RuntimeError(
                "DepthTracker.summary: nothing recorded yet; call record_weights(model, step) first."
            )
        last = dist_rows[-1]
        final = {g: last[f"dist/{g}"] for g in self.groups if f"dist/{g}" in last}
        grad_rows = [r for r in self.history if any(k.startswith("grad/") for k in r)]
        grads = {
            g: grad_rows[-1][f"grad/{g}"] for g in self.groups if grad_rows and f"grad/{g}" in grad_rows[-1]
        }
        low = lowest_third(self.groups)
        return {
            "final_step": int(last["step"]),
            "final_distance": final,
            "final_grad_norm": grads,
            "lowest_third_groups": low,
            "lowest_third_mean": sum(final[g] for g in low) / len(low),
            "reinit_steps": list(self.reinit_steps),
        }

    def plot(
        self, path: str | Path, reinit_steps: Sequence[int] | None = None, title: str | None = None
    ) -> Path:
        """PNG with distance (top) and grad norm (bottom) per group over steps; dashed lines at re-inits."""
        fig = _figure(figsize=(9, 7))
        ax_d, ax_g = fig.subplots(2, 1, sharex=True)
        marks = self.reinit_steps if reinit_steps is None else list(reinit_steps)
        _draw_groups(ax_d, self, "dist", marks)
        _draw_groups(ax_g, self, "grad", marks)
        ax_d.set_ylabel("||W - W0|| / ||W0||  (log)")
        ax_g.set_ylabel("||grad||  (log)")
        ax_g.set_xlabel("optimizer step")
        ax_d.legend(fontsize=7, ncol=2, loc="upper left")
        fig.suptitle(title or "Backpropagation in depth")
        return _save(fig, path)


# ---------------------------------------------------------------------------------------------- plotting
def _figure(figsize: tuple[float, float]) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - matplotlib is in the dev extras
        raise ImportError("Plotting needs matplotlib: pip install 'rifle-hf[plot]'.") from err
    return Figure(figsize=figsize, layout="constrained")  # no pyplot: no global backend state


def _save(fig: Any, path: str | Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100)
    return path


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(n - 1, 1) * 0.9) for i in range(n)]


def _draw_groups(ax: Any, tracker: DepthTracker, kind: str, reinit_steps: Sequence[int]) -> list[float]:
    """One line per group on a log axis (the head moves orders of magnitude more than the stem)."""
    drawn: list[float] = []
    for color, group in zip(_colors(len(tracker.groups)), tracker.groups):
        points = [(s, v) for s, v in zip(*tracker.series(kind, group)) if v > 0 and math.isfinite(v)]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, color=color, label=group, marker="." if len(steps) < 30 else None)
            drawn.extend(values)
    if drawn:
        ax.set_yscale("log")
    for i, s in enumerate(reinit_steps):
        ax.axvline(
            s, color="crimson", linestyle="--", linewidth=0.8, label="head re-init" if i == 0 else None
        )
    ax.grid(alpha=0.3, which="both")
    return drawn


def lowest_third_ratios(
    trackers: Mapping[str, DepthTracker], baseline: str | None = None
) -> dict[str, float]:
    """Each run's lowest-third mean distance divided by the baseline's (default: the first run)."""
    if not trackers:
        raise ValueError("lowest_third_ratios needs at least one tracker.")
    baseline = baseline if baseline is not None else next(iter(trackers))
    if baseline not in trackers:
        raise KeyError(f"baseline {baseline!r} is not one of {list(trackers)}.")
    means = {k: t.summary()["lowest_third_mean"] for k, t in trackers.items()}
    ref = means[baseline]
    return {k: (v / ref if ref > 0 else (math.inf if v > 0 else math.nan)) for k, v in means.items()}


def compare_depth(trackers: Mapping[str, DepthTracker], path: str | Path, title: str | None = None) -> float:
    """Plot runs side by side and return lowest-third distance of the LAST run over the FIRST.

    Pass the baseline first, e.g. ``{"vanilla": t0, "rifle": t1}``: a return value above 1 means the
    lower layers moved further under RIFLE.  The figure has one distance-over-steps panel per run
    (shared y axis, re-init lines from each tracker) and a bar chart of final distance per group.
    """
    if len(trackers) < 2:
        raise ValueError(f"compare_depth needs at least two runs (baseline first), got {list(trackers)}.")
    names = list(trackers)
    ratios = lowest_third_ratios(trackers, baseline=names[0])
    n = len(names)
    fig = _figure(figsize=(4.2 * (n + 1), 4.2))
    axes = [fig.add_subplot(1, n + 1, 1)]
    axes += [fig.add_subplot(1, n + 1, i + 1, sharey=axes[0]) for i in range(1, n)]
    axes.append(fig.add_subplot(1, n + 1, n + 1))
    for ax, name in zip(axes[:n], names):
        tracker = trackers[name]
        _draw_groups(ax, tracker, "dist", tracker.reinit_steps)
        ax.set_title(f"{name} (lowest third x{ratios[name]:.2f})", fontsize=9)
        ax.set_xlabel("optimizer step")
    axes[0].set_ylabel("||W - W0|| / ||W0||  (log)")
    axes[0].legend(fontsize=7, loc="upper left")
    bar = axes[n]
    groups = list(dict.fromkeys(g for t in trackers.values() for g in t.groups))
    width = 0.8 / n
    any_positive = False
    for i, name in enumerate(names):
        final = trackers[name].summary()["final_distance"]
        heights = [final.get(g, 0.0) for g in groups]
        any_positive = any_positive or any(h > 0 for h in heights)
        bar.bar([j + i * width for j in range(len(groups))], heights, width, label=name)
    if any_positive:
        bar.set_yscale("log")
    bar.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups, rotation=60, fontsize=7)
    bar.set_title("final distance per group", fontsize=9)
    bar.legend(fontsize=7)
    fig.suptitle(title or f"Backpropagation in depth: {names[-1]} / {names[0]} = {ratios[names[-1]]:.2f}")
    _save(fig, path)
    return ratios[names[-1]]


# ---------------------------------------------------------------------------------------------- callback
class DepthDiagnosticsCallback(TrainerCallback):
    """:class:`DepthTracker` inside ``transformers.Trainer``.

    Grad norms are recorded at ``on_pre_optimizer_step`` (after clipping, before the update) every
    ``every_n_steps`` optimizer steps (default: ``logging_steps``); distances at every training log.
    Both are added to the logs as ``depth/dist/<group>`` and ``depth/grad/<group>`` (latest grads) and
    to ``state.log_history``.  Reporters (TensorBoard, W&B) registered before this callback -- which
    is the case for ``Trainer(callbacks=[...])`` -- receive the logs before we add to them, so
    use :meth:`attach` (``DepthDiagnosticsCallback(...).attach(trainer)``), which puts this callback
    first.  At the end of training the CSV / PNG are written (main process only) with vertical lines
    where ``rifle/reinit`` was logged.  ``W0`` is snapshotted at ``on_train_begin``, so a run resumed
    from a checkpoint measures distances from the resumed weights.  With fp16 loss scaling and
    ``max_grad_norm=0`` the recorded grads are still scaled.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        plot_path: str | Path | None = None,
        csv_path: str | Path | None = None,
        num_groups: int | None = None,
        head: HeadSpec = None,
        groups: Mapping[str, Sequence[str]] | None = None,
        prefix: str = "depth",
        snapshot_device: torch.device | str | None = None,
        title: str | None = None,
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be >= 1 (or None for logging_steps).")
        self.every_n_steps = every_n_steps
        self.plot_path = plot_path
        self.csv_path = csv_path
        self.num_groups = num_groups
        self.head = head
        self.groups = groups
        self.prefix = prefix
        self.snapshot_device = snapshot_device
        self.title = title
        self.tracker: DepthTracker | None = None
        self._every = every_n_steps or 1
        self._last_grads: dict[str, float] = {}

    def attach(self, trainer: Trainer) -> DepthDiagnosticsCallback:
        """Register this callback ahead of the reporting integrations so they log the depth values."""
        callbacks = trainer.callback_handler.callbacks
        callbacks[:] = [cb for cb in callbacks if cb is not self]
        callbacks.insert(0, self)
        return self

    def _key(self, kind: str, group: str) -> str:
        return f"{self.prefix}/{kind}/{group}"

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("DepthDiagnosticsCallback needs the model; use it inside transformers.Trainer.")
        if self.every_n_steps is None:
            steps = (
                args.logging_steps
                if str(getattr(args.logging_strategy, "value", args.logging_strategy)) == "steps"
                else 1
            )
            self._every = max(1, int(steps if steps >= 1 else math.ceil(steps * max(state.max_steps, 1))))
        if self.tracker is None or state.global_step == 0:
            self.tracker = DepthTracker(model, self.groups, self.num_groups, self.head, self.snapshot_device)
        self._last_grads = {}

    def on_pre_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        step = state.global_step + 1  # the step this update will complete
        if self.tracker is None or model is None or step % self._every:
            return
        self._last_grads = self.tracker.record_grads(model, step)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if self.tracker is None or model is None or logs is None:
            return
        if REINIT_LOG_KEY in logs:
            self.tracker.mark_reinit(state.global_step)
        if not ("loss" in logs or "learning_rate" in logs) or any(k.startswith("eval_") for k in logs):
            return
        dists = self.tracker.record_weights(model, state.global_step)
        entries = {self._key("dist", g): v for g, v in dists.items()}
        entries.update({self._key("grad", g): v for g, v in self._last_grads.items()})
        logs.update(entries)
        last = state.log_history[-1] if state.log_history else None
        if (
            last is not None
            and last.get("step") == state.global_step
            and all(k in last for k in logs if k in ("loss", "learning_rate"))
        ):
            last.update(entries)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if self.tracker is None:
            return
        if model is not None and state.global_step > 0:
            rows = [r for r in self.tracker.history if any(k.startswith("dist/") for k in r)]
            if not rows or rows[-1]["step"] != state.global_step:
                self.tracker.record_weights(model, state.global_step)
        for entry in state.log_history:
            if REINIT_LOG_KEY in entry and "step" in entry:
                self.tracker.mark_reinit(int(entry["step"]))
        self.tracker.reinit_steps.sort()
        if not state.is_world_process_zero:
            return
        if self.csv_path is not None:
            self.tracker.to_csv(self.csv_path)
        if self.plot_path is not None:
            self.tracker.plot(self.plot_path, title=self.title)
