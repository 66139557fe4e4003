"""Make assets/fashion_mnist_mini.npz, the embedded dataset behind --dataset FashionMNIST-mini:
a class-balanced random subset of Fashion-MNIST, 500 training and 100 test images per class.

    apt-get install dataset-fashion-mnist   # puts the IDX files in /usr/share/datasets/fashion-mnist
    python assets/make_fashion_mnist_mini.py [--source DIR]
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mtt.data import DEBIAN_FASHION_MNIST, MINI_PATH, idx_files, read_idx  # noqa: E402


def balanced_subset(labels, per_class, rng):
    """`per_class` random indices of each class, sorted (so the file keeps the original order)."""
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                                   for c in range(10)]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=DEBIAN_FASHION_MNIST, help="folder with the four IDX .gz files")
    args = parser.parse_args()
    paths = idx_files(args.source)
    if paths is None:
        sys.exit(f"error: no Fashion-MNIST IDX files in {args.source}; apt-get install dataset-fashion-mnist")
    x_train, y_train, x_test, y_test = (read_idx(p) for p in paths)
    rng = np.random.default_rng(0)
    train, test = balanced_subset(y_train, 500, rng), balanced_subset(y_test, 100, rng)
    np.savez_compressed(MINI_PATH, x_train=x_train[train], y_train=y_train[train].astype(np.uint8),
                        x_test=x_test[test], y_test=y_test[test].astype(np.uint8))
    print(f"wrote {MINI_PATH} ({MINI_PATH.stat().st_size / 1e6:.1f} MB): {len(train)} train, {len(test)} test")


if __name__ == "__main__":
    main()
