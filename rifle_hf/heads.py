"""Find the classifier head(s) that RIFLE re-initializes.

RIFLE re-initializes only the final projection(s) that produce the logits, so this module answers one
question for any timm / Hugging Face / plain PyTorch model: *which leaf modules write the logits?*

Detection runs on the unwrapped model (see :func:`unwrap_model`) through the ordered rules in
:data:`HEAD_RULES`; the first rule that finds something wins. Every rule that knows the number of
classes only returns modules whose output size equals it, so a pooler, a ``pre_classifier`` or a
vocabulary-sized LM head is never mistaken for the classifier. Names are relative to the unwrapped
model. PEFT ``modules_to_save`` copies are resolved to the active, trainable copy (never the frozen
``original_module``), and PEFT tuner layers (LoRA etc.) are treated as single leaves.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from torch import nn

__all__ = [
    "HEAD_RULES",
    "check_head_outputs",
    "HF_HEAD_PATHS",
    "HeadNotFoundError",
    "HeadRule",
    "find_head",
    "unwrap_model",
]


class HeadNotFoundError(ValueError):
    """No classifier head could be identified (or a user-given ``head=`` path does not exist)."""


# --------------------------------------------------------------------------------------------------
# Unwrapping
# --------------------------------------------------------------------------------------------------

# Wrapper classes recognised by name (so that deepspeed / peft / FSDP need not be importable), mapped to
# the attribute that holds the wrapped model. ``torch.nn.parallel`` wrappers are checked by isinstance.
_WRAPPER_ATTRS: dict[str, str] = {
    "OptimizedModule": "_orig_mod",  # torch.compile
    "FullyShardedDataParallel": "module",  # FSDP (v1)
    "DeepSpeedEngine": "module",
    "PeftModel": "base_model",  # and every PeftModelFor* subclass
    "PeftMixedModel": "base_model",
    "BaseTuner": "model",  # LoraModel, IA3Model, ... (the tuner inside a PeftModel)
    "RifleWrapper": "model",  # rifle_hf.timm_wrapper
}


@functools.lru_cache(maxsize=1024)
def _type_mro_names(cls: type) -> frozenset[str]:
    return frozenset(c.__name__ for c in cls.__mro__)


def _mro_names(obj: object) -> frozenset[str]:
    return _type_mro_names(type(obj))


def _unwrap_step(model: nn.Module) -> str | None:
    """The attribute holding the wrapped model if ``model`` is a known wrapper, else None."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return "module"
    names = _mro_names(model)
    for cls_name, attr in _WRAPPER_ATTRS.items():
        if cls_name in names:
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module) and inner is not model:
                return attr
    return None


def _unwrap_with_prefixes(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The bare model and the name prefixes the stripped wrappers add (``module.``, ``_orig_mod.``, ...)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    prefixes: list[str] = []
    seen = {id(model)}
    while (attr := _unwrap_step(model)) is not None:
        if "FullyShardedDataParallel" in _mro_names(model):
            prefixes.append("_fsdp_wrapped_module.")  # FSDP's own parameter names use this prefix
        model = getattr(model, attr)
        prefixes.append(attr + ".")
        if id(model) in seen:  # defensive: a wrapper cycle would otherwise loop forever
            break
        seen.add(id(model))
    return model, prefixes


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/DataParallel/FSDP/DeepSpeed (``.module``), ``torch.compile`` (``._orig_mod``) and PEFT
    (``PeftModel.base_model`` -> tuner ``.model``) wrappers, repeatedly, and return the bare model.

    Accelerate-prepared models are either one of these wrappers or the model itself, so this matches
    ``accelerate.utils.extract_model_from_parallel(model, keep_torch_compile=False)`` plus PEFT.
    """
    return _unwrap_with_prefixes(model)[0]


# --------------------------------------------------------------------------------------------------
# Module helpers (PEFT-aware traversal, output sizes)
# --------------------------------------------------------------------------------------------------


def _is_modules_to_save(module: nn.Module) -> bool:
    """PEFT ``ModulesToSaveWrapper`` (duck-typed: an ``original_module`` plus a ModuleDict of copies)."""
    mods = module._modules
    return "original_module" in mods and isinstance(mods.get("modules_to_save"), nn.ModuleDict)


def _active_copy(wrapper: nn.Module) -> tuple[str, nn.Module]:
    """The sub-path and module that a ModulesToSaveWrapper forwards through right now."""
    adapters = getattr(wrapper, "active_adapters", None) or []
    if isinstance(adapters, str):
        adapters = [adapters]
    copies = wrapper._modules["modules_to_save"]
    if not getattr(wrapper, "disable_adapters", False) and adapters and adapters[0] in copies:
        return f"modules_to_save.{adapters[0]}", copies[adapters[0]]
    return "original_module", wrapper._modules["original_module"]


def _is_tuner_layer(module: nn.Module) -> bool:
    """PEFT tuner layer (e.g. ``lora.Linear``): behaves as one layer wrapping ``base_layer``."""
    return "BaseTunerLayer" in _mro_names(module) and callable(getattr(module, "get_base_layer", None))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _resolve_active(name: str, module: nn.Module) -> tuple[str, nn.Module]:
    """Follow ModulesToSaveWrappers down to the copy that is trained (and produces the logits)."""
    while _is_modules_to_save(module):
        sub, module = _active_copy(module)
        name = _join(name, sub)
    return name, module


def _named_modules(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` that sees only what the forward pass uses: the active copy inside PEFT
    ModulesToSaveWrappers, and PEFT tuner layers as single modules."""
    memo: set[int] = set()

    def walk(mod: nn.Module, name: str) -> Iterator[tuple[str, nn.Module]]:
        if id(mod) in memo:
            return
        memo.add(id(mod))
        if _is_modules_to_save(mod):
            sub, active = _active_copy(mod)
            yield name, mod
            yield from walk(active, _join(name, sub))
            return
        yield name, mod
        if _is_tuner_layer(mod):
            return
        for child_name, child in mod._modules.items():
            if child is not None:
                yield from walk(child, _join(name, child_name))

    yield from walk(module, prefix)


_NO_OUTPUT_SIZE = (nn.Embedding, nn.EmbeddingBag)


def _out_size(module: nn.Module) -> int | None:
    """Output features of a parameter-owning projection (Linear, ConvNd, Linear-like), else None."""
    if _is_tuner_layer(module):
        module = module.get_base_layer()
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, _NO_OUTPUT_SIZE):
        return None
    if type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int):
        return module.nf  # transformers' GPT-2 style Conv1D stores weight as (in, out)
    weight = module._parameters.get("weight")
    if weight is not None and weight.ndim >= 2:
        return int(weight.shape[0])
    return None


def _in_size(module: nn.Module) -> int | None:
    if _is_tuner_layer(module):
        module = module.get_base_layer()
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels
    if type(module).__name__ == "Conv1D":
        weight = module._parameters.get("weight")
        return int(weight.shape[0]) if weight is not None else None
    weight = module._parameters.get("weight")
    if weight is not None and weight.ndim >= 2:
        return int(weight.shape[1])
    return None


def _is_projection(module: nn.Module) -> bool:
    """A module that owns parameters itself and has a known output size (or is a PEFT tuner layer)."""
    if _is_tuner_layer(module):
        return _out_size(module) is not None
    return any(True for _ in module.parameters(recurse=False)) and _out_size(module) is not None


def _projections(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in _named_modules(module, prefix) if _is_projection(m)]


def _inside(name: str, container: str) -> bool:
    return container == "" or name == container or name.startswith(container + ".")


def _prune_chains(found: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Keep parallel heads (e.g. ``head`` + ``head_dist``) but drop a layer that only feeds a later one
    (``fc1 -> fc2`` when both happen to output ``num_classes``)."""
    kept = []
    for i, (name, mod) in enumerate(found):
        out_a, in_a = _out_size(mod), _in_size(mod)
        feeds_later = any(
            _in_size(later) == out_a and _in_size(later) != in_a for _, later in found[i + 1 :]
        )
        if not feeds_later:
            kept.append((name, mod))
    return kept


def _dedupe(found: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    seen: set[int] = set()
    out = []
    for name, mod in found:
        name, mod = _resolve_active(name, mod)
        if id(mod) not in seen:
            seen.add(id(mod))
            out.append((name, mod))
    return out


# --------------------------------------------------------------------------------------------------
# Number of classes
# --------------------------------------------------------------------------------------------------


def _hf_model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    return model_type if isinstance(model_type, str) else None


def _num_outputs(model: nn.Module) -> int | None:
    """The logits size the model declares: timm ``num_classes``, HF ``config.num_labels`` (1 for
    ``*ForMultipleChoice``), or a ``num_classes`` / ``num_labels`` / ``n_classes`` attribute."""
    is_hf = _hf_model_type(model) is not None
    if is_hf and type(model).__name__.endswith("ForMultipleChoice"):
        return 1
    for attr in ("num_classes", "num_labels", "n_classes"):
        value = getattr(model, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    if is_hf:
        value = getattr(model.config, "num_labels", None)
        if isinstance(value, int):
            return value
    return None


# --------------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------------

#: Hugging Face ``config.model_type`` -> head paths. Every listed path that exists and outputs
#: ``num_labels`` is returned (so distilled variants get both heads); if none does (another task class
#: of the same family), the generic rules run. Only families whose head is unusual are listed; the
#: generic rules cover the rest (classifier / classifier.out_proj / score / classification_head.out_proj).
HF_HEAD_PATHS: dict[str, tuple[str, ...]] = {
    # DeiTForImageClassificationWithTeacher: two heads averaged at inference.
    "deit": ("cls_classifier", "distillation_classifier", "classifier"),
    # LevitForImageClassification(WithTeacher): BatchNorm1d + Linear blocks.
    "levit": ("classifier.linear", "classifier_distill.linear"),
    # SwiftFormer: head + dist_head, averaged.
    "swiftformer": ("head", "dist_head"),
    # Perceiver: the classifier lives inside the base model's decoder.
    "perceiver": ("perceiver.decoder.decoder.final_layer",),
    # XLNet: sequence_summary is a hidden->hidden projection; logits_proj makes the logits.
    "xlnet": ("logits_proj",),
    # XLM / FlauBERT: SequenceSummary's projection outputs num_labels directly.
    "xlm": ("sequence_summary.summary",),
    "flaubert": ("sequence_summary.summary",),
    "funnel": ("classifier.linear_out",),
    # HGNetV2 / TextNet: `classifier` is a ModuleList of pooling layers; `fc` is the real head.
    "hgnet_v2": ("fc",),
    "textnet": ("fc",),
}


@dataclass(frozen=True)
class HeadRule:
    """One detection rule: ``locate(model)`` returns (name, module) pairs, or an empty list."""

    name: str
    description: str
    locate: Callable[[nn.Module], list[tuple[str, nn.Module]]]


def _is_timm_like(model: nn.Module) -> bool:
    return callable(getattr(model, "get_classifier", None)) and isinstance(
        getattr(model, "num_classes", None), int
    )


_HEADISH = re.compile(r"head|classif")


def _timm_heads(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    num_classes = model.num_classes
    if num_classes <= 0:
        return []
    components = model.get_classifier()
    if not isinstance(components, (tuple, list)):
        components = (components,)
    names = {id(m): n for n, m in _named_modules(model, prefix)}
    found: list[tuple[str, nn.Module]] = []
    comp_names: list[str] = []
    for comp in components:
        if not isinstance(comp, nn.Module) or id(comp) not in names:
            continue
        comp_name = names[id(comp)]
        comp_names.append(comp_name)
        if _is_projection(comp):  # accepted whatever its size: users replace heads without num_classes
            found.append((comp_name, comp))
            continue
        projections = _projections(comp, comp_name)
        leaves = [(n, m) for n, m in projections if _out_size(m) == num_classes]
        found.extend(_prune_chains(leaves) or projections[-1:])
    if not found:
        return []
    # Auxiliary heads that timm's get_classifier() leaves out but that add to the logits (VOLO's
    # `aux_head`): head-named siblings of a classifier that output num_classes.
    modules = dict(_named_modules(model, prefix))
    for parent in dict.fromkeys(name.rpartition(".")[0] for name in comp_names):
        parent_mod = modules.get(parent)
        if parent_mod is None:
            continue
        for child_name, child in parent_mod.named_children():
            qual = _join(parent, child_name)
            if qual in comp_names or not _HEADISH.search(child_name):
                continue
            leaves = [(n, m) for n, m in _projections(child, qual) if _out_size(m) == num_classes]
            found.extend(_prune_chains(leaves))
    return found


def _rule_timm(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if _is_timm_like(model):
        return _timm_heads(model)
    # transformers' TimmWrapperForImageClassification keeps the whole timm model (head included).
    inner = getattr(model, "timm_model", None)
    if _hf_model_type(model) == "timm_wrapper" and isinstance(inner, nn.Module) and _is_timm_like(inner):
        return _timm_heads(inner, "timm_model")
    return []


def _rule_hf_table(model: nn.Module) -> list[tuple[str, nn.Module]]:
    paths = HF_HEAD_PATHS.get(_hf_model_type(model) or "")
    if not paths:
        return []
    n = _num_outputs(model)
    modules = dict(_named_modules(model))
    found = []
    for path in paths:
        mod = modules.get(path)
        if mod is None:
            continue
        path, mod = _resolve_active(path, mod)
        leaves = [(path, mod)] if _is_projection(mod) else _projections(mod, path)
        found.extend((p, m) for p, m in leaves if n is None or _out_size(m) == n)
    return found


_NOT_A_HEAD = re.compile(r"(^|\.)(pre_classifier|pre_logits|pooler)(\.|$)")


def _sized_candidates(model: nn.Module, n: int) -> list[tuple[str, nn.Module]]:
    found = [(name, m) for name, m in _projections(model) if _out_size(m) == n]
    kept = [(name, m) for name, m in found if not _NOT_A_HEAD.search(name)]
    return kept or found


def _rule_outside_backbone(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """HF task models: every ``num_labels``-sized projection outside ``model.base_model``."""
    n = _num_outputs(model)
    base = getattr(model, "base_model", None)
    if not n or n <= 0 or not isinstance(base, nn.Module) or base is model:
        return []
    base_name = next((name for name, m in model.named_modules() if m is base), None)
    if base_name is None:
        return []
    outside = [(name, m) for name, m in _sized_candidates(model, n) if not _inside(name, base_name)]
    return _prune_chains(outside)


def _rule_output_size(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The last projection whose output size equals the declared number of classes, plus parallel
    heads (same input/output size, named like a head)."""
    n = _num_outputs(model)
    if not n or n <= 0:
        return []
    found = _prune_chains(_sized_candidates(model, n))
    if not found:
        return []
    last_name, last = found[-1]
    headish = [(name, m) for name, m in found if _HEADISH.search(name)]
    if len(headish) > 1 and (last_name, last) in headish:
        return headish
    return [(last_name, last)]


_HEAD_NAME = re.compile(
    r"^(?!pre_)(\w+_)?(head|heads|classifier|classifiers|fc|score|scores|logits|last_linear)(_\w+)?$"
)


def _rule_name(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """No class count known: the last projection inside a module named like a head
    (head / classifier / fc / score / logits / last_linear)."""
    if _num_outputs(model) is not None:
        return []
    named = [
        (name, m)
        for name, m in _projections(model)
        if any(_HEAD_NAME.match(part) for part in name.split("."))
    ]
    if not named:
        return []
    last_name, last = named[-1]
    depth = last_name.count(".")
    sig = (_in_size(last), _out_size(last))
    return [
        (name, m)
        for name, m in named
        if (name, m) == (last_name, last) or (name.count(".") == depth and (_in_size(m), _out_size(m)) == sig)
    ]


#: Ordered detection rules; the first one that returns modules wins.
HEAD_RULES: tuple[HeadRule, ...] = (
    HeadRule(
        "timm",
        "timm models (and HF TimmWrapper's `timm_model`): the Linear/Conv leaves of get_classifier() "
        "(all of them for distilled tuples / ModuleLists, the last num_classes-sized one inside MLP or "
        "ClassifierHead containers) plus head-named siblings such as VOLO's aux_head; num_classes=0 means "
        "no classifier.",
        _rule_timm,
    ),
    HeadRule(
        "hf_model_type",
        "Hugging Face families with unusual heads: the paths in HF_HEAD_PATHS[config.model_type] that "
        "output num_labels.",
        _rule_hf_table,
    ),
    HeadRule(
        "outside_backbone",
        "Hugging Face task models: every num_labels-sized projection outside model.base_model "
        "(classifier, classifier.out_proj, score, classification_head.out_proj, distillation heads).",
        _rule_outside_backbone,
    ),
    HeadRule(
        "output_size",
        "Any model declaring num_classes / num_labels / n_classes: the last projection with that output "
        "size (plus parallel head-named ones), skipping pre_classifier / pre_logits / pooler layers.",
        _rule_output_size,
    ),
    HeadRule(
        "name",
        "Plain models without a declared class count: the last Linear/Conv inside a module named "
        "head / classifier / fc / score / logits / last_linear.",
        _rule_name,
    ),
)


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def _count_name(model: nn.Module) -> str:
    if isinstance(getattr(model, "num_classes", None), int):
        return "num_classes"
    return "num_labels"


def _last_projections(model: nn.Module, k: int = 3) -> list[str]:
    names = [name for name, m in _projections(model) if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    names = names or [name for name, _ in _projections(model)]
    return names[-k:]


def _no_head_message(model: nn.Module, reason: str) -> str:
    cands = _last_projections(model)
    example = cands[-1] if cands else "classifier"
    listed = ", ".join(repr(c) for c in cands) if cands else "none"
    return (
        f"No classifier head found in {type(model).__name__} ({reason}); last Linear/Conv modules: {listed}. "
        f'Name it explicitly: find_head(model, head="{example}") or RifleCallback(head="{example}").'
    )


def _resolve_user_path(
    base: nn.Module, path: str, prefixes: list[str], modules: dict[str, nn.Module]
) -> tuple[str, nn.Module]:
    if not isinstance(path, str) or not path.strip():
        raise HeadNotFoundError(f"head= must be a non-empty module path like 'classifier', got {path!r}")
    stripped = path.strip()
    changed = True
    while stripped not in modules and changed:
        changed = False
        for prefix in prefixes:
            if stripped.startswith(prefix):
                stripped, changed = stripped[len(prefix) :], True
    if stripped in modules:
        return _resolve_active(stripped, modules[stripped])
    close = difflib.get_close_matches(stripped, [n for n in modules if n], n=3, cutoff=0.5)
    hint = f"close matches: {', '.join(repr(c) for c in close)}" if close else "no close matches"
    raise HeadNotFoundError(
        f"head={path!r} is not a module of {type(base).__name__} ({hint}); "
        "pass a dotted path from model.named_modules()."
    )


def find_head(model: nn.Module, head: str | Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """Return ``[(qualified_name, module), ...]`` for the layer(s) that produce the logits.

    Names are relative to :func:`unwrap_model` ``(model)``. ``head`` overrides detection: a dotted path or
    a list of paths (a ``module.`` / ``_orig_mod.`` / ``base_model.model.`` wrapper prefix is accepted);
    a container given there is returned as-is (the user chose it), except that a PEFT ``modules_to_save``
    wrapper resolves to its active copy. Detection otherwise applies :data:`HEAD_RULES` in order.
    Raises :class:`HeadNotFoundError` (one line, naming candidates and ``head=``) when nothing fits.
    """
    base, prefixes = _unwrap_with_prefixes(model)
    if head is not None:
        paths = [head] if isinstance(head, str) else list(head)
        if not paths:
            raise HeadNotFoundError("head= is an empty list; pass a module path like head='classifier'")
        modules = dict(base.named_modules())
        return _dedupe([_resolve_user_path(base, p, prefixes, modules) for p in paths])

    n = _num_outputs(base)
    if n is not None and n <= 0:
        raise HeadNotFoundError(_no_head_message(base, f"{_count_name(base)}={n}: it has no classifier"))
    for rule in HEAD_RULES:
        found = rule.locate(base)
        if found:
            return _dedupe(found)
    reason = f"no projection outputs {_count_name(base)}={n}" if n is not None else "no module named like a head"
    raise HeadNotFoundError(_no_head_message(base, reason))


def check_head_outputs(model: nn.Module, heads: Sequence[tuple[str, nn.Module]]) -> None:
    """Refuse a user-named head that cannot produce the logits.

    If none of its layers outputs the model's number of classes (e.g. ``head="conv1"``), RIFLE would
    re-initialize a backbone layer every period; better to stop at train start with the fix.
    """
    n = _num_outputs(unwrap_model(model))
    sizes: set[int] = set()
    for _, module in heads:  # a layer's own output size; for a container, those of the layers inside
        own = _out_size(module)
        sizes |= {own} if own is not None else {s for _, m in _projections(module) if (s := _out_size(m))}
    if n is None or not sizes or n in sizes:
        return
    try:
        detected = [name for name, _ in find_head(model)]
    except HeadNotFoundError:
        detected = []
    fix = f"head={detected[0]!r} (the detected classifier)" if detected else "the layer that outputs the logits"
    names = ", ".join(repr(name) for name, _ in heads)
    raise HeadNotFoundError(
        f"head {names} outputs {sorted(sizes)} values but the model has {n} classes, so it is not the "
        f"classifier; pass {fix} or leave the head unset."
    )
