"""Fashion-MNIST without the network: the full Debian copy when installed, else a bundled subset.

The package ships a class-balanced subset (100 train + 100 test images per class, picked by a fixed
hash ranking) as ``train.parquet``/``test.parquet`` under :data:`BUNDLED_DIR`, written by ``datasets``
so ``datasets.load_dataset("parquet", data_files=...)`` restores the ``ClassLabel`` names. The full set
(``apt-get install dataset-fashion-mnist``) is read straight from its IDX files.
Rebuild the subset with ``python scripts/build_fashion_mnist_subset.py``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict, Features

__all__ = [
    "BUNDLED_DIR",
    "CLASS_NAMES",
    "FULL_DIR",
    "HUB_ID",
    "PER_CLASS",
    "SUBSET_SEED",
    "features",
    "few_shot_split",
    "full_available",
    "load_bundled",
    "load_full",
    "read_idx",
    "select_subset_indices",
    "write_subset",
]

logger = logging.getLogger(__name__)

BUNDLED_DIR: Path = Path(__file__).resolve().parent / "assets" / "fashion_mnist"
FULL_DIR: Path = Path("/usr/share/datasets/fashion-mnist")
HUB_ID = "zalando-datasets/fashion_mnist"
CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: Bundled subset: images per class and split, and the seed of the hash ranking that picks them.
PER_CLASS = 100
SUBSET_SEED = 2020

_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/ file format).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_INSTALL_HINT = (
    f"install it with `apt-get install dataset-fashion-mnist`, or load the Hub copy with "
    f"datasets.load_dataset({HUB_ID!r})"
)


def features() -> Features:
    """The ``datasets.Features`` shared by the bundled and the full set: PNG ``image``, named ``label``."""
    from datasets import ClassLabel, Features, Image

    return Features({"image": Image(), "label": ClassLabel(names=list(CLASS_NAMES))})


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain) into an array of its declared dtype and shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic {data[:4].hex()}); pass an *-ubyte(.gz) file")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data[4:header], dtype=">u4"))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(shape) != ndim or len(data) != expected:
        raise ValueError(
            f"{path}: IDX header says {expected} bytes, file has {len(data)}; the file is truncated"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_path(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"Fashion-MNIST file {stem}(.gz) not found under {root}: {_INSTALL_HINT}")


def full_available(root: str | Path = FULL_DIR) -> bool:
    """Whether the full Fashion-MNIST IDX files are present under ``root``."""
    root = Path(root)
    return all(
        any((root / f"{stem}{ext}").is_file() for ext in (".gz", ""))
        for pair in _SPLIT_FILES.values()
        for stem in pair
    )


def _read_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_stem, labels_stem = _SPLIT_FILES[split]
    images = read_idx(_idx_path(root, images_stem))
    labels = read_idx(_idx_path(root, labels_stem))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{root}: {split} images {images.shape} and labels {labels.shape} do not match; reinstall the data"
        )
    return images, labels


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _to_dataset(images: np.ndarray, labels: np.ndarray, description: str = "") -> Dataset:
    from datasets import Dataset, DatasetInfo

    feats = features()
    return Dataset.from_dict(
        {
            "image": [{"bytes": _png(img), "path": None} for img in images],
            "label": [int(x) for x in labels],
        },
        features=feats,
        info=DatasetInfo(description=description, features=feats),
    )


def load_full(root: str | Path = FULL_DIR) -> DatasetDict:
    """The full Fashion-MNIST (train 60k / test 10k) as a ``DatasetDict`` with the bundled features."""
    from datasets import DatasetDict

    root = Path(root)
    if not full_available(root):
        raise FileNotFoundError(f"Full Fashion-MNIST not found under {root}: {_INSTALL_HINT}")
    out = {}
    for split in _SPLIT_FILES:
        images, labels = _read_split(root, split)
        out[split] = _to_dataset(images, labels, f"Fashion-MNIST {split} (full, from {root})")
    return DatasetDict(out)


def load_bundled(directory: str | Path = BUNDLED_DIR) -> DatasetDict:
    """The bundled 1000/1000 class-balanced subset as a ``DatasetDict`` (``image``, ``label``)."""
    from datasets import load_dataset

    directory = Path(directory)
    files = {split: directory / f"{split}.parquet" for split in _SPLIT_FILES}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Bundled Fashion-MNIST missing ({', '.join(missing)}): reinstall rifle-hf or rebuild with "
            "`python scripts/build_fashion_mnist_subset.py`"
        )
    return load_dataset("parquet", data_files={k: str(v) for k, v in files.items()})


def _rank_key(seed: int, split: str, index: int) -> bytes:
    return hashlib.sha256(f"fashion-mnist:{seed}:{split}:{index}".encode()).digest()


def _pick_per_class(
    labels: np.ndarray, counts: Sequence[int], seed: int, split: str, candidates: np.ndarray | None = None
) -> np.ndarray:
    """For each class c, the ``counts[c]`` candidate indices with the smallest seeded SHA-256 rank.

    Why hashes rather than ``np.random``: the pick depends on nothing but (seed, split, index), so it is
    the same on every NumPy version and platform, and it is easy to state in the README.
    """
    candidates = np.arange(len(labels)) if candidates is None else np.asarray(candidates)
    picked: list[int] = []
    for cls, count in enumerate(counts):
        pool = candidates[labels[candidates] == cls].tolist()
        if count > len(pool):
            raise ValueError(
                f"{split}: asked for {count} images of class {cls} ({CLASS_NAMES[cls]}) but only {len(pool)} "
                "exist; lower the count or use the full set (`apt-get install dataset-fashion-mnist`)"
            )
        pool.sort(key=lambda i: _rank_key(seed, split, i))
        picked.extend(pool[:count])
    return np.array(sorted(picked), dtype=np.int64)


def select_subset_indices(
    root: str | Path = FULL_DIR, per_class: int = PER_CLASS, seed: int = SUBSET_SEED
) -> dict[str, list[int]]:
    """Source indices (into the official train / t10k files) of the bundled subset, sorted."""
    root = Path(root)
    out = {}
    for split, (_, labels_stem) in _SPLIT_FILES.items():
        labels = read_idx(_idx_path(root, labels_stem))
        out[split] = _pick_per_class(labels, [per_class] * len(CLASS_NAMES), seed, split).tolist()
    return out


def write_subset(
    out_dir: str | Path, root: str | Path = FULL_DIR, per_class: int = PER_CLASS, seed: int = SUBSET_SEED
) -> dict[str, Path]:
    """Write ``train.parquet``, ``test.parquet`` and ``indices.json`` of the subset into ``out_dir``.

    Rows are in source-index order; ``indices.json`` lists the source index of every row.
    """
    root, out_dir = Path(root), Path(out_dir)
    if not full_available(root):
        raise FileNotFoundError(f"Full Fashion-MNIST not found under {root}: {_INSTALL_HINT}")
    indices = select_subset_indices(root, per_class, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for split in _SPLIT_FILES:
        images, labels = _read_split(root, split)
        idx = np.asarray(indices[split])
        ds = _to_dataset(images[idx], labels[idx])
        path = out_dir / f"{split}.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        ds.to_parquet(str(tmp))
        tmp.replace(path)  # never leave a half-written file under the final name
        written[split] = path
    meta = {
        "source": "Fashion-MNIST (Zalando SE, MIT), official train / t10k IDX files",
        "hub_id": HUB_ID,
        "per_class": per_class,
        "seed": seed,
        "rule": "per split and class: the source indices with the smallest "
        "sha256(f'fashion-mnist:{seed}:{split}:{index}'), rows sorted by source index",
        "indices": indices,
    }
    path = out_dir / "indices.json"
    path.write_text(json.dumps(meta, indent=1) + "\n")
    written["indices"] = path
    return written


def few_shot_split(
    per_class: int = 100, seed: int = 0, test_size: int | None = 2000, *, source: str = "auto"
) -> DatasetDict:
    """A class-balanced few-shot ``DatasetDict``: ``per_class`` train images per class, ``test_size`` test.

    Draws from the full set when present (``source="auto"``) else from the bundled subset (at most
    100 train / 100 test per class); ``source="full"`` / ``"bundled"`` force one. ``test_size=None`` takes
    the whole test split. Test images are class-balanced too (any remainder goes to the first classes).
    The draw is a seeded hash ranking, so the same arguments give the same images everywhere.
    """
    from datasets import DatasetDict

    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    if source not in ("auto", "full", "bundled"):
        raise ValueError(f"source must be 'auto', 'full' or 'bundled', got {source!r}")
    use_full = full_available() if source == "auto" else source == "full"
    n_cls = len(CLASS_NAMES)

    def test_counts(total: int) -> list[int]:
        size = total if test_size is None else test_size
        if size < n_cls or size > total:
            origin = "full" if use_full else "bundled"
            raise ValueError(
                f"test_size={test_size} must be between {n_cls} and {total} for the {origin} Fashion-MNIST; "
                "lower it or install the full set (`apt-get install dataset-fashion-mnist`)"
            )
        return [size // n_cls + (1 if c < size % n_cls else 0) for c in range(n_cls)]

    if use_full:
        out = {}
        for split in _SPLIT_FILES:
            images, labels = _read_split(FULL_DIR, split)
            counts = [per_class] * n_cls if split == "train" else test_counts(len(labels))
            idx = _pick_per_class(labels, counts, seed, split)
            out[split] = _to_dataset(
                images[idx], labels[idx], f"Fashion-MNIST few-shot {split} (full set, seed {seed})"
            )
        logger.info("few_shot_split: drew from the full Fashion-MNIST under %s", FULL_DIR)
        return DatasetDict(out)
    bundled = load_bundled()
    out = {}
    for split in _SPLIT_FILES:
        labels = np.asarray(bundled[split]["label"])
        counts = [per_class] * n_cls if split == "train" else test_counts(len(labels))
        out[split] = bundled[split].select(_pick_per_class(labels, counts, seed, split).tolist())
    logger.info("few_shot_split: full Fashion-MNIST absent, drew from the bundled subset %s", BUNDLED_DIR)
    return DatasetDict(out)
