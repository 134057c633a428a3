"""Re-initialize the classifier head in place: the functional core of RIFLE.

The same Parameter objects receive new values (``param.copy_``), so the optimizer, DDP's gradient
buckets, an EMA copy and a compiled graph all stay valid. New values are drawn on the CPU from an
explicit generator and then copied to the parameter's device and dtype, so every rank and every
device gets bit-identical values without a collective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from .heads import find_head, unwrap_model

# fan_in, generator, shape -> values. One entry per named init; `RifleConfig(init=...)` picks one.
Initializer = Callable[[torch.Size, int, torch.Generator], torch.Tensor]


def _uniform(shape: torch.Size, bound: float, gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2.0 - 1.0) * bound


def _default_weight(shape: torch.Size, fan_in: int, gen: torch.Generator) -> torch.Tensor:
    # nn.Linear.reset_parameters: kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    return _uniform(shape, 1.0 / math.sqrt(max(fan_in, 1)), gen)


def _he_normal_weight(shape: torch.Size, fan_in: int, gen: torch.Generator) -> torch.Tensor:
    # The authors' PaddlePaddle version: He-normal (std = sqrt(2 / fan_in)).
    return torch.randn(shape, generator=gen) * math.sqrt(2.0 / max(fan_in, 1))


def _xavier_uniform_weight(shape: torch.Size, fan_in: int, gen: torch.Generator) -> torch.Tensor:
    fan_out = shape[0] * (math.prod(shape[2:]) if len(shape) > 2 else 1)
    return _uniform(shape, math.sqrt(6.0 / max(fan_in + fan_out, 1)), gen)


def _trunc_normal_weight(shape: torch.Size, fan_in: int, gen: torch.Generator) -> torch.Tensor:
    # timm's ViT-style head init, std 0.02 truncated at 2 std.
    return (torch.randn(shape, generator=gen) * 0.02).clamp_(-0.04, 0.04)


def _default_bias(shape: torch.Size, fan_in: int, gen: torch.Generator) -> torch.Tensor:
    return _uniform(shape, 1.0 / math.sqrt(max(fan_in, 1)), gen)


def _zero_bias(shape: torch.Size, fan_in: int, gen: torch.Generator) -> torch.Tensor:
    return torch.zeros(shape)


# name -> (weight initializer, bias initializer). Weights are never all-zero, whatever the
# architecture's own head init is (several zero-init their classifier, which would make RIFLE a no-op).
INITIALIZERS: dict[str, tuple[Initializer, Initializer]] = {
    "default": (_default_weight, _default_bias),  # the reference: PyTorch's reset_parameters()
    "he_normal": (_he_normal_weight, _zero_bias),  # the authors' PaddlePaddle version
    "xavier_uniform": (_xavier_uniform_weight, _zero_bias),
    "trunc_normal": (_trunc_normal_weight, _zero_bias),
}

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def _fan_in(weight: torch.Tensor) -> int:
    return int(math.prod(weight.shape[1:])) if weight.dim() > 1 else int(weight.shape[0])


@torch.no_grad()
def _reinit_module(module: nn.Module, init: str, gen: torch.Generator) -> None:
    """Give every parameter directly owned by ``module`` new values, in a fixed order."""
    weight_init, bias_init = INITIALIZERS[init]
    if isinstance(module, _NORMS):
        # Norm layers inside a user-named head container: their own (deterministic) reset.
        module.reset_parameters()
        return
    params = dict(module.named_parameters(recurse=False))
    weight = params.get("weight")
    fan_in = _fan_in(weight) if weight is not None else 1
    for pname, param in params.items():
        if param.dim() >= 2:
            values = weight_init(param.shape, _fan_in(param), gen)
        else:  # biases and other vectors (e.g. a learnable scale): small random values around 0
            values = bias_init(param.shape, fan_in, gen)
            if pname != "bias" and values.abs().sum() == 0:
                values = _default_bias(param.shape, fan_in, gen)
        param.copy_(values.to(device=param.device, dtype=param.dtype))


def check_reinit_supported(params: Iterable[nn.Parameter]) -> None:
    """Refuse sharded heads (FSDP / DTensor, DeepSpeed ZeRO-3): writing a full tensor into one shard would
    silently leave ranks with different heads. Called when training starts, never mid-run."""
    params = list(params)
    if not params:
        raise ValueError(
            "RIFLE: the classifier head has no parameters here (is it sharded, e.g. by FSDP without "
            "use_orig_params?); pass head=... naming a module that owns its weights."
        )
    for param in params:
        kinds = {type(param).__name__, type(getattr(param, "data", None)).__name__}
        if kinds & {"DTensor", "FlatParameter"} or hasattr(param, "ds_id"):
            raise ValueError(
                "RIFLE: the classifier head is sharded (FSDP / DTensor or DeepSpeed ZeRO-3); rifle-hf cannot "
                "re-initialize it consistently. Train with DDP, or keep the head unsharded (e.g. FSDP "
                "ignored_modules / ZeRO stage <= 2)."
            )


def head_parameters(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    """All parameters of the head modules, without duplicates, in a fixed order."""
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        for param in module.parameters():
            seen.setdefault(id(param), param)
    return list(seen.values())


def reset_optimizer_state(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> None:
    """Drop per-parameter optimizer state (momentum, Adam moments, step counts) for ``params``."""
    state = optimizer.state  # Accelerate's AcceleratedOptimizer forwards `.state` to the wrapped one
    for param in params:
        state.pop(param, None)


def reinit_head(
    model: nn.Module,
    *,
    head: str | Sequence[str] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
    init: str = "default",
) -> list[str]:
    """Re-initialize the classifier head of ``model`` in place and return the names touched.

    Args:
        model: any timm / Hugging Face / plain model, also wrapped in DDP, ``torch.compile``,
            Accelerate or PEFT.
        head: module path(s) overriding detection (see `find_head`).
        optimizer: if given, the head's per-parameter state is dropped; other state is kept.
        generator: a CPU ``torch.Generator`` the new values are drawn from. Seed it identically on
            every rank (`rifle_hf.schedule.reinit_generator` does) and all ranks get the same values.
            None: a generator seeded from torch's global RNG.
        init: one of `INITIALIZERS` (``"default"`` is PyTorch's ``reset_parameters``).
    """
    if init not in INITIALIZERS:
        raise ValueError(f"reinit_head: init={init!r} is not one of {tuple(INITIALIZERS)}.")
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    elif generator.device.type != "cpu":
        raise ValueError("reinit_head: pass a CPU torch.Generator (values are drawn on the CPU, then copied).")
    heads = find_head(model, head)
    for _, module in heads:
        for sub in module.modules():
            if any(True for _ in sub.parameters(recurse=False)):
                _reinit_module(sub, init, generator)
    if optimizer is not None:
        reset_optimizer_state(optimizer, head_parameters(m for _, m in heads))
    return [name for name, _ in heads]


@torch.no_grad()
def copy_head_values(source: nn.Module, target: nn.Module, names: Sequence[str]) -> None:
    """Copy the head parameters ``names`` from ``source`` into ``target`` (e.g. an EMA copy).

    ``target`` may be a timm ``ModelEmaV3``/``ModelEmaV2`` (its ``.module`` is used) or a plain model.
    """
    target = getattr(target, "module", target)
    src, dst = unwrap_model(source), unwrap_model(target)
    for name in names:
        src_mod, dst_mod = src.get_submodule(name), dst.get_submodule(name)
        dst_params = dict(dst_mod.named_parameters())
        for pname, p in src_mod.named_parameters():
            dst_params[pname].copy_(p.to(device=dst_params[pname].device, dtype=dst_params[pname].dtype))
        dst_buffers = dict(dst_mod.named_buffers())
        for bname, b in src_mod.named_buffers():
            if bname in dst_buffers:
                dst_buffers[bname].copy_(b)
