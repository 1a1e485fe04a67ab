"""Data sets of `trp train`: embedded digits, CIFAR-10 python batches, ImageFolder; clear errors."""
import os
import pickle

import numpy as np
import pytest
import torch

from trp.app import data


def test_digits_split_is_fixed_stratified_and_normalized():
    a, b = data.load("digits", image_size=12), data.load("digits", image_size=12)
    assert (len(a.train), len(a.test)) == (1347, 450)
    assert a.input_size == (1, 3, 12, 12) and a.num_classes == 10
    assert torch.equal(a.train.labels, b.train.labels) and torch.equal(a.test.images, b.test.images)
    # stratified: every class has its share of the test set (about 45 each)
    counts = torch.bincount(a.test.labels, minlength=10)
    assert counts.min() >= 40 and counts.max() <= 50
    x = torch.stack([a.test[i][0] for i in range(len(a.test))])
    assert x.shape == (450, 3, 12, 12)
    train_x = torch.stack([data.TensorImages(a.train.images, a.train.labels, a.test.transform)[i][0]
                           for i in range(len(a.train))])
    assert abs(float(train_x.mean())) < 1e-3 and abs(float(train_x.std()) - 1) < 1e-2


def test_subset_is_fixed_and_sized():
    a = data.load("digits", image_size=8, subset=30, seed=3)
    b = data.load("digits", image_size=8, subset=30, seed=3)
    assert len(a.train) == len(a.test) == 30
    assert a.train.indices == b.train.indices


@pytest.mark.parametrize("spec", ["mnist", "cifar100:/x", "digits:foo", "", "imagefolder"])
def test_unknown_or_incomplete_spec_lists_valid(spec):
    with pytest.raises(data.DataError, match="digits|directory"):
        data.parse_spec(spec)


def _write_batch(path, n, seed, protocol=2):
    rng = np.random.default_rng(seed)
    obj = {b"batch_label": b"test", b"labels": [int(v) for v in rng.integers(0, 10, n)],
           b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return obj


def _write_cifar(root, n=6):
    os.makedirs(root, exist_ok=True)
    batches = [_write_batch(os.path.join(root, f"data_batch_{i}"), n, i) for i in range(1, 6)]
    test = _write_batch(os.path.join(root, "test_batch"), n, 9, protocol=4)
    with open(os.path.join(root, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072}, f)
    return batches, test


def test_cifar10_python_batches(tmp_path):
    batches, test = _write_cifar(str(tmp_path / "cifar-10-batches-py"))
    b = data.load(f"cifar10:{tmp_path}")  # the parent directory of cifar-10-batches-py works too
    assert (len(b.train), len(b.test), b.classes[3]) == (30, 6, "c3")
    assert b.input_size == (1, 3, 32, 32)
    # un-normalize the (un-augmented) test image and compare with the raw bytes, CHW layout
    x, y = b.test[2]
    raw = torch.from_numpy(test[b"data"][2]).view(3, 32, 32).float() / 255
    mean, std = torch.tensor(data.CIFAR_MEAN).view(3, 1, 1), torch.tensor(data.CIFAR_STD).view(3, 1, 1)
    assert torch.allclose(x * std + mean, raw, atol=1e-5) and int(y) == test[b"labels"][2]
    assert int(b.train[6 + 1][1]) == batches[1][b"labels"][1]
    # train augmentation: pad + crop + flip keeps the shape, and draws from torch's RNG
    torch.manual_seed(0)
    xa = torch.stack([b.train[0][0] for _ in range(8)])
    torch.manual_seed(0)
    xb = torch.stack([b.train[0][0] for _ in range(8)])
    assert xa.shape == (8, 3, 32, 32) and torch.equal(xa, xb) and not torch.equal(xa[0:1].expand_as(xa), xa)


def test_cifar10_missing_and_malformed(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.load(f"cifar10:{tmp_path / 'nope'}")
    root = tmp_path / "c"
    _write_cifar(str(root))
    os.remove(root / "data_batch_3")
    with pytest.raises(data.DataError, match="missing data_batch_3"):
        data.load(f"cifar10:{root}")
    (root / "data_batch_3").write_bytes(b"garbage, not a pickle")
    with pytest.raises(data.DataError, match="data_batch_3.*not a CIFAR-10 python batch"):
        data.load(f"cifar10:{root}")
    with open(root / "data_batch_3", "wb") as f:  # right container, wrong image size
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(data.DataError, match="N x 3072"):
        data.load(f"cifar10:{root}")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar10_batch_with_code_is_refused(tmp_path):
    root = tmp_path / "c"
    _write_cifar(str(root))
    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f)
    with pytest.raises(data.DataError, match="unexpected object"):
        data.load(f"cifar10:{root}")


def _write_imagefolder(root, classes=("cat", "dog"), per_class=2, size=20):
    from PIL import Image

    for split in ("train", "val"):
        for ci, c in enumerate(classes):
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (size + i, size), (40 * ci, 100, 7 * i)).save(root / split / c / f"{i}.png")


def test_imagefolder(tmp_path):
    _write_imagefolder(tmp_path)
    b = data.load(f"imagefolder:{tmp_path}", image_size=16)
    assert (b.num_classes, b.classes, len(b.train), len(b.test)) == (2, ["cat", "dog"], 4, 4)
    x, y = b.test[3]
    assert x.shape == (3, 16, 16) and int(y) == 1
    assert b.train[0][0].shape == (3, 16, 16)


def test_imagefolder_missing_split_or_classes(tmp_path):
    _write_imagefolder(tmp_path)
    import shutil
    shutil.rmtree(tmp_path / "val")
    with pytest.raises(data.DataError, match="val"):
        data.load(f"imagefolder:{tmp_path}")
    os.makedirs(tmp_path / "val")
    with pytest.raises(data.DataError, match="class"):
        data.load(f"imagefolder:{tmp_path}")


def test_loader_order_follows_its_generator():
    b = data.load("digits", image_size=8, subset=40)
    train, _ = data.make_loaders(b, 8, seed=1)
    state = train.generator.get_state()
    first = [y.tolist() for _, y in train]
    train.generator.set_state(state)
    assert [y.tolist() for _, y in train] == first
    assert [y.tolist() for _, y in train] != first  # a new epoch reshuffles


def _write_arrays(path, x_train, y_train, x_test, y_test, **extra):
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, **extra)
    return f"arrays:{path}"


def _gray(n, side, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, side, side), dtype=np.uint8), rng.integers(0, 3, n)


@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw", "float"])
def test_arrays_layouts_resize_and_normalize(tmp_path, layout):
    x, y = _gray(30, 12, 0)
    xt, yt = _gray(10, 12, 1)
    y[0] = 4  # the largest label in the train set sets the number of classes
    form = {"nhw": lambda a: a, "nhwc": lambda a: np.repeat(a[..., None], 3, -1),
            "nchw": lambda a: a[:, None], "float": lambda a: a.astype(np.float32) / 255}[layout]
    spec = _write_arrays(tmp_path / "d.npz", form(x), y, form(xt), yt)
    native = data.load(spec)
    assert (native.name, native.num_classes, native.image_size, native.in_channels) == ("arrays", 5, 12, 3)
    assert native.classes == ["0", "1", "2", "3", "4"] and (len(native.train), len(native.test)) == (30, 10)
    # the pixels, unscaled: what was stored, in [0, 1], gray repeated to three channels
    assert torch.allclose(native.test.images[:, 1], torch.from_numpy(xt).float() / 255, atol=1e-6)
    assert torch.equal(native.test.labels, torch.from_numpy(yt))
    small = data.load(spec, image_size=6)
    assert small.test[0][0].shape == small.train[0][0].shape == (3, 6, 6)
    train_x = torch.stack([small.test.transform(small.train.images[i]) for i in range(30)])
    assert abs(float(train_x.mean())) < 1e-4 and abs(float(train_x.std()) - 1) < 2e-2


def test_arrays_class_names_and_non_square(tmp_path):
    x, y = _gray(8, 10, 0)
    spec = _write_arrays(tmp_path / "d.npz", x[:, :, :8], y, x[:4, :, :8], y[:4],
                         classes=np.array(["shirt", "shoe", "bag", "coat"]))
    with pytest.raises(data.DataError, match="10x8, not square: give --image-size"):
        data.load(spec)
    b = data.load(spec, image_size=8)
    assert b.classes == ["shirt", "shoe", "bag", "coat"] and b.num_classes == 4
    assert b.train[0][0].shape == (3, 8, 8)


def test_arrays_bad_files_are_refused_with_what_was_expected(tmp_path):
    x, y = _gray(6, 8, 0)
    cases = {
        "missing the array y_test": dict(x_train=x, y_train=y, x_test=x),
        "uint8 \\(0..255\\) or float": dict(x_train=x.astype(np.int32), y_train=y, x_test=x, y_test=y),
        "with C = 1 or 3": dict(x_train=x[:, None, None], y_train=y, x_test=x, y_test=y),
        "outside \\[0, 1\\]": dict(x_train=x.astype(np.float32), y_train=y, x_test=x, y_test=y),
        "must be 6 integer labels": dict(x_train=x, y_train=y[:5], x_test=x, y_test=y),
        "integer labels": dict(x_train=x, y_train=y.astype(np.float32), x_test=x, y_test=y),
        "labels outside": dict(x_train=x, y_train=y - 1, x_test=x, y_test=y),
        "different image shapes": dict(x_train=x, y_train=y, x_test=x[:, :4], y_test=y),
        "holds no images": dict(x_train=x[:0], y_train=y[:0], x_test=x, y_test=y),
        "classes must be": dict(x_train=x, y_train=y, x_test=x, y_test=y, classes=np.array(["a"])),
    }
    for i, (match, arrays) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.npz"
        np.savez(path, **arrays)
        with pytest.raises(data.DataError, match=match):
            data.load(f"arrays:{path}")
    np.save(tmp_path / "plain.npy", x)
    with pytest.raises(data.DataError, match="not a .npz archive"):
        data.load(f"arrays:{tmp_path / 'plain.npy'}")
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(data.DataError, match="not a readable .npz"):
        data.load(f"arrays:{tmp_path / 'text.npz'}")
    np.savez(tmp_path / "objects.npz", x_train=np.array([{"a": 1}] * 6, dtype=object), y_train=y, x_test=x,
             y_test=y)
    with pytest.raises(data.DataError, match="not a readable .npz"):  # a pickle is never loaded
        data.load(f"arrays:{tmp_path / 'objects.npz'}")
    with pytest.raises(data.DataError, match="needs a file"):
        data.parse_spec("arrays")
    with pytest.raises(data.DataError, match="absent.npz: no such file"):
        data.load(f"arrays:{tmp_path / 'absent.npz'}")
    os.mkfifo(tmp_path / "fifo.npz")
    with pytest.raises(data.DataError, match="not a regular file"):
        data.load(f"arrays:{tmp_path / 'fifo.npz'}")
