"""Bundled Fashion-MNIST subset, IDX reader, rebuild script and few-shot splits (real files only)."""

from __future__ import annotations

import gzip
import json
import runpy
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest

from rifle_hf.fashion_mnist import (
    BUNDLED_DIR,
    CLASS_NAMES,
    FULL_DIR,
    few_shot_split,
    full_available,
    load_bundled,
    load_full,
    read_idx,
    write_subset,
)

ROOT = Path(__file__).resolve().parents[1]
needs_full = pytest.mark.skipif(
    not full_available(FULL_DIR),
    reason=f"full Fashion-MNIST absent from {FULL_DIR} (apt-get install dataset-fashion-mnist)",
)


def _arrays(ds: datasets.Dataset) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([np.asarray(img) for img in ds["image"]]), np.asarray(ds["label"])


@pytest.fixture(scope="module")
def bundled() -> datasets.DatasetDict:
    return load_bundled()


@pytest.fixture(scope="module")
def bundled_indices() -> dict[str, list[int]]:
    return json.loads((BUNDLED_DIR / "indices.json").read_text())["indices"]


def test_bundled_counts_balance_and_names(bundled):
    assert set(bundled) == {"train", "test"}
    for split in ("train", "test"):
        ds = bundled[split]
        assert ds.num_rows == 1000
        assert ds.features["label"].names == list(CLASS_NAMES)
        assert isinstance(ds.features["image"], datasets.Image)
        assert Counter(ds["label"]) == dict.fromkeys(range(10), 100)
        image = ds[0]["image"]
        assert image.mode == "L" and image.size == (28, 28)
    assert (BUNDLED_DIR / "LICENSE").read_text().startswith("The MIT License")
    assert "build_fashion_mnist_subset.py" in (BUNDLED_DIR / "README.md").read_text()
    total = sum(p.stat().st_size for p in BUNDLED_DIR.iterdir())
    assert total < 4_000_000


def test_generic_parquet_loading_keeps_class_names(bundled):
    files = {split: str(BUNDLED_DIR / f"{split}.parquet") for split in ("train", "test")}
    by_files = datasets.load_dataset("parquet", data_files=files)
    by_dir = datasets.load_dataset(str(BUNDLED_DIR))
    for loaded in (by_files, by_dir):
        assert {k: v.num_rows for k, v in loaded.items()} == {"train": 1000, "test": 1000}
        assert loaded["test"].features["label"].names == list(CLASS_NAMES)
    assert by_dir["train"]["label"] == bundled["train"]["label"]


def test_indices_file_is_consistent(bundled_indices):
    for split in ("train", "test"):
        idx = bundled_indices[split]
        assert len(idx) == 1000 and idx == sorted(set(idx))


def _write_idx(path: Path, array: np.ndarray, type_byte: int) -> None:
    header = bytes([0, 0, type_byte, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    body = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(body)
    else:
        path.write_bytes(body)


def test_read_idx_round_trip_and_bad_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    _write_idx(tmp_path / "imgs-idx3-ubyte.gz", images, 0x08)
    np.testing.assert_array_equal(read_idx(tmp_path / "imgs-idx3-ubyte.gz"), images)
    floats = rng.standard_normal((2, 3)).astype(np.float32)
    _write_idx(tmp_path / "f-idx2", floats, 0x0D)
    out = read_idx(tmp_path / "f-idx2")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, floats)

    data = (tmp_path / "f-idx2").read_bytes()
    (tmp_path / "short").write_bytes(data[:-1])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "png")


def test_missing_full_set_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_full(tmp_path)


@needs_full
def test_idx_reader_matches_bundled_images(bundled, bundled_indices):
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(FULL_DIR / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(FULL_DIR / f"{prefix}-labels-idx1-ubyte.gz")
        idx = np.asarray(bundled_indices[split])
        got_images, got_labels = _arrays(bundled[split])
        np.testing.assert_array_equal(got_images, images[idx])
        np.testing.assert_array_equal(got_labels, labels[idx])


@needs_full
def test_rebuild_reproduces_bundled_files(tmp_path, bundled, bundled_indices):
    script = runpy.run_path(str(ROOT / "scripts" / "build_fashion_mnist_subset.py"))
    assert script["main"](["--out", str(tmp_path)]) == 0
    rebuilt = datasets.load_dataset(
        "parquet", data_files={s: str(tmp_path / f"{s}.parquet") for s in ("train", "test")}
    )
    for split in ("train", "test"):
        assert rebuilt[split].features == bundled[split].features
        new_images, new_labels = _arrays(rebuilt[split])
        old_images, old_labels = _arrays(bundled[split])
        np.testing.assert_array_equal(new_images, old_images)
        np.testing.assert_array_equal(new_labels, old_labels)
    assert json.loads((tmp_path / "indices.json").read_text())["indices"] == bundled_indices


def test_rebuild_without_full_set_fails_cleanly(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        write_subset(tmp_path / "out", root=tmp_path)
    assert not (tmp_path / "out").exists()


def test_few_shot_from_bundled_is_balanced_and_deterministic(bundled):
    split = few_shot_split(per_class=5, seed=3, test_size=30, source="bundled")
    assert Counter(split["train"]["label"]) == dict.fromkeys(range(10), 5)
    assert Counter(split["test"]["label"]) == dict.fromkeys(range(10), 3)
    again = few_shot_split(per_class=5, seed=3, test_size=30, source="bundled")
    np.testing.assert_array_equal(_arrays(split["train"])[0], _arrays(again["train"])[0])
    other = few_shot_split(per_class=5, seed=4, test_size=30, source="bundled")
    assert not np.array_equal(_arrays(split["train"])[0], _arrays(other["train"])[0])
    pool = {img.tobytes() for img in _arrays(bundled["train"])[0]}
    assert all(img.tobytes() in pool for img in _arrays(split["train"])[0])
    whole = few_shot_split(per_class=1, test_size=None, source="bundled")
    assert whole["test"].num_rows == 1000
    odd = few_shot_split(per_class=1, test_size=13, source="bundled")
    assert sorted(Counter(odd["test"]["label"]).values()) == [1] * 7 + [2] * 3


def test_few_shot_rejects_what_the_source_cannot_give():
    with pytest.raises(ValueError, match="only 100 exist"):
        few_shot_split(per_class=101, test_size=None, source="bundled")
    with pytest.raises(ValueError, match="test_size=2000 must be between 10 and 1000"):
        few_shot_split(per_class=10, test_size=2000, source="bundled")
    with pytest.raises(ValueError, match="source must be"):
        few_shot_split(source="hub")


@needs_full
def test_few_shot_from_full_set():
    split = few_shot_split(per_class=10, seed=0, test_size=2000)
    assert Counter(split["train"]["label"]) == dict.fromkeys(range(10), 10)
    assert Counter(split["test"]["label"]) == dict.fromkeys(range(10), 200)
    assert split["train"].features["label"].names == list(CLASS_NAMES)
    train_images = read_idx(FULL_DIR / "train-images-idx3-ubyte.gz")
    pool = {img.tobytes() for img in train_images}
    assert all(img.tobytes() in pool for img in _arrays(split["train"])[0])


@needs_full
@pytest.mark.slow
def test_load_full_counts_and_features(bundled):
    full = load_full()
    assert {k: v.num_rows for k, v in full.items()} == {"train": 60000, "test": 10000}
    assert full["train"].features == bundled["train"].features
    assert Counter(full["test"]["label"]) == dict.fromkeys(range(10), 1000)
