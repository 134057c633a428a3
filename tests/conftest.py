"""Shared fixtures: tiny real models (random init, small configs) and generated image data."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


class ImageDataset(torch.utils.data.Dataset):
    """Generated images whose class is visible (a per-class mean shift), so models can learn them."""

    def __init__(self, n: int, num_labels: int = 4, size: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, num_labels, (n,), generator=g)
        self.images = torch.randn(n, 3, size, size, generator=g) * 0.5 + self.labels.view(-1, 1, 1, 1) * 0.3

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


def tiny_vit(num_labels: int = 4, image_size: int = 16):
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=image_size, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=num_labels,
    )
    torch.manual_seed(0)
    return ViTForImageClassification(cfg)


def tiny_convnext(num_labels: int = 4):
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = ConvNextConfig(
        num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=num_labels, patch_size=2
    )
    torch.manual_seed(0)
    return ConvNextForImageClassification(cfg)


@pytest.fixture
def image_data():
    return ImageDataset(64), ImageDataset(32, seed=1)
