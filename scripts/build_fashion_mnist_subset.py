#!/usr/bin/env python
"""Rebuild the Fashion-MNIST subset bundled in rifle_hf/assets/fashion_mnist/ from the full IDX files.

Usage: python scripts/build_fashion_mnist_subset.py [--root /usr/share/datasets/fashion-mnist] [--out DIR]
The full set comes from `apt-get install dataset-fashion-mnist` (or any directory of the official files).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rifle_hf.fashion_mnist import BUNDLED_DIR, FULL_DIR, PER_CLASS, SUBSET_SEED, write_subset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", type=Path, default=FULL_DIR, help="directory of the official IDX (.gz) files"
    )
    parser.add_argument(
        "--out", type=Path, default=BUNDLED_DIR, help="output directory (default: the package)"
    )
    parser.add_argument("--per-class", type=int, default=PER_CLASS, help="images per class and split")
    parser.add_argument("--seed", type=int, default=SUBSET_SEED, help="seed of the hash ranking")
    args = parser.parse_args(argv)
    try:
        written = write_subset(args.out, root=args.root, per_class=args.per_class, seed=args.seed)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written.values():
        print(f"{path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
