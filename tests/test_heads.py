"""find_head / unwrap_model on real tiny timm, transformers, torchvision and PEFT models (random init).

The main check is behavioural: replacing the outputs of the returned modules with zeros (forward hooks)
must make the model's logits exactly zero. That proves the returned modules are *all* of the layers the
logits come from (a missed distillation or auxiliary head would leave non-zero logits).
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import timm
import torch
from torch import nn

from rifle_hf.heads import HEAD_RULES, HF_HEAD_PATHS, HeadNotFoundError, find_head, unwrap_model

warnings.filterwarnings("ignore", category=UserWarning)
C = 5  # number of classes used throughout


def _logits(model: nn.Module, inputs) -> torch.Tensor:
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return getattr(out, "logits", out)


def assert_heads_make_logits(model: nn.Module, inputs, heads: list[tuple[str, nn.Module]]) -> None:
    """Zeroing the found heads' outputs zeroes the logits; the logits are not zero otherwise."""
    model.eval()
    with torch.no_grad():
        plain = _logits(model, inputs)
        assert plain.shape[-1] == C and plain.abs().sum() > 0
        hooks = [m.register_forward_hook(lambda mod, args, out: torch.zeros_like(out)) for _, m in heads]
        try:
            zeroed = _logits(model, inputs)
        finally:
            for h in hooks:
                h.remove()
    assert torch.count_nonzero(zeroed) == 0, f"logits still depend on layers other than {[n for n, _ in heads]}"


def names(found: list[tuple[str, nn.Module]]) -> list[str]:
    return [n for n, _ in found]


def image(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def tokens() -> dict:
    ids = torch.randint(3, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# --------------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------------


def _timm(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=C, **kwargs)


TIMM_CASES = [
    # (builder, expected head names, input size)
    (lambda: _timm("test_resnet"), ["fc"], 32),
    (lambda: _timm("test_convnext"), ["head.fc"], 32),
    (lambda: _timm("test_vit"), ["head"], 32),
    (lambda: _timm("test_efficientnet"), ["classifier"], 32),
    # distilled: two heads averaged at inference
    (lambda: _timm("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=1), ["head", "head_dist"], 32),
    # conv_head (1x1 conv to 1024) + classifier: only the classifier makes logits
    (lambda: _timm("mobilenetv3_small_050"), ["classifier"], 32),
    # 1x1 Conv2d classifier
    (lambda: _timm("dla46_c"), ["fc"], 32),
]


@pytest.mark.parametrize("case", range(len(TIMM_CASES)))
def test_timm_models(case):
    build, expected, size = TIMM_CASES[case]
    model = build()
    found = find_head(model)
    assert names(found) == expected
    assert all(m is model.get_submodule(n) for n, m in found)
    assert_heads_make_logits(model, image(size), found)


def test_timm_levit_normlinear_heads():
    from timm.models.levit import Levit, LevitDistilled

    kwargs = dict(img_size=64, num_classes=C, embed_dim=(32, 48), key_dim=8, depth=(1, 1), num_heads=(2, 2))
    torch.manual_seed(0)
    plain, distilled = Levit(**kwargs), LevitDistilled(**kwargs)
    # NormLinear = BatchNorm1d + Linear: the Linear is the logits-producing leaf
    assert names(find_head(plain)) == ["head.linear"]
    assert names(find_head(distilled)) == ["head.linear", "head_dist.linear"]
    assert_heads_make_logits(plain, image(64), find_head(plain))
    distilled.eval()
    assert_heads_make_logits(distilled, image(64), find_head(distilled))


def test_timm_mlp_head_and_aux_head():
    from timm.models.metaformer import MetaFormer
    from timm.models.volo import VOLO

    torch.manual_seed(0)
    mlp = MetaFormer(num_classes=C, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
    assert names(find_head(mlp)) == ["head.fc.fc2"]  # MlpHead fc1 -> norm -> fc2
    assert_heads_make_logits(mlp, image(32), find_head(mlp))

    volo = VOLO(layers=(1, 1, 1, 1), img_size=32, embed_dims=(16, 32, 32, 32), num_heads=(1, 2, 2, 2), num_classes=C)
    found = find_head(volo)
    assert names(found) == ["head", "aux_head"]  # get_classifier() alone misses aux_head
    assert_heads_make_logits(volo, image(32), found)


def test_timm_mlp_head_chain_with_coinciding_sizes():
    """fc1 also outputs num_classes (hidden == num_classes): only the last layer of the chain is the head."""
    from timm.models.metaformer import MetaFormer

    torch.manual_seed(0)
    model = MetaFormer(num_classes=256, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))  # MlpHead hidden = 4*64
    assert model.head.fc.fc1.out_features == 256
    assert names(find_head(model)) == ["head.fc.fc2"]


def test_timm_repvit_parallel_heads():
    from timm.models.repvit import RepVit

    torch.manual_seed(0)
    model = RepVit(embed_dim=(16, 32), depth=(1, 1), num_classes=C, distillation=True)
    found = find_head(model)
    assert names(found) == ["head.head.l", "head.head_dist.l"]
    assert_heads_make_logits(model, image(64), found)


def test_timm_head_replaced_by_hand_is_still_found():
    model = _timm("test_resnet")
    model.fc = nn.Linear(model.fc.in_features, 3)  # num_classes still says 5
    assert find_head(model) == [("fc", model.fc)]


def test_timm_without_classifier_raises_one_line():
    model = _timm("test_resnet")
    model.reset_classifier(0)
    with pytest.raises(HeadNotFoundError) as info:
        find_head(model)
    msg = str(info.value)
    assert "\n" not in msg and "head=" in msg and "num_classes=0" in msg and "ResNet" in msg

    headless = timm.create_model("test_vit", pretrained=False, num_classes=0)
    with pytest.raises(HeadNotFoundError, match="head="):
        find_head(headless)


# --------------------------------------------------------------------------------------------------
# Hugging Face transformers
# --------------------------------------------------------------------------------------------------


def _vit_kwargs(**extra) -> dict:
    return dict(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=C, **extra,
    )


def _text_kwargs(**extra) -> dict:
    return dict(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=C, **extra,
    )


def _hf(cls_name: str, config_name: str, **kwargs) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, cls_name)(getattr(transformers, config_name)(**kwargs))


HF_CASES = {
    "vit": (lambda: _hf("ViTForImageClassification", "ViTConfig", **_vit_kwargs()), ["classifier"], "img16"),
    "convnext": (
        lambda: _hf(
            "ConvNextForImageClassification", "ConvNextConfig", hidden_sizes=[8, 16], depths=[1, 1],
            num_stages=2, patch_size=2, num_labels=C,
        ),
        ["classifier"],
        "img16",
    ),
    "deit_with_teacher": (
        lambda: _hf("DeiTForImageClassificationWithTeacher", "DeiTConfig", **_vit_kwargs()),
        ["cls_classifier", "distillation_classifier"],
        "img16",
    ),
    "levit_with_teacher": (
        lambda: _hf(
            "LevitForImageClassificationWithTeacher", "LevitConfig", image_size=64, hidden_sizes=[16, 24, 32],
            num_attention_heads=[1, 2, 2], depths=[1, 1, 1], key_dim=[8, 8, 8], mlp_ratio=[2, 2, 2],
            attention_ratio=[2, 2, 2], num_labels=C,
        ),
        ["classifier.linear", "classifier_distill.linear"],
        "img64",
    ),
    "dinov2": (
        lambda: _hf(
            "Dinov2ForImageClassification", "Dinov2Config", image_size=16, patch_size=8, hidden_size=16,
            num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, num_labels=C,
        ),
        ["classifier"],
        "img16",
    ),
    "bert": (lambda: _hf("BertForSequenceClassification", "BertConfig", **_text_kwargs()), ["classifier"], "text"),
    "roberta": (
        lambda: _hf("RobertaForSequenceClassification", "RobertaConfig", pad_token_id=1, **_text_kwargs()),
        ["classifier.out_proj"],
        "text",
    ),
    "electra": (
        lambda: _hf("ElectraForSequenceClassification", "ElectraConfig", embedding_size=16, **_text_kwargs()),
        ["classifier.out_proj"],
        "text",
    ),
    "distilbert": (
        lambda: _hf(
            "DistilBertForSequenceClassification", "DistilBertConfig", vocab_size=50, dim=16, n_layers=1,
            n_heads=2, hidden_dim=32, max_position_embeddings=32, num_labels=C,
        ),
        ["classifier"],
        "text",
    ),
    "llama": (
        lambda: _hf(
            "LlamaForSequenceClassification", "LlamaConfig", num_key_value_heads=2, pad_token_id=0,
            **_text_kwargs(),
        ),
        ["score"],
        "text",
    ),
    "xlnet": (
        lambda: _hf(
            "XLNetForSequenceClassification", "XLNetConfig", vocab_size=50, d_model=16, n_layer=1, n_head=2,
            d_inner=32, num_labels=C,
        ),
        ["logits_proj"],
        "text",
    ),
}

_INPUTS = {"img16": lambda: {"pixel_values": image(16)}, "img64": lambda: {"pixel_values": image(64)}, "text": tokens}


@pytest.mark.parametrize("key", list(HF_CASES))
def test_hf_models(key):
    build, expected, inputs = HF_CASES[key]
    model = build()
    found = find_head(model)
    assert names(found) == expected
    assert all(getattr(m, "out_features", None) == C for _, m in found)
    assert_heads_make_logits(model, _INPUTS[inputs](), found)


def test_hf_dinov2_head_reads_cls_and_mean_patch_tokens():
    model = HF_CASES["dinov2"][0]()
    ((name, head),) = find_head(model)
    assert head.in_features == 2 * model.config.hidden_size


def test_hf_distilbert_skips_pre_classifier_even_when_sizes_coincide():
    model = _hf(
        "DistilBertForSequenceClassification", "DistilBertConfig", vocab_size=50, dim=16, n_layers=1, n_heads=2,
        hidden_dim=32, max_position_embeddings=32, num_labels=16,
    )
    assert model.pre_classifier.out_features == 16
    assert names(find_head(model)) == ["classifier"]


def test_hf_timm_wrapper_from_local_config():
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    torch.manual_seed(0)
    model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="test_resnet", num_labels=C))
    found = find_head(model)
    assert names(found) == ["timm_model.fc"]
    assert_heads_make_logits(model, {"pixel_values": image(32)}, found)


def test_hf_base_models_raise_one_line_naming_candidates():
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    for model in (ViTModel(ViTConfig(**_vit_kwargs())), BertModel(BertConfig(**_text_kwargs()))):
        with pytest.raises(HeadNotFoundError) as info:
            find_head(model)
        msg = str(info.value)
        assert "\n" not in msg and "head=" in msg and "RifleCallback(head=" in msg
        assert "pooler.dense" in msg  # the last Linear modules are listed as candidates


def test_hf_num_labels_zero_raises():
    model = _hf("ViTForImageClassification", "ViTConfig", **{**_vit_kwargs(), "num_labels": 0})
    with pytest.raises(HeadNotFoundError, match="num_labels=0"):
        find_head(model)


# --------------------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ddp_and_dataparallel(tmp_path):
    model = HF_CASES["bert"][0]()
    with _process_group(tmp_path):
        ddp = nn.parallel.DistributedDataParallel(model)
        assert unwrap_model(ddp) is model
        ((name, head),) = find_head(ddp)
        assert name == "classifier" and head is model.classifier
        # a path with the wrapper prefix is accepted too
        assert find_head(ddp, head="module.classifier") == [("classifier", model.classifier)]
    dp = nn.DataParallel(model)
    assert unwrap_model(dp) is model
    assert find_head(dp) == [("classifier", model.classifier)]


def test_torch_compile_wrapper():
    model = _timm("test_vit")
    compiled = torch.compile(model)  # not run: only the wrapper matters
    assert unwrap_model(compiled) is model
    assert find_head(compiled) == [("head", model.head)]
    assert find_head(compiled, head="_orig_mod.head") == [("head", model.head)]
    # nested wrappers are stripped repeatedly
    assert unwrap_model(nn.DataParallel(torch.compile(model))) is model


def test_accelerate_prepared_model():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    model = HF_CASES["vit"][0]()
    try:
        prepared = Accelerator(cpu=True).prepare(model)
        assert unwrap_model(prepared) is model
        assert find_head(prepared) == [("classifier", model.classifier)]
    finally:
        AcceleratorState._reset_state(True)


def test_peft_lora_modules_to_save_returns_trainable_copy():
    peft = pytest.importorskip("peft")
    model = HF_CASES["vit"][0]()
    original = model.classifier
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])
    pm = peft.get_peft_model(model, config)
    found = find_head(pm)
    ((name, head),) = found
    assert name == "classifier.modules_to_save.default"
    assert head is not original and head.weight.requires_grad and not original.weight.requires_grad
    assert unwrap_model(pm) is model  # PeftModel -> LoraModel -> the transformers model
    assert_heads_make_logits(pm, {"pixel_values": image(16)}, found)
    # user paths, with or without the PEFT prefix, resolve to the active copy as well
    assert find_head(pm, head="classifier") == found
    assert find_head(pm, head="base_model.model.classifier") == found


def test_peft_sequence_classification_task_and_disabled_adapter():
    peft = pytest.importorskip("peft")
    model = HF_CASES["roberta"][0]()
    config = peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"])
    pm = peft.get_peft_model(model, config)  # SEQ_CLS adds the classifier to modules_to_save
    found = find_head(pm)
    assert names(found) == ["classifier.modules_to_save.default.out_proj"]
    assert_heads_make_logits(pm, tokens(), found)
    with pm.disable_adapter():  # the frozen original makes the logits now
        assert names(find_head(pm)) == ["classifier.original_module.out_proj"]


def test_peft_on_a_timm_model():
    peft = pytest.importorskip("peft")
    model = _timm("test_vit")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["qkv"], modules_to_save=["head"]))
    found = find_head(pm)
    assert names(found) == ["head.modules_to_save.default"]
    assert found[0][1] is not model.head.original_module
    assert_heads_make_logits(pm, image(32), found)


def test_peft_lora_on_the_head_is_one_layer():
    peft = pytest.importorskip("peft")
    model = HF_CASES["bert"][0]()
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["classifier"]))
    ((name, head),) = find_head(pm)
    assert name == "classifier" and hasattr(head, "base_layer")  # not base_layer / lora_B separately


# --------------------------------------------------------------------------------------------------
# Plain PyTorch / torchvision
# --------------------------------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self, num_classes: int | None = None, head_name: str = "out") -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.hidden = nn.Linear(8, C)  # same size as the head: must not be picked
        setattr(self, head_name, nn.Linear(C, C))
        self._head = head_name
        if num_classes is not None:
            self.num_classes = num_classes

    def forward(self, x):
        return getattr(self, self._head)(torch.relu(self.hidden(self.features(x))))


def test_plain_module_with_num_classes_uses_output_size():
    model = _Net(num_classes=C, head_name="out")
    assert names(find_head(model)) == ["out"]
    assert_heads_make_logits(model, image(16), find_head(model))


def test_plain_module_without_class_count_uses_head_names():
    model = _Net(head_name="classifier")
    assert names(find_head(model)) == ["classifier"]
    with pytest.raises(HeadNotFoundError) as info:
        find_head(_Net(head_name="out"))
    msg = str(info.value)
    assert "\n" not in msg and "'out'" in msg and 'head="out"' in msg


def test_torchvision_models():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    assert names(find_head(tv.models.resnet18(num_classes=C))) == ["fc"]
    mnv3 = tv.models.mobilenet_v3_small(num_classes=C)
    assert names(find_head(mnv3)) == ["classifier.3"]
    assert_heads_make_logits(mnv3, image(32), find_head(mnv3))


# --------------------------------------------------------------------------------------------------
# head= override
# --------------------------------------------------------------------------------------------------


def test_head_override_string_list_container_and_bad_path():
    model = HF_CASES["roberta"][0]()
    # a container named by the user is returned as-is
    assert find_head(model, head="classifier") == [("classifier", model.classifier)]
    assert find_head(model, head=["classifier.dense", "classifier.out_proj"]) == [
        ("classifier.dense", model.classifier.dense),
        ("classifier.out_proj", model.classifier.out_proj),
    ]
    with pytest.raises(HeadNotFoundError) as info:
        find_head(model, head="classifer.out_proj")
    msg = str(info.value)
    assert "\n" not in msg and "'classifier.out_proj'" in msg  # close match suggested
    for bad in ("", [], "   "):
        with pytest.raises(HeadNotFoundError):
            find_head(model, head=bad)


def test_non_module_is_rejected():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        unwrap_model("not a module")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        find_head(None)


def test_rules_are_ordered_timm_first_and_documented():
    assert [r.name for r in HEAD_RULES] == ["timm", "hf_model_type", "outside_backbone", "output_size", "name"]
    assert all(r.description for r in HEAD_RULES)
    assert set(HF_HEAD_PATHS) >= {"deit", "levit", "perceiver", "xlnet"}
