"""Image-classification data for the fine-tuning recipes: load, check, decode once, augment per batch.

The recipes call four things:

1. ``load_image_dataset(source)`` -> ``(DatasetDict with train/validation[/test], DatasetInfo)``. ``source`` is a
   Hub dataset id, an image folder (``root/train/<class>/*.jpg``), a parquet/arrow file, a folder of
   ``train.parquet``/``test.parquet``... files, or a ``save_to_disk`` folder. Columns are detected, labels become a
   ``ClassLabel``, a stratified validation split is carved from train when the source has none, unreadable image
   files are skipped (or rejected with ``strict=True``).
2. ``PreprocessConfig.from_timm(model)`` / ``PreprocessConfig.from_hf(image_processor)``: the model's own eval
   preprocessing (size, resize/crop rule, interpolation, mean/std), with an ``image_size`` override.
3. ``make_image_dataset(split, info, cfg)``: decodes + resizes + center-crops every image ONCE into a uint8
   ``(N, C, H, W)`` tensor (``DecodedImageDataset``) so epochs do not re-run JPEG/PNG decoding; when that cache
   would exceed ``max_cache_bytes`` it returns a ``LazyImageDataset`` doing the same transform per item.
4. ``BatchTransform`` (timm loop, on device, per batch) / ``HFImageCollator`` (``Trainer(data_collator=...)``):
   uint8 batch -> float, light train-time augmentation, mean/std normalization.

Items of both datasets are ``(uint8 image (C, H, W), int label)`` tuples, so
``images, labels = batch`` works with the default collate.

timm + Accelerate loop::

    dsd, info = load_image_dataset(args.dataset, max_train_samples_per_class=args.shots, seed=args.seed)
    cfg = PreprocessConfig.from_timm(model, image_size=args.image_size)
    loader = DataLoader(make_image_dataset(dsd["train"], info, cfg), batch_size=64, shuffle=True)
    train_tf, eval_tf = BatchTransform(cfg, train=True, seed=args.seed), BatchTransform(cfg)
    for images, labels in loader:
        logits = model(train_tf(images.to(device)))

transformers.Trainer::

    cfg = PreprocessConfig.from_hf(AutoImageProcessor.from_pretrained(name), image_size=args.image_size)
    Trainer(..., train_dataset=make_image_dataset(dsd["train"], info, cfg, train=True),
            eval_dataset=make_image_dataset(dsd["validation"], info, cfg),
            data_collator=HFImageCollator(BatchTransform(cfg, train=True, seed=args.seed)))
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_CACHE_BYTES",
    "BatchTransform",
    "DataError",
    "DatasetInfo",
    "DecodedImageDataset",
    "HFImageCollator",
    "LazyImageDataset",
    "PreprocessConfig",
    "TrainSample",
    "decode_images",
    "load_image_dataset",
    "make_image_dataset",
]

#: Largest uint8 image cache ``make_image_dataset`` builds before falling back to lazy decoding.
DEFAULT_MAX_CACHE_BYTES = 8 * 1024**3

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

_FOLDER_HINT = "--dataset path/to/root with root/train/<class>/*.jpg (optionally root/test/<class>/*.jpg)"
_LABEL_NAMES = (
    "label",
    "labels",
    "fine_label",
    "coarse_label",
    "class",
    "classes",
    "category",
    "target",
    "y",
)
_SPLIT_ALIASES = {"validation": "validation", "valid": "validation", "val": "validation", "dev": "validation"}
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_DATA_EXTENSIONS = (".parquet", ".arrow")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class DataError(ValueError):
    """Bad dataset input; the one-line message names the fix."""


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


@dataclass
class DatasetInfo:
    """What ``load_image_dataset`` found: columns, classes and per-split sizes (after carving and skipping)."""

    source: str
    image_column: str
    label_column: str
    label_names: list[str]
    num_rows: dict[str, int] = field(default_factory=dict)
    class_counts: dict[str, list[int]] = field(default_factory=dict)
    skipped_images: dict[str, int] = field(default_factory=dict)
    validation_from_train: bool = False

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.label_names)}

    @property
    def has_test(self) -> bool:
        return "test" in self.num_rows

    @property
    def eval_split(self) -> str:
        """Split for the final evaluation: ``test`` when the source has one, else ``validation``."""
        return "test" if self.has_test else "validation"


def load_image_dataset(
    dataset: str | os.PathLike,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    val_split: float = 0.1,
    max_train_samples_per_class: int | None = None,
    seed: int = 0,
    strict: bool = False,
    check_images: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[datasets.DatasetDict, DatasetInfo]:
    """Load an image-classification dataset as ``(DatasetDict(train, validation[, test]), DatasetInfo)``.

    ``check_images`` decodes every kept image once to find corrupt/truncated files (skipped with a warning, or a
    ``DataError`` when ``strict``); pass False for huge datasets, then a bad file fails later at decode time.
    ``max_train_samples_per_class`` keeps a seeded, class-balanced subset of train, after the validation carve.
    """
    import datasets

    if not 0.0 < val_split < 1.0:
        raise DataError(f"val_split must be in (0, 1), got {val_split}; e.g. --val_split 0.1")
    if max_train_samples_per_class is not None and max_train_samples_per_class < 1:
        raise DataError(
            f"max_train_samples_per_class must be >= 1, got {max_train_samples_per_class}; omit it to use all"
        )
    source = os.fspath(dataset)
    raw, is_folder = _load_raw(source, cache_dir)
    splits = _canonical_splits(raw, source)
    train = splits["train"]
    if train.num_rows == 0:
        raise DataError(f"dataset {source!r} has no training rows; point --dataset at a non-empty dataset")

    img_col = _find_image_column(train, image_column, source)
    lbl_col = _find_label_column(train, label_column, img_col, source, is_folder)
    for name in list(splits):
        ds = splits[name]
        missing = [c for c in (img_col, lbl_col) if c not in ds.column_names]
        if name != "train" and missing:
            logger.warning("dropping split %r of %s: it has no %s column", name, source, " / ".join(missing))
            del splits[name]
            continue
        splits[name] = _as_image_column(ds.select_columns([img_col, lbl_col]), img_col)

    splits, label_names = _to_class_labels(splits, lbl_col, source)
    if splits["train"].num_rows == 0:
        raise DataError(f"dataset {source!r} has no labeled training rows; label the train split")
    if len(label_names) < 2:
        found = f"only class {label_names[0]!r}" if label_names else "no classes"
        raise DataError(
            f"dataset {source!r} has {found} in column {lbl_col!r}; classification needs >= 2 classes: "
            f"add images of another class or pick another --label_column"
        )

    validation_from_train = "validation" not in splits
    if validation_from_train:
        labels = _labels(splits["train"], lbl_col)
        train_idx, val_idx = _stratified_split(labels, val_split, seed)
        if len(val_idx) == 0:
            raise DataError(
                f"train split of {source!r} is too small ({len(labels)} rows) to carve a validation split; "
                f"add images or provide a validation split"
            )
        full_train = splits["train"]
        splits["train"] = full_train.select(train_idx)
        splits["validation"] = full_train.select(val_idx)

    skipped: dict[str, int] = {}
    if max_train_samples_per_class is not None:
        splits["train"], skipped["train"] = _few_shot(
            splits["train"], img_col, lbl_col, max_train_samples_per_class, seed, strict, check_images
        )
    for name in ("train", "validation", "test"):
        if name in splits and name not in skipped:
            splits[name], skipped[name] = (
                _drop_unreadable(splits[name], img_col, name, strict) if check_images else (splits[name], 0)
            )
    bad = {k: v for k, v in skipped.items() if v}
    if bad:
        logger.warning(
            "skipped %d unreadable image(s) in %s (%s); pass strict=True to fail on the first one instead",
            sum(bad.values()),
            source,
            ", ".join(f"{k}: {v}" for k, v in bad.items()),
        )

    order = [s for s in ("train", "validation", "test") if s in splits]
    class_counts = {
        s: np.bincount(_labels(splits[s], lbl_col), minlength=len(label_names)).tolist() for s in order
    }
    if splits["train"].num_rows == 0:
        raise DataError(f"dataset {source!r} has no readable training images; check the image files")
    empty = [label_names[i] for i, n in enumerate(class_counts["train"]) if n == 0]
    if empty:
        shown = ", ".join(repr(e) for e in empty[:5]) + (
            f" (+{len(empty) - 5} more)" if len(empty) > 5 else ""
        )
        raise DataError(
            f"class(es) {shown} of {source!r} have no training images; add training images for them "
            f"or remove them from the labels"
        )
    if "test" not in splits:
        logger.warning("%s has no test split: final evaluation uses the validation split", source)

    info = DatasetInfo(
        source=source,
        image_column=img_col,
        label_column=lbl_col,
        label_names=list(label_names),
        num_rows={s: splits[s].num_rows for s in order},
        class_counts=class_counts,
        skipped_images={s: skipped.get(s, 0) for s in order},
        validation_from_train=validation_from_train,
    )
    return datasets.DatasetDict({s: splits[s] for s in order}), info


def _load_raw(source: str, cache_dir) -> tuple[Any, bool]:
    """DatasetDict (or Dataset) from a local path or the Hub; also says whether it is an image folder."""
    import datasets

    cache = None if cache_dir is None else os.fspath(cache_dir)
    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".arrow":
            return datasets.Dataset.from_file(str(path)), False
        if suffix == ".parquet":
            try:
                return datasets.load_dataset(
                    "parquet", data_files={"train": str(path)}, cache_dir=cache
                ), False
            except ValueError as err:  # e.g. 'Instruction "train" corresponds to no data!' for an empty file
                raise DataError(
                    f"could not read {source!r} ({_first_line(err)}); pass a non-empty parquet file"
                ) from err
        raise DataError(
            f"unsupported dataset file {source!r}; pass a .parquet or .arrow file, a save_to_disk folder, "
            f"or an image folder: {_FOLDER_HINT}"
        )
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            try:
                return datasets.load_from_disk(str(path)), False
            except Exception as err:  # datasets fails with IndexError/KeyError... on empty or partial folders
                raise DataError(
                    f"could not read save_to_disk folder {source!r} ({type(err).__name__}: {_first_line(err)}); "
                    f"it may be empty or incomplete: save the dataset again"
                ) from err
        folder = _scan_image_folder(path, source)
        if folder is not None:
            return folder, True
        if not any(p.suffix.lower() in _DATA_EXTENSIONS for p in _walk_files(path, limit=10000)):
            raise DataError(
                f"no images or data files found in {source!r}; use {_FOLDER_HINT}, "
                f"train.parquet/test.parquet files, or a save_to_disk folder"
            )
        try:  # parquet / arrow files named by split (train.parquet, test.parquet, data/train-0000.parquet...)
            return datasets.load_dataset(str(path), cache_dir=cache), False
        except (datasets.exceptions.DataFilesNotFoundError, FileNotFoundError, ValueError) as err:
            raise DataError(
                f"could not read data files in {source!r} ({_first_line(err)}); use {_FOLDER_HINT}, "
                f"train.parquet/test.parquet files, or a save_to_disk folder"
            ) from err
    if not _HUB_ID.match(source) or source.startswith((".", "~")):
        raise DataError(
            f"dataset path {source!r} does not exist; pass an existing path ({_FOLDER_HINT}) or a Hub dataset id"
        )
    try:
        return datasets.load_dataset(source, cache_dir=cache), False
    except ConnectionError as err:
        raise DataError(
            f"cannot reach the Hugging Face Hub for dataset {source!r} (offline? {_first_line(err)}); download it "
            f"once while online, or use a local image folder: {_FOLDER_HINT}"
        ) from err
    except datasets.exceptions.DatasetNotFoundError as err:
        raise DataError(
            f"dataset {source!r} was not found on the Hugging Face Hub nor as a local path; check the id, "
            f"or use a local image folder: {_FOLDER_HINT}"
        ) from err


def _walk_files(root: Path, limit: int):
    n = 0
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if f.startswith("."):
                continue
            yield Path(dirpath) / f
            n += 1
            if n >= limit:
                return


def _scan_image_folder(root: Path, source: str):
    """``root/<split>/<class>/**/*.jpg`` (or ``root/<class>/...`` = train only) as a DatasetDict, else None.

    Same layout and labels (sorted class-folder names) as the datasets ``imagefolder`` builder, but a plain
    directory walk: the builder's pattern resolution took seconds per few thousand files.
    """
    import datasets

    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    split_dirs = {}
    for d in subdirs:
        canon = _SPLIT_ALIASES.get(d.name.lower(), d.name.lower())
        if canon in ("train", "test", "validation") and canon not in split_dirs:
            split_dirs[canon] = d
    if not split_dirs:
        split_dirs = {"train": root}
    elif "train" not in split_dirs:
        if not _has_images(root):
            return None
        raise DataError(
            f"image folder {source!r} has {', '.join(d.name for d in split_dirs.values())}/ but no train/; "
            f"use {_FOLDER_HINT}"
        )
    per_split: dict[str, list[tuple[str, str]]] = {}
    loose: dict[str, int] = {}
    for split, split_dir in split_dirs.items():
        rows, loose[split] = [], 0
        for f in _walk_files(split_dir, limit=10**9):
            if f.suffix.lower() not in _IMAGE_EXTENSIONS:
                continue
            rel = f.relative_to(split_dir).parts
            if len(rel) < 2:
                loose[split] += 1
                continue
            rows.append((str(f), rel[0]))
        per_split[split] = rows
    if not any(per_split.values()):
        if any(loose.values()):
            raise DataError(f"images in {source!r} are not in class folders; use {_FOLDER_HINT}")
        return None
    for split, n in loose.items():
        if n:
            logger.warning("ignoring %d image(s) directly in %s/%s: not in a class folder", n, source, split)
    names = sorted({label for rows in per_split.values() for _, label in rows})
    index = {name: i for i, name in enumerate(names)}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {"image": [p for p, _ in rows], "label": [index[c] for _, c in rows]}, features=features
            )
            for split, rows in per_split.items()
        }
    )


def _has_images(root: Path) -> bool:
    return any(p.suffix.lower() in _IMAGE_EXTENSIONS for p in _walk_files(root, limit=10000))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _canonical_splits(raw, source: str) -> dict:
    """``{train, validation?, test?}`` from whatever splits the source has; other splits are dropped."""
    import datasets

    if isinstance(raw, datasets.Dataset):
        return {"train": raw}
    splits: dict = {}
    for name, ds in raw.items():
        canon = _SPLIT_ALIASES.get(name.lower(), name.lower())
        if canon in ("train", "validation", "test") and canon not in splits:
            splits[canon] = ds
        else:
            logger.info("ignoring split %r of %s", name, source)
    if "train" not in splits:
        raise DataError(
            f"dataset {source!r} has no 'train' split (found: {', '.join(raw.keys()) or 'none'}); "
            f"name the training data train/ (image folder) or train.parquet"
        )
    return splits


def _looks_like_image(value: Any) -> bool:
    import PIL.Image

    if isinstance(value, PIL.Image.Image):
        return True
    if isinstance(value, dict):
        return set(value) >= {"bytes", "path"} and (value["bytes"] is not None or value["path"] is not None)
    if isinstance(value, (bytes, bytearray)):
        return True
    return isinstance(value, str) and value.lower().endswith(_IMAGE_EXTENSIONS)


def _first_value(ds, column: str) -> Any:
    arrow = ds.select_columns([column]).with_format("arrow")
    for start in range(0, min(ds.num_rows, 1000), 100):
        for value in arrow[start : start + 100][column].to_pylist():
            if value is not None:
                return value
    return None


def _find_image_column(ds, override: str | None, source: str) -> str:
    import datasets

    columns = ds.column_names
    if override is not None:
        if override not in columns:
            raise DataError(
                f"--image_column {override!r} not found in {source!r}; available columns: {', '.join(columns)}"
            )
        if not isinstance(ds.features[override], datasets.Image) and not _looks_like_image(
            _first_value(ds, override)
        ):
            raise DataError(
                f"--image_column {override!r} of {source!r} does not hold images "
                f"({ds.features[override]}); pick one of: {', '.join(columns)}"
            )
        return override
    found = [c for c in columns if isinstance(ds.features[c], datasets.Image)]
    if not found:
        found = [
            c
            for c in columns
            if isinstance(ds.features[c], (datasets.Value, dict)) and _looks_like_image(_first_value(ds, c))
        ]
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataError(
            f"no image column found in {source!r} (columns: {', '.join(columns)}); pass --image_column NAME"
        )
    raise DataError(
        f"ambiguous image column in {source!r}: {', '.join(found)}; choose one with --image_column {found[0]}"
    )


def _find_label_column(ds, override: str | None, image_column: str, source: str, is_folder: bool) -> str:
    import datasets

    columns = [c for c in ds.column_names if c != image_column]
    if override is not None:
        if override not in ds.column_names or override == image_column:
            raise DataError(
                f"--label_column {override!r} not found in {source!r}; available columns: {', '.join(columns)}"
            )
        return override
    found = [c for c in columns if isinstance(ds.features[c], datasets.ClassLabel)]
    if not found:
        found = [c for c in columns if c.lower() in _LABEL_NAMES or c.lower().endswith(("_label", "_labels"))]
    if len(found) == 1:
        return found[0]
    if not found:
        hint = f"put images in class folders: {_FOLDER_HINT}" if is_folder else "pass --label_column NAME"
        raise DataError(
            f"no label column found in {source!r} (columns: {', '.join(columns) or 'none'}); {hint}"
        )
    raise DataError(
        f"ambiguous label column in {source!r}: {', '.join(found)}; choose one with --label_column {found[0]}"
    )


def _as_image_column(ds, column: str):
    """Cast a column of paths / bytes / {bytes, path} structs to ``datasets.Image`` (no-op if it is one)."""
    import datasets

    if isinstance(ds.features[column], datasets.Image):
        return ds
    return ds.cast_column(column, datasets.Image())


def _labels(ds, column: str) -> np.ndarray:
    """Integer labels of ``ds`` as numpy (nulls become -1), read straight from arrow."""
    import pyarrow.compute as pc

    values = ds.select_columns([column]).with_format("arrow")[:][column]
    return np.asarray(pc.fill_null(values, -1).to_numpy(), dtype=np.int64)


def _to_class_labels(splits: dict, column: str, source: str) -> tuple[dict, list[str]]:
    """Make ``column`` a contiguous ``ClassLabel`` in every split; drop unlabeled rows (None or -1)."""
    import datasets

    feature = splits["train"].features[column]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        for name, ds in list(splits.items()):
            if not isinstance(ds.features[column], datasets.ClassLabel) or ds.features[column].names != names:
                raise DataError(
                    f"split {name!r} of {source!r} has different class names than train; "
                    f"make all splits use the same classes"
                )
    else:
        if not isinstance(feature, datasets.Value):
            raise DataError(
                f"label column {column!r} of {source!r} has type {feature}; classification needs one int or "
                f"string label per image (pick another --label_column)"
            )
        dtype = feature.dtype
        is_string = dtype in ("string", "large_string")
        if not (is_string or dtype == "bool" or dtype.startswith(("int", "uint", "float"))):
            raise DataError(
                f"label column {column!r} of {source!r} has dtype {dtype}; classification needs int or string "
                f"labels (pick another --label_column)"
            )
        values = set()
        for ds in splits.values():
            values.update(v for v in ds.unique(column) if v is not None)
        if not values:
            raise DataError(f"label column {column!r} of {source!r} is empty; pass a labeled dataset")
        if dtype.startswith("float") and not all(float(v).is_integer() for v in values):
            raise DataError(
                f"label column {column!r} of {source!r} holds non-integer floats; classification needs int or "
                f"string class labels (pick another --label_column)"
            )
        key = str if is_string else int
        ordered = sorted({key(v) for v in values})  # ints sort numerically, strings alphabetically
        names = [str(v) for v in ordered]
        index = {v: i for i, v in enumerate(ordered)}
        class_label = datasets.ClassLabel(names=names)
        for name, ds in list(splits.items()):
            raw = ds.select_columns([column]).with_format("arrow")[:][column].to_pylist()
            ids = np.array([-1 if v is None else index[key(v)] for v in raw], dtype=np.int64)
            splits[name] = ds.remove_columns(column).add_column(column, ids, feature=class_label)
    for name, ds in list(splits.items()):
        labels = _labels(ds, column)
        unlabeled = int(np.sum(labels < 0))
        if unlabeled == len(labels) and name != "train":
            logger.warning("dropping split %r of %s: it has no labels", name, source)
            del splits[name]
        elif unlabeled:
            logger.warning(
                "dropping %d unlabeled row(s) (label -1) from split %r of %s", unlabeled, name, source
            )
            splits[name] = ds.select(np.flatnonzero(labels >= 0))
    return splits, names


def _stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split; largest-remainder allocation keeps >= 1 training row for every class."""
    rng = np.random.default_rng([seed, 0])
    classes, counts = np.unique(labels, return_counts=True)
    total = int(round(len(labels) * fraction))
    exact = counts * fraction
    take = np.minimum(np.floor(exact).astype(int), counts - 1)
    room = counts - 1 - take
    for i in np.argsort(-(exact - take), kind="stable"):
        if take.sum() >= total:
            break
        if room[i] > 0:
            take[i] += 1
            room[i] -= 1
    val = []
    for c, k in zip(classes, take):
        idx = np.flatnonzero(labels == c)
        val.append(rng.permutation(idx)[:k])
    val_idx = np.sort(np.concatenate(val)) if val else np.array([], dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


def _image_error(value: Any) -> str | None:
    """None if ``value`` decodes to a full image, else the decoder's complaint."""
    import datasets

    try:
        datasets.Image().decode_example(value)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        return f"{type(err).__name__}: {_first_line(err)}"
    return None


def _describe(value: Any, split: str, index: int) -> str:
    path = value.get("path") if isinstance(value, dict) else None
    return f"split {split!r} index {index}" + (f" ({path})" if path else "")


def _drop_unreadable(ds, column: str, split: str, strict: bool):
    """Decode every image once; drop those that fail (or raise on the first one when ``strict``)."""
    arrow = ds.select_columns([column]).with_format("arrow")
    bad: list[int] = []
    for start in range(0, ds.num_rows, 512):
        for offset, value in enumerate(arrow[start : start + 512][column].to_pylist()):
            error = None if value is not None else "no image"
            error = error or _image_error(value)
            if error:
                index = start + offset
                if strict:
                    raise DataError(
                        f"unreadable image at {_describe(value, split, index)}: {error}; fix or delete the file, "
                        f"or drop strict to skip bad images"
                    )
                bad.append(index)
    if not bad:
        return ds, 0
    return ds.select(np.setdiff1d(np.arange(ds.num_rows), bad)), len(bad)


def _few_shot(ds, img_col: str, lbl_col: str, k: int, seed: int, strict: bool, check: bool):
    """Seeded ``k`` per class; an unreadable pick is replaced by the next candidate of its class."""
    rng = np.random.default_rng([seed, 1])
    labels = _labels(ds, lbl_col)
    arrow = ds.select_columns([img_col]).with_format("arrow")
    keep: list[int] = []
    skipped = 0
    for c in np.unique(labels):
        taken = 0
        for index in rng.permutation(np.flatnonzero(labels == c)):
            if taken == k:
                break
            if check:
                value = arrow[int(index)][img_col][0].as_py()
                error = "no image" if value is None else _image_error(value)
                if error:
                    if strict:
                        raise DataError(
                            f"unreadable image at {_describe(value, 'train', int(index))}: {error}; fix or delete "
                            f"the file, or drop strict to skip bad images"
                        )
                    skipped += 1
                    continue
            keep.append(int(index))
            taken += 1
    return ds.select(sorted(keep)), skipped


# --------------------------------------------------------------------------------------------------------------
# Preprocessing config
# --------------------------------------------------------------------------------------------------------------

_PIL_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_PIL_RESAMPLE = {name: code for code, name in _PIL_RESAMPLE_NAMES.items()}


@dataclass(frozen=True)
class PreprocessConfig:
    """A model's eval preprocessing, in timm's vocabulary.

    ``crop_mode="center"``: resize the shorter side to ``size / crop_pct`` then center-crop ``size`` (timm's
    default eval transform). ``crop_mode="squash"``: resize both sides to ``size / crop_pct`` (aspect not kept),
    then center-crop (ViT-style HF processors with ``crop_pct=1``). ``mean``/``std`` apply to ``[0, 1]`` pixels.
    """

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        channels = self.input_size[0]
        if len(self.input_size) != 3 or channels not in (1, 3) or min(self.input_size[1:]) < 1:
            raise ValueError(f"input_size must be (1 or 3, H, W), got {self.input_size}")
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean/std need {channels} values for input_size {self.input_size}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.crop_mode not in ("center", "squash"):
            raise ValueError(f"crop_mode must be 'center' or 'squash', got {self.crop_mode!r}")
        from torchvision.transforms import InterpolationMode

        try:
            InterpolationMode(self.interpolation)
        except ValueError:
            raise ValueError(
                f"unknown interpolation {self.interpolation!r}; use bilinear, bicubic, ..."
            ) from None

    @property
    def image_size(self) -> tuple[int, int]:
        return self.input_size[1], self.input_size[2]

    @property
    def resize_size(self) -> tuple[int, int]:
        """Size before the center crop (timm: ``floor(size / crop_pct)``, robust to float round-off)."""
        return tuple(_scale(x, self.crop_pct) for x in self.image_size)

    def with_overrides(self, image_size: int | Sequence[int] | None = None, crop_pct: float | None = None):
        """A copy with another output size (e.g. 64 px for fast CPU runs) and/or crop_pct."""
        cfg = self
        if image_size is not None:
            h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
            cfg = replace(cfg, input_size=(self.input_size[0], h, w))
        if crop_pct is not None:
            cfg = replace(cfg, crop_pct=crop_pct)
        return cfg

    @classmethod
    def from_data_config(cls, data_config: dict, **overrides) -> PreprocessConfig:
        """From a timm data config dict (``resolve_data_config`` output)."""
        crop_mode = data_config.get("crop_mode") or "center"
        if crop_mode not in ("center", "squash"):
            logger.warning("timm crop_mode %r is not supported; using 'center'", crop_mode)
            crop_mode = "center"
        interpolation = data_config.get("interpolation") or "bicubic"
        cfg = cls(
            input_size=tuple(data_config["input_size"]),
            mean=tuple(data_config.get("mean", IMAGENET_DEFAULT_MEAN)),
            std=tuple(data_config.get("std", IMAGENET_DEFAULT_STD)),
            interpolation="bicubic" if interpolation == "random" else interpolation,
            crop_pct=float(data_config.get("crop_pct") or 0.875),
            crop_mode=crop_mode,
        )
        return cfg.with_overrides(**overrides)

    @classmethod
    def from_timm(
        cls,
        model: torch.nn.Module,
        *,
        image_size: int | Sequence[int] | None = None,
        crop_pct: float | None = None,
    ) -> PreprocessConfig:
        """The timm model's pretrained eval preprocessing (``timm.data.resolve_model_data_config``)."""
        import timm.data

        data_config = timm.data.resolve_model_data_config(model)
        return cls.from_data_config(data_config, image_size=image_size, crop_pct=crop_pct)

    @classmethod
    def from_hf(
        cls,
        image_processor: Any,
        *,
        image_size: int | Sequence[int] | None = None,
        crop_pct: float | None = None,
    ) -> PreprocessConfig:
        """From a transformers image processor (ViT, ConvNeXt, CLIP, DeiT, TimmWrapper, ...), read generically.

        ``size`` as ``height``/``width`` means a squash resize; ``shortest_edge`` a shorter-side resize (ConvNeXt's
        ``crop_pct`` rule included); ``crop_size`` is used when ``do_center_crop``; rescale factor/offset and
        ``do_normalize`` are folded into mean/std. Model-specific quirks beyond these rules are approximated.
        """
        data_config = getattr(image_processor, "data_config", None)
        if isinstance(data_config, dict) and "input_size" in data_config:  # TimmWrapperImageProcessor
            return cls.from_data_config(data_config, image_size=image_size, crop_pct=crop_pct)

        name = type(image_processor).__name__
        size = getattr(image_processor, "size", None)
        height, width = _size_field(size, "height"), _size_field(size, "width")
        shortest = _size_field(size, "shortest_edge")
        if isinstance(size, int):
            height = width = size
        longest = _size_field(size, "longest_edge")
        crop = (
            getattr(image_processor, "crop_size", None)
            if getattr(image_processor, "do_center_crop", False)
            else None
        )
        crop_hw = None
        if isinstance(crop, int):
            crop_hw = (crop, crop)
        elif crop is not None and _size_field(crop, "height") and _size_field(crop, "width"):
            crop_hw = (_size_field(crop, "height"), _size_field(crop, "width"))
        proc_crop_pct = getattr(image_processor, "crop_pct", None)

        if height and width:
            out = crop_hw or (height, width)
            mode, pct = "squash", out[0] / height
        elif shortest:
            if (
                proc_crop_pct and not crop_hw and shortest >= 384
            ):  # ConvNeXt: large sizes are warped, not cropped
                out, mode, pct = (shortest, shortest), "squash", 1.0
            elif proc_crop_pct:  # ConvNeXt / PoolFormer: shorter side to int(shortest / crop_pct), then crop
                out = crop_hw or (shortest, shortest)
                mode, pct = "center", out[0] / int(shortest / proc_crop_pct)
            else:  # CLIP / MobileNet: shorter side to shortest_edge, then crop (square when no crop size)
                out = crop_hw or (shortest, shortest)
                mode, pct = "center", out[0] / shortest
        elif longest:
            out, mode, pct = (longest, longest), "squash", 1.0
        else:
            raise ValueError(f"cannot read an input size from {name}.size={size!r}; pass image_size=")
        pct = min(pct, 1.0)

        factor = (
            float(getattr(image_processor, "rescale_factor", 1 / 255))
            if getattr(image_processor, "do_rescale", True)
            else 1.0
        )
        offset = 1.0 if getattr(image_processor, "rescale_offset", False) else 0.0
        if getattr(image_processor, "do_normalize", True):
            mean = getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
            std = getattr(image_processor, "image_std", None) or (0.5, 0.5, 0.5)
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        if isinstance(mean, (int, float)):
            mean = (mean,) * 3
        if isinstance(std, (int, float)):
            std = (std,) * 3
        if getattr(image_processor, "include_top", False) and getattr(image_processor, "do_normalize", True):
            std = tuple(s * s for s in std)  # EfficientNet divides by std a second time
        # model input = ((255 * factor) * u - offset - mean) / std  with u in [0, 1]  =>  (u - m') / s'
        scale = 255.0 * factor
        cfg = cls(
            input_size=(len(mean), int(out[0]), int(out[1])),
            mean=tuple((offset + m) / scale for m in mean),
            std=tuple(s / scale for s in std),
            interpolation=_resample_name(getattr(image_processor, "resample", None)),
            crop_pct=pct,
            crop_mode=mode,
        )
        return cfg.with_overrides(image_size=image_size, crop_pct=crop_pct)


def _scale(x: int, crop_pct: float) -> int:
    value = x / crop_pct
    nearest = round(value)
    return int(nearest) if abs(value - nearest) < 1e-6 else math.floor(value)


def _size_field(size: Any, key: str) -> int | None:
    if size is None or isinstance(size, int):
        return None
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def _resample_name(resample: Any) -> str:
    if resample is None:
        return "bilinear"
    value = getattr(resample, "value", resample)
    if isinstance(value, str):
        return value
    return _PIL_RESAMPLE_NAMES.get(int(value), "bilinear")


# --------------------------------------------------------------------------------------------------------------
# Decode once
# --------------------------------------------------------------------------------------------------------------


def _decode_resize(value: Any, cfg: PreprocessConfig) -> np.ndarray:
    """One stored image -> (H, W, C) uint8 with the eval transform: RGB (or L), resize, center crop.

    Matches timm's eval transform (torchvision ``Resize`` + ``CenterCrop`` on PIL images) but calls PIL directly,
    and resizes grayscale images before expanding them to RGB (3x less work, same pixels).
    """
    import datasets
    import PIL.Image

    img = value if isinstance(value, PIL.Image.Image) else datasets.Image().decode_example(value)
    mode = "RGB" if cfg.input_size[0] == 3 else "L"
    if img.mode not in (mode, "L"):
        if img.mode == "P" or (img.mode in ("LA", "PA") and mode == "RGB"):
            img = img.convert("RGBA")  # keep palette transparency handling out of the RGB conversion
        img = img.convert(mode)
    w, h = img.size
    rh, rw = cfg.resize_size
    if cfg.crop_mode == "squash":
        new_h, new_w = rh, rw
    elif rh == rw:  # shorter side to rh, the longer one scaled like torchvision's Resize(int)
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = rh, int(rh * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    else:  # non-square target: scale so both sides cover it, keeping the aspect ratio (timm ResizeKeepRatio)
        ratio = min(h / rh, w / rw)
        new_h, new_w = round(h / ratio), round(w / ratio)
    if (new_h, new_w) != (h, w):
        img = img.resize((new_w, new_h), _PIL_RESAMPLE[cfg.interpolation])
    ch, cw = cfg.image_size
    if new_h < ch or new_w < cw:
        import torchvision.transforms.functional as TF

        img = TF.center_crop(img, [ch, cw])  # pads with zeros, as torchvision does
    else:
        top, left = int(round((new_h - ch) / 2.0)), int(round((new_w - cw) / 2.0))
        img = img.crop((left, top, left + cw, top + ch))
    if img.mode != mode:
        img = img.convert(mode)
    # tobytes + frombuffer: half the cost of np.array(img) for small images; bytearray keeps it writable
    return np.frombuffer(bytearray(img.tobytes()), dtype=np.uint8).reshape(img.size[1], img.size[0], -1)


class TrainSample(tuple):
    """An ``(image, label)`` item from a ``train=True`` dataset; lets ``HFImageCollator`` augment only these."""

    __slots__ = ()


class _ItemMixin:
    train: bool

    def _item(self, image: torch.Tensor, label: int):
        return TrainSample((image, label)) if self.train else (image, label)


class DecodedImageDataset(_ItemMixin, torch.utils.data.Dataset):
    """Pre-decoded images: uint8 ``(N, C, H, W)`` + labels; items are ``(uint8 (C, H, W), int)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | Sequence[int], *, train: bool = False):
        labels = (
            labels.long()
            if isinstance(labels, torch.Tensor)
            else torch.tensor(np.asarray(labels), dtype=torch.long)
        )
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"need uint8 images (N, C, H, W) and N labels, got {tuple(images.shape)} {images.dtype} "
                f"and {tuple(labels.shape)}"
            )
        self.images, self.labels, self.train = images, labels, train

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        return self._item(self.images[index], int(self.labels[index]))


class LazyImageDataset(_ItemMixin, torch.utils.data.Dataset):
    """Same items as ``DecodedImageDataset`` but decoded on access (for datasets too big to cache)."""

    def __init__(
        self, ds, image_column: str, label_column: str | None, cfg: PreprocessConfig, *, train: bool = False
    ):
        columns = [image_column] + ([label_column] if label_column else [])
        self._arrow = ds.select_columns(columns).with_format("arrow")
        self.image_column, self.label_column, self.cfg, self.train = image_column, label_column, cfg, train

    def __len__(self) -> int:
        return self._arrow.num_rows

    def _items(self, table, indices: Sequence[int]) -> list:
        labels = table[self.label_column].to_pylist() if self.label_column else [-1] * table.num_rows
        items = []
        for index, value, label in zip(indices, table[self.image_column].to_pylist(), labels):
            try:
                array = _decode_resize(value, self.cfg)
            except Exception as err:  # name the row: PIL's own message does not say which file
                where = value.get("path") if isinstance(value, dict) and value.get("path") else f"row {index}"
                raise DataError(
                    f"cannot decode image {where} ({type(err).__name__}: {_first_line(err)}); load the dataset "
                    f"with check_images=True to skip unreadable images"
                ) from err
            items.append(self._item(torch.from_numpy(array).permute(2, 0, 1).contiguous(), label))
        return items

    def __getitem__(self, index: int):
        index = int(index)
        return self._items(self._arrow[index : index + 1], [index])[0]

    def __getitems__(self, indices: list[int]) -> list:
        """Batched arrow read for DataLoader (fetches a whole batch at once)."""
        return self._items(self._arrow[list(indices)], indices)


def _stack_uint8(items: list) -> torch.Tensor:
    return torch.stack([image for image, _ in items])


def _default_workers(n: int) -> int:
    return 0 if n < 2048 else min(8, os.cpu_count() or 1)


def decode_images(
    ds, image_column: str, cfg: PreprocessConfig, *, num_workers: int | None = None, batch_size: int = 256
) -> torch.Tensor:
    """Decode + resize + center-crop every image of ``ds`` once: uint8 ``(N, C, H, W)``, the eval transform.

    ``num_workers`` > 0 decodes in DataLoader worker processes (default: 0 for small sets, else up to 8).
    """
    lazy = LazyImageDataset(ds, image_column, None, cfg)
    n = len(lazy)
    out = torch.empty((n, *cfg.input_size), dtype=torch.uint8)
    workers = _default_workers(n) if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(
        lazy, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_stack_uint8
    )
    start = 0
    for batch in loader:
        out[start : start + batch.shape[0]] = batch
        start += batch.shape[0]
    return out


def make_image_dataset(
    ds,
    info: DatasetInfo,
    cfg: PreprocessConfig,
    *,
    train: bool = False,
    max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
    num_workers: int | None = None,
) -> DecodedImageDataset | LazyImageDataset:
    """Torch dataset for one split: decoded once into memory when it fits ``max_cache_bytes``, else lazy.

    ``train=True`` marks items so ``HFImageCollator`` augments them; the timm loop passes ``train`` to
    ``BatchTransform`` itself.
    """
    need = ds.num_rows * math.prod(cfg.input_size)
    if need > max_cache_bytes:
        logger.warning(
            "image cache for %d images at %s would take %.1f GiB > max_cache_bytes %.1f GiB: decoding lazily "
            "per item instead (slower; lower image_size or raise max_cache_bytes)",
            ds.num_rows,
            "x".join(map(str, cfg.input_size)),
            need / 1024**3,
            max_cache_bytes / 1024**3,
        )
        return LazyImageDataset(ds, info.image_column, info.label_column, cfg, train=train)
    images = decode_images(ds, info.image_column, cfg, num_workers=num_workers)
    return DecodedImageDataset(images, _labels(ds, info.label_column), train=train)


# --------------------------------------------------------------------------------------------------------------
# Per-batch transform
# --------------------------------------------------------------------------------------------------------------


class BatchTransform:
    """uint8 ``(B, C, H, W)`` batch -> normalized float, with light augmentation when ``train``.

    Train-time augmentation, per sample, in ONE bilinear ``grid_sample`` on whatever device the batch is on:
    a random crop covering ``scale`` of the image area with aspect ratio in ``ratio`` (kept inside the image),
    resized back to full size, and a horizontal flip with probability ``hflip`` (``hflip=0`` for digits, text and
    other orientation-sensitive classes). ``scale=(1, 1)`` disables the crop (flip only, exact). Randomness comes from a private ``torch.Generator`` (CPU) seeded with ``seed``, so a
    run is reproducible on any device; inside DataLoader workers it is re-seeded from the worker seed.
    """

    def __init__(
        self,
        cfg: PreprocessConfig,
        *,
        train: bool = False,
        hflip: float = 0.5,
        scale: tuple[float, float] = (0.6, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        channels_last: bool = False,
        seed: int | None = 0,
    ):
        if not (0.0 < scale[0] <= scale[1] <= 1.0) or not (0.0 < ratio[0] <= ratio[1]) or not 0 <= hflip <= 1:
            raise ValueError(
                f"need 0 < scale <= 1, ratio > 0, 0 <= hflip <= 1; got {scale}, {ratio}, {hflip}"
            )
        self.cfg, self.train, self.hflip, self.scale, self.ratio = cfg, train, hflip, scale, ratio
        self.channels_last = channels_last
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self._worker: int | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["generator"] = self.generator.get_state()
        return state

    def __setstate__(self, state: dict) -> None:
        generator = torch.Generator()
        generator.set_state(state.pop("generator"))
        self.__dict__.update(state, generator=generator)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != self.cfg.input_size[0]:
            raise ValueError(
                f"expected a (B, {self.cfg.input_size[0]}, H, W) batch, got {tuple(images.shape)}"
            )
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if self.train:
            x = self._augment(x)
        mean = torch.tensor(self.cfg.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.cfg.std, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        info = torch.utils.data.get_worker_info()
        if info is not None and self._worker != info.id:
            self._worker = info.id
            self.generator.manual_seed(info.seed)
        b = x.shape[0]
        g = self.generator
        flip = torch.rand(b, generator=g) < self.hflip
        if self.scale == (1.0, 1.0):
            return torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
        area = torch.empty(b).uniform_(self.scale[0], self.scale[1], generator=g)
        log_ratio = torch.empty(b).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]), generator=g)
        aspect = torch.exp(log_ratio)
        w = torch.sqrt(area * aspect).clamp(max=1.0)  # crop width/height as fractions of the image
        h = torch.sqrt(area / aspect).clamp(max=1.0)
        tx = (torch.rand(b, generator=g) * 2 - 1) * (
            1 - w
        )  # crop center in [-1, 1] coords, crop stays inside
        ty = (torch.rand(b, generator=g) * 2 - 1) * (1 - h)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = torch.where(flip, -w, w)
        theta[:, 0, 2] = tx
        theta[:, 1, 1] = h
        theta[:, 1, 2] = ty
        grid = torch.nn.functional.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
        return torch.nn.functional.grid_sample(
            x, grid, mode="bilinear", padding_mode="border", align_corners=False
        )


class HFImageCollator:
    """``Trainer(data_collator=...)``: items -> ``{"pixel_values": float, "labels": long}``.

    ``Trainer`` has one collator for training and evaluation, so the batch picks the transform: items of a
    ``train=True`` dataset (``TrainSample``) get ``train_transform``; others get the eval transform (same
    config, no augmentation). Items are tuples, so ``Trainer``'s column removal leaves them alone and
    ``remove_unused_columns=False`` is not needed.
    """

    def __init__(self, train_transform: BatchTransform, eval_transform: BatchTransform | None = None):
        self.train_transform = train_transform
        self.eval_transform = eval_transform or BatchTransform(
            train_transform.cfg, train=False, channels_last=train_transform.channels_last
        )

    def __call__(self, items: list) -> dict[str, torch.Tensor]:
        images = torch.stack([item[0] for item in items])
        labels = torch.tensor([int(item[1]) for item in items], dtype=torch.long)
        train = all(isinstance(item, TrainSample) for item in items)
        transform = self.train_transform if train else self.eval_transform
        if train and not transform.train:
            logger.debug("train batch with an eval transform: no augmentation")
        return {"pixel_values": transform(images), "labels": labels}
