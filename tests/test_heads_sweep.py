"""Sweeps: find_head on every timm model and every HF image / sequence classification model type.

Models are built on the meta device (no memory, no data) with an unusual class count, N=7, so the true
head is identifiable independently of find_head: it is the set of parameter-owning projections whose
output size is N. Each sweep prints its counts; with RIFLE_WRITE_SWEEP=1 it also writes them to
tests/head_sweep_counts.json (the README quotes them).

Speed: on the meta device PyTorch still runs the init functions' in-place writes (normal_, clamp_, ...)
through Python decompositions that compute nothing (meta tensors hold no values), which dominates build
time. ``_SkipMetaValueWrites`` returns early from exactly those value-only writes *on meta tensors* via
PyTorch's public TorchFunctionMode API; shapes, modules and parameters are built exactly as before.
The timm sweep also runs in a few forked worker processes (Linux), which keeps it to a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from rifle_hf.heads import HeadNotFoundError, find_head

pytestmark = pytest.mark.slow

N = 7
COUNTS_PATH = Path(__file__).with_name("head_sweep_counts.json")

# In-place writes that only change values (never shape/dtype/device/requires_grad): skipping them on a
# meta tensor changes nothing observable, because a meta tensor has no values.
_VALUE_ONLY_WRITES = frozenset(
    (
        "normal_", "uniform_", "fill_", "zero_", "clamp_", "clamp_min_", "clamp_max_", "erfinv_", "mul_",
        "add_", "sub_", "div_", "copy_", "exponential_", "bernoulli_", "random_", "log_normal_", "cauchy_",
        "geometric_", "sqrt_", "exp_", "log_", "neg_", "abs_", "erf_", "addcmul_", "addcdiv_", "masked_fill_",
        "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
        "orthogonal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "sparse_",
    )
)


class _SkipMetaValueWrites(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _VALUE_ONLY_WRITES:
            target = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


def _out_size(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return None
    weight = module._parameters.get("weight")
    return int(weight.shape[0]) if weight is not None and weight.ndim >= 2 else None


def _n_sized(model: nn.Module, n: int) -> set[str]:
    """Ground truth: every module that owns parameters and outputs n features."""
    return {
        name
        for name, m in model.named_modules()
        if any(True for _ in m.parameters(recurse=False)) and _out_size(m) == n
    }


def _check_no_head(model: nn.Module) -> str | None:
    """None when find_head raises a one-line HeadNotFoundError that shows head=; else what went wrong."""
    try:
        found = find_head(model)
    except HeadNotFoundError as exc:
        msg = str(exc)
        return None if ("head=" in msg and "\n" not in msg) else f"bad message: {msg!r}"
    return f"expected HeadNotFoundError, got {[n for n, _ in found]}"


def _check_head(model: nn.Module, n: int) -> str | None:
    """None when find_head returns exactly the n-sized projections; else what went wrong."""
    try:
        found = find_head(model)
    except HeadNotFoundError as exc:
        return f"HeadNotFoundError: {exc}"
    names = [name for name, _ in found]
    sizes = [_out_size(m) for _, m in found]
    if any(s != n for s in sizes):
        return f"wrong output sizes {dict(zip(names, sizes))}"
    truth = _n_sized(model, n)
    if set(names) != truth:
        return f"found {sorted(names)} but the {n}-sized projections are {sorted(truth)}"
    return None


def _record(section: str, counts: dict) -> None:
    print(f"\n[head sweep] {section}: {json.dumps(counts, sort_keys=True)}")
    if os.environ.get("RIFLE_WRITE_SWEEP") == "1":
        data = json.loads(COUNTS_PATH.read_text()) if COUNTS_PATH.exists() else {}
        data[section] = counts
        COUNTS_PATH.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _pool_map(fn, items: list, chunksize: int = 4) -> list:
    """Map over items in forked workers on Linux (meta builds are CPU-bound Python), else serially."""
    workers = int(os.environ.get("RIFLE_SWEEP_WORKERS", min(4, os.cpu_count() or 1)))
    if workers <= 1 or sys.platform != "linux":
        return [fn(x) for x in items]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_worker_init) as ex:
        return list(ex.map(fn, items, chunksize=chunksize))


def _worker_init() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")


# --------------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------------

# Models that cannot be supported, with the reason. Keep this tiny (currently none).
TIMM_UNSUPPORTED: dict[str, str] = {}


def _timm_one(name: str) -> dict:
    import timm

    start = time.process_time()
    try:
        with torch.device("meta"), _SkipMetaValueWrites():
            model = timm.create_model(name, pretrained=False, num_classes=N)
    except Exception as exc:  # a model that cannot be built at all is reported, not counted
        return {"name": name, "status": "build_error", "detail": f"{type(exc).__name__}: {exc}"[:300]}
    build_s = time.process_time() - start
    has_classifier = getattr(model, "num_classes", None) == N
    problem = _check_head(model, N) if has_classifier else _check_no_head(model)
    reset_problem = None
    if has_classifier and callable(getattr(model, "reset_classifier", None)):
        with torch.device("meta"), _SkipMetaValueWrites():
            model.reset_classifier(0)
        reset_problem = _check_no_head(model)
    return {
        "name": name,
        "cls": f"{type(model).__module__}.{type(model).__qualname__}",
        "status": "ok" if problem is None else "fail",
        "has_classifier": has_classifier,
        "detail": problem,
        "reset_problem": reset_problem,
        "build_s": build_s,
    }


def _timm_zero_classes(name: str) -> dict:
    import timm

    try:
        with torch.device("meta"), _SkipMetaValueWrites():
            model = timm.create_model(name, pretrained=False, num_classes=0)
    except Exception as exc:
        return {"name": name, "detail": f"build_error {type(exc).__name__}: {exc}"[:300]}
    return {"name": name, "detail": _check_no_head(model)}


def test_timm_all_models():
    timm = pytest.importorskip("timm")
    start = time.perf_counter()
    names = timm.list_models()
    results = _pool_map(_timm_one, names)
    built = [r for r in results if r["status"] != "build_error"]
    with_cls = [r for r in built if r["has_classifier"]]
    failures = {
        r["name"]: r["detail"] for r in built if r["status"] == "fail" and r["name"] not in TIMM_UNSUPPORTED
    }
    reset_failures = {r["name"]: r["reset_problem"] for r in built if r.get("reset_problem")}

    # num_classes=0 at construction: one model per architecture class.
    first_per_class: dict[str, str] = {}
    for r in built:
        first_per_class.setdefault(r["cls"], r["name"])
    zero = _pool_map(_timm_zero_classes, sorted(first_per_class.values()), chunksize=2)
    zero_failures = {r["name"]: r["detail"] for r in zero if r["detail"]}

    counts = {
        "total": len(names),
        "built": len(built),
        "build_errors": len(names) - len(built),
        "with_classifier": len(with_cls),
        "found": sum(r["status"] == "ok" for r in with_cls),
        "without_classifier": len(built) - len(with_cls),
        "without_classifier_raised": sum(r["status"] == "ok" for r in built if not r["has_classifier"]),
        "architecture_classes": len(first_per_class),
        "num_classes0_raised": len(zero) - len(zero_failures),
        "seconds": round(time.perf_counter() - start, 1),
    }
    _record("timm", counts)
    slowest = sorted(built, key=lambda r: -r["build_s"])[:8]
    print("[head sweep] timm slowest builds (CPU s):", {r["name"]: round(r["build_s"], 2) for r in slowest})
    build_errors = {r["name"]: r["detail"] for r in results if r["status"] == "build_error"}
    if build_errors:
        print(f"[head sweep] timm models that failed to build on meta: {build_errors}")
    assert not failures, f"{len(failures)} timm models: {dict(list(failures.items())[:20])}"
    assert not reset_failures, f"reset_classifier(0) did not remove the head: {reset_failures}"
    assert not zero_failures, f"num_classes=0 did not raise: {zero_failures}"
    assert counts["with_classifier"] > 1000  # the sweep really covered timm


# --------------------------------------------------------------------------------------------------
# Hugging Face transformers
# --------------------------------------------------------------------------------------------------

# Config fields that the default config of a few model types leaves unset or inconsistent.
HF_CONFIG_OVERRIDES: dict[str, dict] = {
    "PerceiverForImageClassificationFourier": {"d_model": 261, "num_cross_attention_heads": 1},
    "PerceiverForImageClassificationConvProcessing": {"d_model": 322, "num_cross_attention_heads": 1},
    "esm": {"vocab_size": 33},
    "hunyuan_v1_dense": {"head_dim": 128},
    "hunyuan_v1_moe": {"head_dim": 128},
    "ministral": {"head_dim": 128},
    "nemotron": {"num_key_value_heads": 32},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}},
}

# Classes whose "classifier" is not a num_labels-sized layer, with the reason: find_head must raise.
HF_NO_CLASSIFIER: dict[str, str] = {
    "ShieldGemma2ForImageClassification": "scores Yes/No tokens with the vocabulary-sized LM head",
}

# Optional third-party packages some HF models need at construction; missing ones skip that class.
_OPTIONAL_DEPS = ("natten", "detectron2", "causal_conv1d", "mamba_ssm")


def _hf_build(model_type: str, cls_name: str, num_labels: int) -> nn.Module:
    import transformers
    from transformers import AutoConfig

    overrides = {**HF_CONFIG_OVERRIDES.get(model_type, {}), **HF_CONFIG_OVERRIDES.get(cls_name, {})}
    config = AutoConfig.for_model(model_type, num_labels=num_labels, **overrides)
    with torch.device("meta"), _SkipMetaValueWrites():
        return getattr(transformers, cls_name)(config)


def _hf_classes(mapping: dict) -> list[tuple[str, str]]:
    pairs = []
    for model_type, cls_names in mapping.items():
        for cls_name in (cls_names,) if isinstance(cls_names, str) else cls_names:
            pairs.append((model_type, cls_name))
    return pairs


def _hf_one(item: tuple[str, str, bool]) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    model_type, cls_name, check_zero_labels = item
    try:
        model = _hf_build(model_type, cls_name, N)
    except ImportError as exc:  # needs an optional package that is not installed here
        if not any(dep in str(exc) for dep in _OPTIONAL_DEPS):
            raise
        return {"cls": cls_name, "status": "unbuildable", "detail": str(exc).strip().splitlines()[0][:120]}
    if cls_name in HF_NO_CLASSIFIER:
        problem = _check_no_head(model)
        return {"cls": cls_name, "status": "no_classifier" if problem is None else "fail", "detail": problem}
    problem = _check_head(model, N)
    zero_problem = None
    if check_zero_labels:
        try:
            headless = _hf_build(model_type, cls_name, 0)
        except ValueError:  # the class refuses num_labels=0 itself (e.g. TimmWrapper)
            headless = None
        zero_problem = None if headless is None else _check_no_head(headless)
    return {
        "cls": cls_name,
        "status": "ok" if problem is None else "fail",
        "detail": problem,
        "zero_problem": zero_problem,
    }


def _hf_sweep(section: str, mapping: dict, check_zero_labels: bool) -> None:
    pytest.importorskip("transformers")
    start = time.perf_counter()
    pairs = _hf_classes(mapping)
    results = _pool_map(_hf_one, [(mt, cls, check_zero_labels) for mt, cls in pairs], chunksize=2)
    failures = {r["cls"]: r["detail"] for r in results if r["status"] == "fail"}
    unbuildable = {r["cls"]: r["detail"] for r in results if r["status"] == "unbuildable"}
    zero_failures = {r["cls"]: r["zero_problem"] for r in results if r.get("zero_problem")}
    counts = {
        "model_types": len(mapping),
        "classes": len(pairs),
        "with_classifier": sum(r["status"] in ("ok", "fail") for r in results),
        "found": sum(r["status"] == "ok" for r in results),
        "no_classifier_by_design": sum(r["status"] == "no_classifier" for r in results),
        "missing_optional_dependency": len(unbuildable),
        "seconds": round(time.perf_counter() - start, 1),
    }
    _record(section, counts)
    if unbuildable:
        print(f"[head sweep] {section}: skipped (optional dependency missing): {unbuildable}")
    assert not failures, failures
    assert not zero_failures, f"num_labels=0 did not raise: {zero_failures}"
    assert counts["found"] > 0.9 * len(pairs)  # the sweep really covered the mapping


def test_hf_image_classification_models():
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    _hf_sweep("hf_image_classification", MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES, check_zero_labels=True)


def test_hf_sequence_classification_models():
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    _hf_sweep("hf_sequence_classification", MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, check_zero_labels=False)
