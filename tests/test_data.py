"""rifle_hf.data on real files: image folders, parquet/arrow/save_to_disk, Fashion-MNIST IDX, timm/HF configs."""

from __future__ import annotations

import gzip
import io
import logging
import pickle
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from rifle_hf.data import (
    BatchTransform,
    DataError,
    DecodedImageDataset,
    HFImageCollator,
    LazyImageDataset,
    PreprocessConfig,
    TrainSample,
    decode_images,
    load_image_dataset,
    make_image_dataset,
)

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


# ----------------------------------------------------------------------------------------------- helpers


def _png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


def _noise(rng: np.random.Generator, h: int, w: int, mode: str) -> PIL.Image.Image:
    if mode == "L":
        return PIL.Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
    if mode == "RGBA":
        return PIL.Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8))
    rgb = PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return rgb.convert("P") if mode == "P" else rgb


def write_folder(
    root: Path,
    classes=("cat", "dog", "eel"),
    per_class: dict[str, int] | None = None,
    seed: int = 0,
    bad: bool = False,
) -> Path:
    """root/<split>/<class>/*.png|jpg with mixed modes and sizes; ``bad`` adds a corrupt and a truncated file."""
    rng = np.random.default_rng(seed)
    per_class = per_class or {"train": 6, "test": 2}
    modes = ("RGB", "L", "RGBA", "P")
    for split, n in per_class.items():
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = _noise(rng, 20 + 3 * i, 28 + 2 * i, modes[i % len(modes)])
                if i % 4 == 0:  # RGB JPEG; L, RGBA and palette images stay PNG
                    img.save(d / f"{i}.jpg", quality=90)
                else:
                    img.save(d / f"{i}.png")
    if bad:
        (root / "train" / classes[0] / "corrupt.png").write_bytes(b"this is not an image at all")
        good = _png_bytes(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
        (root / "train" / classes[1] / "truncated.png").write_bytes(good[: len(good) // 2])
    return root


def _assert_one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg.strip() == msg
    return msg


def _image_features(names: list[str]) -> datasets.Features:
    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})


def _tiny_images(n: int, seed: int = 0, size: int = 12) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {"bytes": _png_bytes(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)), "path": None}
        for _ in range(n)
    ]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _normalized(uint8_chw: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    x = uint8_chw.float() / 255
    return (x - torch.tensor(cfg.mean).view(-1, 1, 1)) / torch.tensor(cfg.std).view(-1, 1, 1)


# ----------------------------------------------------------------------------------------------- loading


def test_image_folder_splits_classes_and_bad_files_skipped(tmp_path, caplog):
    root = write_folder(tmp_path / "root", bad=True)
    with caplog.at_level(logging.WARNING, logger="rifle_hf.data"):
        dsd, info = load_image_dataset(root, val_split=0.25, seed=0)
    assert list(dsd) == ["train", "validation", "test"]
    assert info.label_names == ["cat", "dog", "eel"] and info.num_labels == 3
    assert info.id2label == {0: "cat", 1: "dog", 2: "eel"} and info.label2id["eel"] == 2
    assert (info.image_column, info.label_column) == ("image", "label")
    assert info.validation_from_train and info.has_test and info.eval_split == "test"
    # 6 good + 1 bad file per bad class; the two bad ones are dropped after the carve
    assert info.skipped_images["train"] + info.skipped_images["validation"] == 2
    assert info.num_rows["train"] + info.num_rows["validation"] == 18
    assert info.num_rows["test"] == 6 and info.class_counts["test"] == [2, 2, 2]
    assert info.num_rows == {s: dsd[s].num_rows for s in dsd}
    warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 1 and "2 unreadable" in warnings[0] and "\n" not in warnings[0]
    for split in dsd:  # every kept image decodes
        for row in dsd[split]:
            row["image"].load()


def test_strict_mode_names_the_first_bad_file(tmp_path):
    root = write_folder(tmp_path / "root", bad=True)
    with pytest.raises(DataError) as err:
        load_image_dataset(root, strict=True, val_split=0.25)
    msg = _assert_one_line(err)
    assert ("corrupt.png" in msg or "truncated.png" in msg) and "strict" in msg and "index" in msg


def test_truncated_file_alone_is_detected(tmp_path):
    root = write_folder(tmp_path / "root")
    good = _png_bytes(np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8), "JPEG")
    (root / "test" / "dog" / "cut.jpg").write_bytes(good[: int(len(good) * 0.7)])
    dsd, info = load_image_dataset(root)
    assert info.skipped_images == {"train": 0, "validation": 0, "test": 1}
    assert info.class_counts["test"] == [2, 2, 2]
    with pytest.raises(DataError, match=r"cut\.jpg"):
        load_image_dataset(root, strict=True)


def test_validation_folder_is_used_not_carved(tmp_path):
    root = write_folder(tmp_path / "root", per_class={"train": 4, "val": 2})
    dsd, info = load_image_dataset(root)
    assert not info.validation_from_train and not info.has_test and info.eval_split == "validation"
    assert info.num_rows == {"train": 12, "validation": 6}


def test_flat_class_folder_is_train_only_and_warns_about_test(tmp_path, caplog):
    root = tmp_path / "flat"
    write_folder(root, per_class={"train": 5})
    for d in (root / "train").iterdir():
        d.rename(root / d.name)
    (root / "train").rmdir()
    with caplog.at_level(logging.WARNING, logger="rifle_hf.data"):
        dsd, info = load_image_dataset(root, val_split=0.2)
    assert info.label_names == ["cat", "dog", "eel"] and not info.has_test
    assert info.class_counts == {"train": [4, 4, 4], "validation": [1, 1, 1]}
    assert any("no test split" in r.getMessage() for r in caplog.records)


def test_parquet_files_named_by_split_and_single_parquet_file(tmp_path):
    names = ["a", "b", "c"]
    d = tmp_path / "pq"
    d.mkdir()
    for split, n, seed in (("train", 12, 0), ("test", 6, 1)):
        ds = datasets.Dataset.from_dict(
            {"image": _tiny_images(n, seed), "label": [i % 3 for i in range(n)]},
            features=_image_features(names),
        )
        ds.to_parquet(str(d / f"{split}.parquet"))
    dsd, info = load_image_dataset(d, cache_dir=tmp_path / "cache", val_split=0.25)
    assert info.label_names == names and info.num_rows == {"train": 9, "validation": 3, "test": 6}
    assert dsd["test"][0]["image"].size == (12, 12)

    dsd, info = load_image_dataset(d / "train.parquet", cache_dir=tmp_path / "cache", val_split=0.25)
    assert list(dsd) == ["train", "validation"] and info.label_names == names


def test_save_to_disk_dict_dataset_and_arrow_file(tmp_path):
    names = ["x", "y"]
    ds = datasets.Dataset.from_dict(
        {"image": _tiny_images(10), "label": [0, 1] * 5}, features=_image_features(names)
    )
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(4))}).save_to_disk(str(tmp_path / "dd"))
    dsd, info = load_image_dataset(tmp_path / "dd")
    assert info.num_rows == {"train": 10, "validation": 4} and not info.validation_from_train

    ds.save_to_disk(str(tmp_path / "single"))
    dsd, info = load_image_dataset(str(tmp_path / "single"), val_split=0.2)
    assert info.num_rows == {"train": 8, "validation": 2} and info.class_counts["validation"] == [1, 1]

    arrow = sorted((tmp_path / "single").glob("*.arrow"))[0]
    dsd, info = load_image_dataset(arrow, val_split=0.2)
    assert info.num_rows == {"train": 8, "validation": 2} and info.label_names == names


def test_string_labels_become_sorted_classlabel(tmp_path):
    labels = ["zebra", "ant", "moth", "ant", "zebra", "moth"] * 3
    images = _tiny_images(len(labels))
    ds = datasets.Dataset.from_dict({"picture": images, "category": labels})
    ds = ds.cast_column("picture", datasets.Image())
    ds.to_parquet(str(tmp_path / "train.parquet"))
    dsd, info = load_image_dataset(tmp_path / "train.parquet", cache_dir=tmp_path / "c", val_split=1 / 3)
    assert (info.image_column, info.label_column) == ("picture", "category")
    assert info.label_names == ["ant", "moth", "zebra"]
    assert isinstance(dsd["train"].features["category"], datasets.ClassLabel)
    assert info.class_counts["validation"] == [2, 2, 2]
    # each row keeps its own label: match decoded pixels back to the source rows
    by_pixels = {_png_pixels(img["bytes"]): lab for img, lab in zip(images, labels)}
    for split in ("train", "validation"):
        for row in dsd[split]:
            key = np.asarray(row["picture"]).tobytes()
            assert info.label_names[row["category"]] == by_pixels[key]


def _png_pixels(data: bytes) -> bytes:
    return np.asarray(PIL.Image.open(io.BytesIO(data))).tobytes()


def test_non_contiguous_int_labels_and_bytes_image_column(tmp_path):
    labels = [10, 3, 7] * 6
    rng = np.random.default_rng(0)
    raw = [_png_bytes(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)) for _ in labels]
    ds = datasets.Dataset.from_dict({"jpeg_bytes": raw, "target": labels, "note": ["n"] * len(labels)})
    assert ds.features["jpeg_bytes"] == datasets.Value("binary")
    ds.save_to_disk(str(tmp_path / "ints"))
    dsd, info = load_image_dataset(tmp_path / "ints", val_split=1 / 3)
    assert (info.image_column, info.label_column) == ("jpeg_bytes", "target")
    assert info.label_names == ["3", "7", "10"]  # numeric order, not "10" < "3"
    assert dsd["train"].column_names == ["jpeg_bytes", "target"]
    row = dsd["train"][0]
    assert isinstance(row["jpeg_bytes"], PIL.Image.Image)
    assert info.class_counts["train"] == [4, 4, 4]


def test_image_paths_column_and_minus_one_labels_dropped(tmp_path):
    root = write_folder(tmp_path / "imgs", per_class={"train": 4})
    paths = sorted(str(p) for p in (root / "train").rglob("*.*"))
    labels = [p.split("/")[-2] for p in paths]
    ids = [["cat", "dog", "eel"].index(lab) for lab in labels]
    ids[0] = -1  # unlabeled row
    ds = datasets.Dataset.from_dict(
        {"file": paths, "label": ids},
        features=datasets.Features(
            {"file": datasets.Value("string"), "label": datasets.ClassLabel(names=["cat", "dog", "eel"])}
        ),
    )
    ds.save_to_disk(str(tmp_path / "paths"))
    dsd, info = load_image_dataset(tmp_path / "paths", val_split=0.25)
    assert info.image_column == "file"
    assert sum(info.num_rows.values()) == len(paths) - 1
    assert isinstance(dsd["train"].features["file"], datasets.Image)


def test_ambiguous_label_columns_and_override(tmp_path):
    n = 12
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "fine_label": datasets.ClassLabel(names=[f"f{i}" for i in range(4)]),
            "coarse_label": datasets.ClassLabel(names=["c0", "c1"]),
        }
    )
    ds = datasets.Dataset.from_dict(
        {
            "img": _tiny_images(n),
            "fine_label": [i % 4 for i in range(n)],
            "coarse_label": [i % 2 for i in range(n)],
        },
        features=features,
    )
    ds.save_to_disk(str(tmp_path / "cifar_like"))
    with pytest.raises(DataError) as err:
        load_image_dataset(tmp_path / "cifar_like")
    msg = _assert_one_line(err)
    assert "ambiguous" in msg and "fine_label" in msg and "coarse_label" in msg and "--label_column" in msg

    _, info = load_image_dataset(tmp_path / "cifar_like", label_column="fine_label", val_split=0.34)
    assert info.label_column == "fine_label" and info.num_labels == 4
    _, info = load_image_dataset(tmp_path / "cifar_like", label_column="coarse_label", val_split=0.34)
    assert info.label_names == ["c0", "c1"]

    with pytest.raises(DataError) as err:
        load_image_dataset(tmp_path / "cifar_like", label_column="labels")
    msg = _assert_one_line(err)
    assert "'labels' not found" in msg and "fine_label" in msg and "coarse_label" in msg
    with pytest.raises(DataError) as err:
        load_image_dataset(tmp_path / "cifar_like", image_column="fine_label", label_column="coarse_label")
    assert "does not hold images" in _assert_one_line(err)
    with pytest.raises(DataError) as err:
        load_image_dataset(tmp_path / "cifar_like", image_column="pixels")
    assert "available columns: img, fine_label, coarse_label" in _assert_one_line(err)


def test_missing_image_or_label_column(tmp_path):
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}).save_to_disk(str(tmp_path / "noimg"))
    with pytest.raises(DataError) as err:
        load_image_dataset(tmp_path / "noimg")
    assert "no image column" in _assert_one_line(err) and "--image_column" in str(err.value)

    ds = datasets.Dataset.from_dict({"image": _tiny_images(4), "caption": list("abcd")})
    ds.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "nolabel"))
    with pytest.raises(DataError) as err:
        load_image_dataset(tmp_path / "nolabel")
    assert "no label column" in _assert_one_line(err) and "--label_column" in str(err.value)

    root = tmp_path / "loose" / "train"
    root.mkdir(parents=True)
    for i in range(3):
        _noise(np.random.default_rng(i), 8, 8, "RGB").save(root / f"{i}.png")
    with pytest.raises(DataError) as err:
        load_image_dataset(tmp_path / "loose")
    assert "class folders" in _assert_one_line(err) and "root/train/<class>" in str(err.value)


def test_stratified_validation_carve_is_seeded(tmp_path):
    root = write_folder(tmp_path / "root", per_class={"train": 20}, classes=("a", "b", "c", "d"))
    _, info0 = load_image_dataset(root, val_split=0.25, seed=0)
    assert info0.class_counts["validation"] == [5, 5, 5, 5] and info0.class_counts["train"] == [15] * 4

    def val_files(seed):
        dsd, _ = load_image_dataset(root, val_split=0.25, seed=seed)
        return [dsd["validation"].with_format("arrow")[:]["image"].to_pylist()[i]["path"] for i in range(20)]

    def train_files(seed):
        dsd, _ = load_image_dataset(root, val_split=0.25, seed=seed)
        return {v["path"] for v in dsd["train"].with_format("arrow")[:]["image"].to_pylist()}

    assert val_files(0) == val_files(0) and val_files(0) != val_files(1)
    assert not set(val_files(3)) & train_files(3)
    assert len(set(val_files(3)) | train_files(3)) == 80


def test_uneven_classes_keep_a_training_image(tmp_path):
    write_folder(tmp_path / "r", per_class={"train": 1}, classes=("solo",))
    write_folder(tmp_path / "r", per_class={"train": 9}, classes=("big",), seed=5)
    _, info = load_image_dataset(tmp_path / "r", val_split=0.2)
    assert info.label_names == ["big", "solo"]
    assert info.class_counts["train"][1] == 1 and info.class_counts["validation"][1] == 0
    assert sum(info.class_counts["validation"]) == 2


def test_few_shot_per_class_after_carve_replaces_bad_images(tmp_path):
    root = write_folder(tmp_path / "root", per_class={"train": 12, "test": 2}, bad=True)
    dsd, info = load_image_dataset(root, val_split=0.25, max_train_samples_per_class=4, seed=0)
    assert info.class_counts["train"] == [4, 4, 4]
    full_val = load_image_dataset(root, val_split=0.25, seed=0)[1].num_rows["validation"]
    assert info.num_rows["validation"] == full_val  # carve happens first, on the full train split
    for row in dsd["train"]:
        row["image"].load()
    paths = lambda s: [v["path"] for v in dsd["train"].with_format("arrow")[:]["image"].to_pylist()]  # noqa: E731
    first = paths(0)
    dsd, _ = load_image_dataset(root, val_split=0.25, max_train_samples_per_class=4, seed=0)
    assert paths(0) == first
    dsd, _ = load_image_dataset(root, val_split=0.25, max_train_samples_per_class=4, seed=1)
    assert paths(0) != first
    _, info = load_image_dataset(root, val_split=0.25, max_train_samples_per_class=100)
    _, full = load_image_dataset(root, val_split=0.25)
    assert info.class_counts == full.class_counts  # k above the class sizes keeps every readable image


def test_few_shot_strict_fails_on_bad_pick(tmp_path):
    root = write_folder(tmp_path / "root", per_class={"train": 2}, classes=("cat", "dog"), bad=True)
    with pytest.raises(DataError) as err:
        for seed in range(10):  # some seed picks a bad file for the 2-shot train split of its class
            load_image_dataset(root, val_split=0.3, max_train_samples_per_class=2, strict=True, seed=seed)
    assert "strict" in _assert_one_line(err)


def test_error_messages_name_the_fix(tmp_path, monkeypatch):
    # single class
    root = write_folder(tmp_path / "one", per_class={"train": 4}, classes=("only",))
    with pytest.raises(DataError) as err:
        load_image_dataset(root)
    assert "only class 'only'" in _assert_one_line(err) and ">= 2 classes" in str(err.value)
    # empty dataset
    empty = datasets.Dataset.from_dict({"image": [], "label": []}, features=_image_features(["a", "b"]))
    empty.to_parquet(str(tmp_path / "empty.parquet"))
    with pytest.raises(DataError) as err:
        load_image_dataset(tmp_path / "empty.parquet", cache_dir=tmp_path / "cache")
    assert "could not read" in _assert_one_line(err) and "non-empty" in str(err.value)
    empty.save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(DataError) as err:
        load_image_dataset(tmp_path / "empty")
    assert "save the dataset again" in _assert_one_line(err)
    # an image folder without train/
    write_folder(tmp_path / "testonly", per_class={"test": 2})
    with pytest.raises(DataError) as err:
        load_image_dataset(tmp_path / "testonly")
    assert "no train/" in _assert_one_line(err) and "root/train/<class>" in str(err.value)
    # empty directory
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError) as err:
        load_image_dataset(tmp_path / "nothing")
    assert "no images or data files" in _assert_one_line(err)
    # a class the labels name but that has no training images
    ds = datasets.Dataset.from_dict(
        {"image": _tiny_images(8), "label": [0, 1] * 4}, features=_image_features(["a", "b", "ghost"])
    )
    ds.save_to_disk(str(tmp_path / "ghost"))
    with pytest.raises(DataError) as err:
        load_image_dataset(tmp_path / "ghost")
    assert "'ghost'" in _assert_one_line(err) and "no training images" in str(err.value)
    # bad arguments / paths
    with pytest.raises(DataError) as err:
        load_image_dataset(root, val_split=0.0)
    assert "val_split" in _assert_one_line(err)
    with pytest.raises(DataError) as err:
        load_image_dataset(str(tmp_path / "does" / "not" / "exist"))
    assert "does not exist" in _assert_one_line(err) and "root/train/<class>" in str(err.value)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError) as err:
        load_image_dataset(tmp_path / "data.csv")
    assert "parquet" in _assert_one_line(err)
    # float labels
    ds = datasets.Dataset.from_dict({"image": _tiny_images(4), "label": [0.5, 1.5, 0.5, 1.5]})
    ds.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "floats"))
    with pytest.raises(DataError) as err:
        load_image_dataset(tmp_path / "floats")
    assert "non-integer" in _assert_one_line(err)


def test_hub_dataset_offline_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as err:
        load_image_dataset("uoft-cs/cifar100", cache_dir=tmp_path)
    msg = _assert_one_line(err)
    assert "cannot reach the Hugging Face Hub" in msg and "uoft-cs/cifar100" in msg
    assert "--dataset path/to/root" in msg and "root/train/<class>/*.jpg" in msg


# ----------------------------------------------------------------------------------------------- Fashion-MNIST


@pytest.fixture(scope="module")
def fmnist_folder(tmp_path_factory):
    if not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST IDX files not installed")
    images = _read_idx(FMNIST_DIR / "t10k-images-idx3-ubyte.gz")
    labels = _read_idx(FMNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    root = tmp_path_factory.mktemp("fmnist")
    kept = {}
    for split, (lo, hi) in {"train": (0, 8), "test": (8, 11)}.items():
        for c in range(10):
            for j in np.flatnonzero(labels == c)[lo:hi]:
                path = root / split / f"class{c}" / f"{j}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                PIL.Image.fromarray(images[j]).save(path)
                kept[str(path)] = images[j]
    return root, kept


def test_fashion_mnist_idx_folder_decodes_like_timm(fmnist_folder):
    import timm.data

    root, pixels = fmnist_folder
    dsd, info = load_image_dataset(root, val_split=0.25, seed=0)
    assert info.num_labels == 10 and info.class_counts["train"] == [6] * 10 and info.num_rows["test"] == 30
    cfg = PreprocessConfig(input_size=(3, 32, 32), interpolation="bicubic", crop_pct=0.875)
    decoded = decode_images(dsd["test"], info.image_column, cfg, num_workers=0)
    assert decoded.shape == (30, 3, 32, 32) and decoded.dtype == torch.uint8
    assert torch.equal(decoded[:, 0], decoded[:, 1]) and torch.equal(
        decoded[:, 1], decoded[:, 2]
    )  # gray -> RGB
    reference = timm.data.create_transform(
        input_size=cfg.input_size,
        interpolation=cfg.interpolation,
        mean=cfg.mean,
        std=cfg.std,
        crop_pct=cfg.crop_pct,
        is_training=False,
    )
    paths = [v["path"] for v in dsd["test"].with_format("arrow")[:]["image"].to_pylist()]
    for i, path in enumerate(paths):
        expected = reference(PIL.Image.fromarray(pixels[path]).convert("RGB"))
        torch.testing.assert_close(_normalized(decoded[i], cfg), expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------- decode / datasets


@pytest.fixture
def folder_dsd(tmp_path):
    root = write_folder(tmp_path / "root", per_class={"train": 5, "test": 4})
    return load_image_dataset(root, val_split=0.2)


@pytest.mark.parametrize(
    "cfg",
    [
        PreprocessConfig(input_size=(3, 32, 32), crop_pct=0.875, interpolation="bicubic"),
        PreprocessConfig(input_size=(3, 24, 40), crop_pct=0.9, interpolation="bilinear"),
        PreprocessConfig(input_size=(3, 30, 30), crop_pct=1.0, crop_mode="squash", interpolation="lanczos"),
    ],
    ids=["center", "non-square", "squash"],
)
def test_decode_matches_timm_eval_transform(folder_dsd, cfg):
    import timm.data

    dsd, info = folder_dsd
    reference = timm.data.create_transform(
        input_size=cfg.input_size,
        interpolation=cfg.interpolation,
        mean=cfg.mean,
        std=cfg.std,
        crop_pct=cfg.crop_pct,
        crop_mode=cfg.crop_mode,
        is_training=False,
    )
    decoded = decode_images(dsd["test"], info.image_column, cfg, num_workers=0)
    assert decoded.shape == (12, *cfg.input_size) and decoded.dtype == torch.uint8
    modes = set()
    for i, row in enumerate(dsd["test"]):
        img = row["image"]
        modes.add(img.mode)
        rgb = img.convert("RGBA").convert("RGB") if img.mode == "P" else img.convert("RGB")
        torch.testing.assert_close(_normalized(decoded[i], cfg), reference(rgb), atol=1e-5, rtol=0)
    assert {"L", "RGB", "RGBA", "P"} <= modes


def test_decode_workers_and_lazy_fallback_agree(folder_dsd, caplog):
    dsd, info = folder_dsd
    cfg = PreprocessConfig(input_size=(3, 16, 16))
    serial = decode_images(dsd["train"], info.image_column, cfg, num_workers=0)
    parallel = decode_images(dsd["train"], info.image_column, cfg, num_workers=2, batch_size=4)
    assert torch.equal(serial, parallel)

    cached = make_image_dataset(dsd["train"], info, cfg)
    assert isinstance(cached, DecodedImageDataset) and len(cached) == info.num_rows["train"]
    with caplog.at_level(logging.WARNING, logger="rifle_hf.data"):
        lazy = make_image_dataset(dsd["train"], info, cfg, max_cache_bytes=1000)
    assert isinstance(lazy, LazyImageDataset) and any("lazily" in r.getMessage() for r in caplog.records)
    labels = list(dsd["train"]["label"])
    for i in range(len(cached)):
        (a, la), (b, lb) = cached[i], lazy[i]
        assert torch.equal(a, b) and la == lb == labels[i]
    batch = next(iter(torch.utils.data.DataLoader(lazy, batch_size=5)))
    images, targets = batch
    assert (
        images.shape == (5, 3, 16, 16) and torch.equal(images, serial[:5]) and targets.tolist() == labels[:5]
    )


def test_single_channel_config_decodes_grayscale(folder_dsd):
    dsd, info = folder_dsd
    cfg = PreprocessConfig(input_size=(1, 16, 16), mean=(0.5,), std=(0.5,))
    x = decode_images(dsd["test"], info.image_column, cfg, num_workers=0)
    assert x.shape == (12, 1, 16, 16)
    out = BatchTransform(cfg)(x)
    assert out.shape == (12, 1, 16, 16) and out.min() >= -1 and out.max() <= 1


def test_train_items_are_marked(folder_dsd):
    dsd, info = folder_dsd
    cfg = PreprocessConfig(input_size=(3, 8, 8))
    train = make_image_dataset(dsd["train"], info, cfg, train=True)
    evals = make_image_dataset(dsd["test"], info, cfg)
    assert isinstance(train[0], TrainSample) and not isinstance(evals[0], TrainSample)
    images, labels = next(iter(torch.utils.data.DataLoader(train, batch_size=4)))  # default collate unchanged
    assert images.dtype == torch.uint8 and labels.dtype == torch.long
    with pytest.raises(ValueError, match="uint8"):
        DecodedImageDataset(torch.zeros(2, 3, 4, 4), [0, 1])


# ----------------------------------------------------------------------------------------------- BatchTransform


def _uint8_batch(n=6, h=12, w=12, seed=0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )


def test_batch_transform_eval_is_plain_normalization():
    cfg = PreprocessConfig(input_size=(3, 12, 12), mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    x = _uint8_batch()
    out = BatchTransform(cfg, train=False)(x)
    expected = (x.float() / 255 - torch.tensor(cfg.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.std).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(out, expected)
    assert out.dtype == torch.float32
    cl = BatchTransform(cfg, channels_last=True)(x)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, out)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        BatchTransform(cfg)(x[0])


def test_batch_transform_train_is_seeded_and_varies():
    cfg = PreprocessConfig(input_size=(3, 12, 12))
    x = _uint8_batch(n=16)
    a1, a2 = BatchTransform(cfg, train=True, seed=7), BatchTransform(cfg, train=True, seed=7)
    first = a1(x)
    assert torch.equal(first, a2(x))
    assert not torch.equal(first, a1(x))  # the generator advances: next epoch differs
    assert not torch.equal(first, BatchTransform(cfg, train=True, seed=8)(x))
    plain = BatchTransform(cfg)(x)
    assert not torch.equal(first, plain) and first.shape == plain.shape and torch.isfinite(first).all()
    # values stay within the normalized pixel range (bilinear sampling inside the image)
    assert first.min() >= plain.min() - 1e-5 and first.max() <= plain.max() + 1e-5
    # the state survives pickling (DataLoader workers with spawn)
    b = pickle.loads(pickle.dumps(a1))
    assert torch.equal(b(x), a1(x))


def test_batch_transform_flip_only_and_identity():
    cfg = PreprocessConfig(input_size=(3, 12, 12))
    x = _uint8_batch(n=32)
    plain = BatchTransform(cfg)(x)
    out = BatchTransform(cfg, train=True, scale=(1.0, 1.0), hflip=0.5, seed=0)(x)
    flipped = [torch.equal(o, p.flip(-1)) for o, p in zip(out, plain)]
    kept = [torch.equal(o, p) for o, p in zip(out, plain)]
    assert all(f or k for f, k in zip(flipped, kept)) and 0 < sum(flipped) < 32
    # the affine path with full-size crops and flips is an exact resampling of pixel centers
    crop = BatchTransform(cfg, train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0)
    crop.scale = (0.999999, 1.0)  # force the grid_sample path
    torch.testing.assert_close(crop(x), plain.flip(-1), atol=1e-3, rtol=0)
    with pytest.raises(ValueError):
        BatchTransform(cfg, train=True, scale=(0.0, 1.0))


# ----------------------------------------------------------------------------------------------- HF collator


def test_hf_collator_on_real_decoded_data(folder_dsd):
    dsd, info = folder_dsd
    cfg = PreprocessConfig(input_size=(3, 16, 16))
    train = make_image_dataset(dsd["train"], info, cfg, train=True)
    evals = make_image_dataset(dsd["test"], info, cfg)
    collator = HFImageCollator(BatchTransform(cfg, train=True, seed=3))
    loader = torch.utils.data.DataLoader(evals, batch_size=12, collate_fn=collator)
    batch = next(iter(loader))
    assert set(batch) == {"pixel_values", "labels"}
    assert batch["pixel_values"].shape == (12, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == list(dsd["test"]["label"])
    torch.testing.assert_close(
        batch["pixel_values"], BatchTransform(cfg)(evals.images)
    )  # eval: no augmentation

    items = [train[i] for i in range(len(train))]
    # what Trainer wraps the collator in when remove_unused_columns=True (the default): tuples pass through
    from transformers.trainer_utils import RemoveColumnsCollator

    wrapped = RemoveColumnsCollator(collator, signature_columns=["pixel_values", "labels"])
    assert all(isinstance(item, TrainSample) for item in [wrapped._remove_columns(i) for i in items])
    out = collator(items)
    expected = BatchTransform(cfg, train=True, seed=3)(train.images)
    torch.testing.assert_close(out["pixel_values"], expected)
    assert out["labels"].tolist() == list(dsd["train"]["label"])


# ----------------------------------------------------------------------------------------------- PreprocessConfig


def test_preprocess_config_from_timm_model():
    import timm

    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=3)
    expected = timm.data.resolve_model_data_config(model)
    cfg = PreprocessConfig.from_timm(model)
    assert cfg.input_size == tuple(expected["input_size"]) and cfg.crop_pct == expected["crop_pct"]
    assert cfg.mean == tuple(expected["mean"]) and cfg.interpolation == expected["interpolation"]
    small = PreprocessConfig.from_timm(model, image_size=64)
    assert (
        small.input_size == (3, 64, 64) and small.crop_pct == cfg.crop_pct and small.resize_size == (67, 67)
    )
    assert PreprocessConfig.from_timm(model, image_size=(48, 64), crop_pct=1.0).resize_size == (48, 64)


def _smooth_image() -> PIL.Image.Image:
    yy, xx = np.mgrid[0:100, 0:150]  # crop offsets come out whole: HF and torchvision round .5 differently
    arr = np.stack(
        [128 + 100 * np.sin(xx / 15), 128 + 100 * np.cos(yy / 11), 128 + 60 * np.sin((xx + yy) / 20)], -1
    )
    return PIL.Image.fromarray(arr.astype(np.uint8))


@pytest.mark.parametrize(
    "make, mode, size, crop_pct",
    [
        (lambda T: T.ViTImageProcessor(), "squash", (224, 224), 1.0),
        (lambda T: T.ConvNextImageProcessor(size={"shortest_edge": 224}), "center", (224, 224), 0.875),
        (lambda T: T.ConvNextImageProcessor(), "squash", (384, 384), 1.0),
        (lambda T: T.DeiTImageProcessor(), "squash", (224, 224), 0.875),
        (lambda T: T.CLIPImageProcessor(), "center", (224, 224), 1.0),
        (lambda T: T.EfficientNetImageProcessor(), "squash", (346, 346), 1.0),
    ],
    ids=["vit", "convnext224", "convnext384", "deit", "clip", "efficientnet"],
)
def test_preprocess_config_from_hf_processor_matches_its_output(make, mode, size, crop_pct):
    import transformers

    from rifle_hf.data import _decode_resize

    processor = make(transformers)
    cfg = PreprocessConfig.from_hf(processor)
    assert (cfg.crop_mode, cfg.image_size) == (mode, size) and cfg.crop_pct == pytest.approx(crop_pct)
    img = _smooth_image()
    expected = processor(img, return_tensors="pt")["pixel_values"][0]
    ours = _normalized(torch.from_numpy(_decode_resize(img, cfg)).permute(2, 0, 1), cfg)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().mean() < 0.01 and (ours - expected).abs().max() < 0.1


def test_preprocess_config_from_hf_overrides_and_timm_wrapper():
    import transformers

    cfg = PreprocessConfig.from_hf(transformers.ViTImageProcessor(), image_size=64)
    assert (
        cfg.input_size == (3, 64, 64)
        and cfg.mean == pytest.approx((0.5,) * 3)
        and cfg.interpolation == "bilinear"
    )
    no_norm = PreprocessConfig.from_hf(transformers.ViTImageProcessor(do_normalize=False))
    assert no_norm.mean == (0.0, 0.0, 0.0) and no_norm.std == (1.0, 1.0, 1.0)
    wrapper = transformers.TimmWrapperImageProcessor(
        pretrained_cfg={
            "input_size": (3, 96, 96),
            "crop_pct": 0.95,
            "interpolation": "bilinear",
            "mean": (0.1, 0.2, 0.3),
            "std": (0.5, 0.5, 0.5),
        }
    )
    cfg = PreprocessConfig.from_hf(wrapper)
    assert cfg.input_size == (3, 96, 96) and cfg.crop_pct == 0.95 and cfg.mean == (0.1, 0.2, 0.3)
    with pytest.raises(ValueError, match="crop_pct"):
        PreprocessConfig(crop_pct=1.5)
    with pytest.raises(ValueError, match="interpolation"):
        PreprocessConfig(interpolation="cubic-ish")


def test_unchecked_bad_image_fails_at_decode_naming_the_file(tmp_path):
    root = write_folder(tmp_path / "root", per_class={"train": 3, "test": 1}, bad=True)
    dsd, info = load_image_dataset(root, check_images=False, val_split=0.2)
    assert info.skipped_images == {"train": 0, "validation": 0, "test": 0}
    assert info.num_rows["train"] + info.num_rows["validation"] == 11
    cfg = PreprocessConfig(input_size=(3, 8, 8))
    split = (
        "train"
        if any("corrupt" in v["path"] for v in dsd["train"].with_format("arrow")[:]["image"].to_pylist())
        else "validation"
    )
    with pytest.raises(DataError) as err:
        make_image_dataset(dsd[split], info, cfg, num_workers=0)
    msg = _assert_one_line(err)
    assert ("corrupt.png" in msg or "truncated.png" in msg) and "check_images=True" in msg
