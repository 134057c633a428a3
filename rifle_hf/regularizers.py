"""The RIFLE paper's competitor methods as small, composable pieces.

RIFLE (Li et al., ICML 2020) is compared against Dropout, DropConnect, StochasticDepth, DisturbLabel,
cyclic learning rates and L2-SP.  Dropout before the head and StochasticDepth are native in timm
(``drop_rate`` / ``drop_path_rate``) and in most HF configs; this module supplies the rest so that a
recipe can switch each one on with a flag, for any timm or Hugging Face model:

* :class:`DropConnect`, :func:`drop_connect`, :func:`insert_drop_connect` -- DropConnect on the head's
  input features, attached with a hook so ``state_dict()`` keys do not change.
* :func:`disturb_labels` -- DisturbLabel (Xie et al., CVPR 2016).
* :class:`L2SP` -- L2-SP (Li, Grandvalet & Davoine, ICML 2018): pull the backbone toward the pretrained
  weights, plain L2 on the head.
* :func:`cosine_lambda`, :func:`cyclic_cosine_lambda` -- multiplicative factors for ``LambdaLR``.

Definitions follow the authors' PyTorch reference, github.com/lixingjian/RIFLE ``train.py``
(commit 4b126ad); see each docstring for what that file does and where we differ.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from rifle_hf.heads import find_head, unwrap_model

__all__ = [
    "DropConnect",
    "DropConnectHandle",
    "drop_connect",
    "insert_drop_connect",
    "disturb_labels",
    "L2SP",
    "cosine_lambda",
    "cyclic_cosine_lambda",
    "cycle_starts",
]

HeadSpec = str | Sequence[str] | None


def _check_rate(p: float, name: str = "p") -> float:
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name}={p} is not a drop probability; pass a value in [0, 1).")
    return p


# --------------------------------------------------------------------------------------------- DropConnect
def drop_connect(
    x: torch.Tensor, p: float, training: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-sample DropConnect as in the RIFLE reference: zero a whole sample's features with prob ``p``.

    One Bernoulli(1 - p) draw per sample (mask shape ``[batch, 1, ..., 1]``), survivors scaled by
    ``1 / (1 - p)`` so the expectation is unchanged; identity when ``training`` is False or ``p == 0``.
    """
    p = _check_rate(p)
    if not training or p == 0.0:
        return x
    if x.dim() == 0:
        raise ValueError("drop_connect needs a batched tensor [batch, ...]; got a scalar.")
    keep = 1.0 - p
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    gen_device = generator.device if generator is not None else x.device
    draw = torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float32)
    mask = (draw < keep).to(device=x.device, dtype=x.dtype)
    return x * mask / keep


class DropConnect(nn.Module):
    """DropConnect exactly as the RIFLE reference implementation defines it (per-sample mask).

    The reference (github.com/lixingjian/RIFLE, ``train.py``, class ``DropConnect``) draws
    ``floor((1 - ratio) + U[0,1))`` with shape ``[batch, 1]`` and returns ``x / (1 - ratio) * mask`` in
    training mode, ``x`` in eval mode.  A ``[batch, 1]`` mask only fits a 2-D input, i.e. the pooled
    features that feed the FC layer, so it masks *features before the FC* (one keep/drop decision per
    sample), not the FC weights; it is the EfficientNet-style "drop connect".  (The published script
    defines the class but does not wire it in; :func:`insert_drop_connect` puts it where its shape
    says it goes.)  For the textbook weight-mask variant (Wan et al., 2013) use
    ``insert_drop_connect(..., mode="weight")``.
    """

    def __init__(self, p: float, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.p = _check_rate(p)
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_connect(x, self.p, self.training, self.generator)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class DropConnectHandle:
    """Removes the hooks :func:`insert_drop_connect` registered; also usable as a context manager."""

    def __init__(self, hooks: list[tuple[str, nn.Module, RemovableHandle]], p: float, mode: str) -> None:
        self._hooks = hooks
        self.p = p
        self.mode = mode

    @property
    def head_names(self) -> list[str]:
        return [name for name, _, _ in self._hooks]

    def remove(self) -> None:
        for _, module, handle in self._hooks:
            handle.remove()
            if getattr(module, "_rifle_drop_connect", None) is not None:
                del module._rifle_drop_connect
        self._hooks = []

    def __enter__(self) -> DropConnectHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"DropConnectHandle(p={self.p}, mode={self.mode!r}, heads={self.head_names})"


def insert_drop_connect(
    model: nn.Module,
    p: float,
    head: HeadSpec = None,
    mode: Literal["sample", "weight"] = "sample",
    generator: torch.Generator | None = None,
) -> DropConnectHandle:
    """Apply DropConnect to the head(s) found by ``rifle_hf.heads.find_head``, in place, via hooks.

    ``mode="sample"`` (default, the RIFLE reference): a forward pre-hook masks the head's input
    features per sample.  ``mode="weight"`` (Wan et al., 2013): a forward hook recomputes an
    ``nn.Linear`` head's output with a Bernoulli(1 - p) mask on its weight matrix (one mask per
    forward pass, shared by the batch), scaled by ``1 / (1 - p)``.  Both are active only while the
    head module is in training mode.  Hooks add no parameters or buffers, so ``state_dict()`` keys
    are unchanged and the weights load into the plain model.  Call ``.remove()`` on the returned
    handle to undo.
    """
    p = _check_rate(p)
    if mode not in ("sample", "weight"):
        raise ValueError(f"mode={mode!r} is not supported; pass mode='sample' or mode='weight'.")
    heads = find_head(model, head)
    hooks: list[tuple[str, nn.Module, RemovableHandle]] = []
    for name, module in heads:
        if getattr(module, "_rifle_drop_connect", None) is not None:
            for _, m, h in hooks:
                h.remove()
                del m._rifle_drop_connect
            raise ValueError(
                f"DropConnect is already inserted on head {name!r}; call .remove() on the earlier handle first."
            )
        if mode == "weight" and not isinstance(module, nn.Linear):
            raise TypeError(
                f"mode='weight' needs an nn.Linear head but {name!r} is {type(module).__name__}; "
                "use mode='sample' or pass head= naming a Linear layer."
            )
        if mode == "sample":
            drop = functools.partial(drop_connect, p=p, training=True, generator=generator)
            handle = module.register_forward_pre_hook(_input_pre_hook(name, p, drop), with_kwargs=True)
        else:
            handle = module.register_forward_hook(_weight_hook(p, generator))
        module._rifle_drop_connect = p
        hooks.append((name, module, handle))
    return DropConnectHandle(hooks, p, mode)


def _input_pre_hook(name: str, p: float, drop: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """A forward pre-hook applying ``drop`` to the head's input features while in training mode."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not module.training or p == 0.0:
            return None
        if args and isinstance(args[0], torch.Tensor):
            return (drop(args[0]),) + tuple(args[1:]), kwargs
        for key, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                return args, {**kwargs, key: drop(value)}
        raise RuntimeError(f"Hook on head {name!r} found no input tensor; call the head with a tensor.")

    return hook


def insert_dropout(model: nn.Module, p: float, head: HeadSpec = None) -> DropConnectHandle:
    """Dropout on the head's input features (the paper's "Dropout" row), in place, via a forward pre-hook.

    For models without a native ``drop_rate`` before the classifier (most HF models). Like
    :func:`insert_drop_connect`, it adds no parameters, so ``state_dict()`` is unchanged.
    """
    p = _check_rate(p)
    hooks: list[tuple[str, nn.Module, RemovableHandle]] = []
    for name, module in find_head(model, head):
        drop = functools.partial(F.dropout, p=p, training=True)
        hooks.append((name, module, module.register_forward_pre_hook(_input_pre_hook(name, p, drop), with_kwargs=True)))
    return DropConnectHandle(hooks, p, "dropout")


def _weight_hook(p: float, generator: torch.Generator | None) -> Callable:
    def hook(module: nn.Linear, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not module.training or p == 0.0:
            return None
        weight = module.weight
        gen_device = generator.device if generator is not None else weight.device
        draw = torch.rand(weight.shape, generator=generator, device=gen_device, dtype=torch.float32)
        mask = (draw < 1.0 - p).to(device=weight.device, dtype=weight.dtype)
        return F.linear(args[0], weight * mask / (1.0 - p), module.bias)

    return hook


# -------------------------------------------------------------------------------------------- DisturbLabel
def disturb_labels(
    labels: torch.Tensor, num_classes: int, alpha: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DisturbLabel (Xie et al., CVPR 2016): resample each label with probability ``alpha``.

    The paper draws each training label from a Multinoulli with ``p_c = 1 - alpha * (C - 1) / C`` for
    the true class and ``alpha / C`` for every other class.  That is the same as: with probability
    ``alpha`` replace the label by a class drawn uniformly from all ``C`` classes (possibly the true
    one), which is what we do -- so a label actually changes with probability ``alpha * (C - 1) / C``.
    Negative labels (the ``-100`` ignore index) are left alone.  Returns a new tensor.
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} is not a probability; pass a value in [0, 1].")
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(
            f"num_classes={num_classes} must be a positive integer (the classifier's output size)."
        )
    num_classes = int(num_classes)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(
            f"disturb_labels needs integer class indices, got dtype {labels.dtype}; "
            "pass hard labels (e.g. labels.argmax(-1)) rather than one-hot or soft targets."
        )
    if labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(
            f"label {int(labels.max())} is out of range for num_classes={num_classes}; pass the model's num_labels."
        )
    if alpha == 0.0 or labels.numel() == 0:
        return labels.clone()
    gen_device = generator.device if generator is not None else labels.device
    flip = torch.rand(labels.shape, generator=generator, device=gen_device) < alpha
    new = torch.randint(0, num_classes, labels.shape, generator=generator, device=gen_device)
    flip = flip.to(labels.device) & (labels >= 0)
    return torch.where(flip, new.to(device=labels.device, dtype=labels.dtype), labels)


# --------------------------------------------------------------------------------------------------- L2-SP
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _norm_and_bias_names(model: nn.Module) -> set[str]:
    """Names of biases and of parameters owned by normalization layers (any class named *Norm*)."""
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        is_norm = isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if is_norm or p_name == "bias" or p_name.endswith("_bias"):
                names.add(full)
    return names


class L2SP:
    """L2-SP regularizer (Li, Grandvalet & Davoine, ICML 2018) as used by the RIFLE reference.

    ``penalty(model) = alpha/2 * sum_backbone ||w - w0||^2 + beta/2 * sum_head ||w||^2`` where ``w0`` is
    a detached snapshot of the backbone taken at construction (build this right after loading the
    pretrained weights) and the head is what ``find_head`` returns.  Add it to the loss and set
    ``weight_decay=0`` for :meth:`param_names` -- the penalty replaces weight decay there, as the
    reference does (its SGD has ``weight_decay=1e-4`` for ``l2`` and none for ``l2_sp``).

    The reference (github.com/lixingjian/RIFLE ``train.py``, ``reg_l2sp``/``reg_classifier``) pulls
    *every* non-FC parameter toward the source, BatchNorm weights/biases and conv biases included, and
    applies the plain L2 to the FC weight and bias; its defaults are ``alpha=0.01, beta=1e-4``.  We
    match that by default; ``include_norm_and_bias=False`` leaves norm/bias backbone parameters out of
    the pull (and out of :meth:`param_names`, so they keep the optimizer's own setting).
    Backbone parameters with ``requires_grad=False`` are skipped (they cannot move).  Works through
    DDP / ``torch.compile`` wrappers (names are taken from ``unwrap_model``).
    """

    def __init__(
        self,
        model: nn.Module,
        alpha: float = 0.01,
        beta: float = 1e-4,
        head: HeadSpec = None,
        include_norm_and_bias: bool = True,
        snapshot_device: torch.device | str | None = None,
    ) -> None:
        if alpha < 0 or beta < 0:
            raise ValueError(f"L2SP needs alpha >= 0 and beta >= 0, got alpha={alpha}, beta={beta}.")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.include_norm_and_bias = include_norm_and_bias
        base = unwrap_model(model)
        head_modules = find_head(base, head)
        head_ids = {id(p) for _, m in head_modules for p in m.parameters()}
        skip = set() if include_norm_and_bias else _norm_and_bias_names(base)
        self.head_param_names: tuple[str, ...] = tuple(
            n for n, p in base.named_parameters() if id(p) in head_ids
        )
        self.backbone_param_names: tuple[str, ...] = tuple(
            n for n, p in base.named_parameters() if id(p) not in head_ids and n not in skip
        )
        params = dict(base.named_parameters())
        with torch.no_grad():
            self._w0: dict[str, torch.Tensor] = {
                n: params[n].detach().to(device=snapshot_device or params[n].device, copy=True)
                for n in self.backbone_param_names
            }

    def param_names(self) -> set[str]:
        """Names (in the unwrapped model) that the penalty covers: give these ``weight_decay=0``."""
        return set(self.backbone_param_names) | set(self.head_param_names)

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The covered parameter objects of ``model`` (wrapped or not), for building optimizer groups."""
        covered = self.param_names()
        return [p for n, p in unwrap_model(model).named_parameters() if n in covered]

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """The scalar penalty for ``model``'s current weights (differentiable; add it to the loss)."""
        params = dict(unwrap_model(model).named_parameters())
        missing = [n for n in (*self.backbone_param_names, *self.head_param_names) if n not in params]
        if missing:
            raise KeyError(
                f"L2SP: parameter(s) {missing[:3]} not found in the model; build L2SP from the same model "
                "after any head resize or wrapping that renames parameters."
            )
        device = next(iter(params.values())).device
        pull: list[torch.Tensor] = []
        for n in self.backbone_param_names:
            p = params[n]
            if not p.requires_grad:
                continue
            w0 = self._w0[n]
            if w0.shape != p.shape:
                raise ValueError(
                    f"L2SP: {n} has shape {tuple(p.shape)} but its snapshot {tuple(w0.shape)}; rebuild L2SP."
                )
            if w0.device != p.device:
                w0 = self._w0[n] = w0.to(p.device)
            pull.append((p.float() - w0.float()).pow(2).sum())
        l2 = [params[n].float().pow(2).sum() for n in self.head_param_names if params[n].requires_grad]
        zero = torch.zeros((), device=device)
        sp = torch.stack(pull).sum() if pull else zero
        head = torch.stack(l2).sum() if l2 else zero
        return 0.5 * self.alpha * sp + 0.5 * self.beta * head

    __call__ = penalty

    def __repr__(self) -> str:
        return (
            f"L2SP(alpha={self.alpha}, beta={self.beta}, backbone_params={len(self.backbone_param_names)}, "
            f"head_params={len(self.head_param_names)}, include_norm_and_bias={self.include_norm_and_bias})"
        )


# ----------------------------------------------------------------------------------------- LR schedules
def _check_steps(total_steps: int, warmup_steps: int) -> None:
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be >= 1 (number of optimizer steps).")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must be in [0, total_steps={total_steps}).")


def _cos(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def cosine_lambda(total_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """LR factor for ``LambdaLR``: linear warmup to 1, then one cosine from 1 down to 0 at ``total_steps``.

    The reference's backbone LR is ``0.5 * lr * (1 + cos(pi * epoch / num_epochs))``; this is the
    same curve per optimizer step.  During warmup the factor is ``(step + 1) / warmup_steps``.
    """
    _check_steps(total_steps, warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return _cos((step - warmup_steps) / (total_steps - warmup_steps))

    return factor


def cycle_starts(total_steps: int, period_steps: int) -> list[int]:
    """Steps where :func:`cyclic_cosine_lambda` restarts: ``k * period_steps`` for ``1 <= k < total // period``.

    A remainder shorter than one period is absorbed by the last cycle (so the LR still ends near 0),
    mirroring the reference, which trims training to a whole number of periods.
    """
    if period_steps < 1:
        raise ValueError(f"period_steps={period_steps} must be >= 1.")
    return [k * period_steps for k in range(1, max(1, total_steps // period_steps))]


def cyclic_cosine_lambda(
    total_steps: int,
    period_steps: int | None,
    warmup_steps: int = 0,
    restart_steps: Iterable[int] | None = None,
) -> Callable[[int], float]:
    """LR factor for ``LambdaLR``: cosine from 1 to 0 that restarts every ``period_steps`` (SGDR-style).

    This is the reference's ``--fc_lr_util cyclic`` curve ``0.5 * (1 + cos(pi * (t % u) / u))`` with
    ``u`` the RIFLE period, per step; restarts are at :func:`cycle_starts` so they coincide with
    RIFLE's re-init points.  Pass ``restart_steps`` instead of ``period_steps`` to restart at exactly
    the steps your RIFLE schedule uses.  ``warmup_steps`` ramps the first cycle linearly to 1.
    (The reference applies the cyclic curve to the FC layer only and plain cosine to the backbone;
    ``LambdaLR`` takes one lambda per param group, so both set-ups are possible.)
    """
    _check_steps(total_steps, warmup_steps)
    if restart_steps is not None:
        starts = sorted({int(s) for s in restart_steps})
        if any(not 0 < s < total_steps for s in starts):
            raise ValueError(
                f"restart_steps {starts} must lie strictly between 0 and total_steps={total_steps}."
            )
    elif period_steps is None:
        raise ValueError("cyclic_cosine_lambda needs period_steps or restart_steps; pass one of them.")
    else:
        starts = cycle_starts(total_steps, period_steps)
    if starts and starts[0] <= warmup_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps} must end before the first restart at step {starts[0]}."
        )
    bounds = [warmup_steps, *starts, total_steps]

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        for begin, end in zip(bounds[:-1], bounds[1:]):
            if step < end:
                return _cos((step - begin) / (end - begin))
        return 0.0

    return factor
