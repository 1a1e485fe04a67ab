"""Data sets for `trp train`: named by one spec string, nothing is ever downloaded.

- "digits": scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, 10 classes), a fixed
  seeded stratified 75/25 split (1,347 train / 450 test), upsampled bilinearly to image_size x image_size
  (default 16) and repeated to 3 channels so that CIFAR models take it as they are. Train augmentation: a
  random shift of up to image_size/8 pixels (pad + random crop; no flip, digits are not mirror-symmetric).
- "cifar10:DIR": the standard python batches (data_batch_1..5, test_batch, batches.meta) in DIR or in
  DIR/cifar-10-batches-py; train augmentation 4-pixel pad + random 32 crop + horizontal flip (the paper's
  CIFAR-10 augmentation).
- "imagefolder:DIR": DIR/train/<class>/*.png|jpg and DIR/val/<class>/... (ImageNet layout) via torchvision;
  random-resized crop + flip on train, resize + center crop on val.
- "arrays:FILE": a NumPy .npz with x_train, y_train, x_test, y_test (Keras's load_data names), images
  [N, H, W] (gray), [N, H, W, C] or [N, C, H, W] with C = 1 or 3, uint8 or float in [0, 1], integer labels
  0..K-1, and optionally `classes` (K names). Resized bilinearly (antialiased) to image_size (default: the
  images' side), gray repeated to 3 channels, and augmented as the digits (a random shift, no flip: the
  data's symmetry is not known). Read without pickles.

Augmentation draws from torch's global RNG and the loaders' shuffling from their own generators, so a
training run that saves and restores both continues with exactly the same batches."""
import os
import pickle
import zipfile
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from trp._utils import storage

DATASETS = ("digits", "cifar10:DIR", "imagefolder:DIR", "arrays:FILE.npz")
ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")
CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MAX_IMAGE_SIZE = 1024  # input side bound: above any classification resolution in use
MAX_CLASSES = 100_000  # labels bound the classifier's width: above any classification data set in use
MAX_DIGITS_SIZE = 64  # the digits are 8x8 scans: 8x upsampled at most (1,797 images of 3 x 64 x 64: 88 MB)


class DataError(ValueError):
    """A data set that cannot be used as named (unknown name, missing or malformed files)."""


@dataclass
class DataBundle:
    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    classes: list = field(default_factory=list)

    @property
    def input_size(self):
        """(1, C, H, W): the shape that MACs and latency are measured at."""
        return (1, self.in_channels, self.image_size, self.image_size)


class PadCropFlip:
    """Random shift by zero-padding `pad` pixels and cropping back, then an optional horizontal flip,
    then per-channel normalization. Works on a [C, H, W] float tensor in [0, 1]."""

    def __init__(self, pad, flip, mean, std):
        self.pad, self.flip = pad, flip
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, x):
        if self.pad:
            h, w = x.shape[-2:]
            x = F.pad(x, (self.pad,) * 4)
            i, j = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = x[:, i:i + h, j:j + w]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return (x - self.mean) / self.std


class TensorImages(Dataset):
    """Images [N, C, H, W] (uint8 or float in [0, 1]) with int labels and a per-sample transform."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, torch.as_tensor(labels, dtype=torch.int64), transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i]
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        return self.transform(x), self.labels[i]


def parse_spec(spec):
    """'digits' -> ('digits', None); 'cifar10:DIR' -> ('cifar10', DIR); 'arrays:FILE' -> ('arrays', FILE);
    unknown names list the valid ones."""
    if not isinstance(spec, str) or not spec:
        raise DataError(f"no data set given; valid: {', '.join(DATASETS)}")
    kind, sep, path = spec.partition(":")
    if kind == "digits" and not sep:
        return kind, None
    if kind in ("cifar10", "imagefolder"):
        if not path:
            raise DataError(f"data set {kind!r} needs a directory: --data {kind}:DIR")
        return kind, os.path.expanduser(path)
    if kind == "arrays":
        if not path:
            raise DataError("data set 'arrays' needs a file: --data arrays:FILE.npz")
        return kind, os.path.expanduser(path)
    raise DataError(f"unknown data set {spec!r}; valid: {', '.join(DATASETS)}")


def _positive(value):
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def check_options(spec, image_size=None, subset=None):
    """The checks of the data options that `trp train` makes before any work (it reads no files). Image
    sides are bounded (MAX_IMAGE_SIZE; digits, 8x8 scans: MAX_DIGITS_SIZE), so that no option or checkpoint
    can make the data take more memory than a real run needs.

    Args:
        spec: the data set ("digits", "cifar10:DIR", "imagefolder:DIR", "arrays:FILE").
        image_size: None or the input side.
        subset: None or the number of samples.

    Returns:
        (kind, path) of spec.

    Raises:
        DataError: an unknown spec or an invalid size, naming the valid ones.
    """
    kind, path = parse_spec(spec)
    high = MAX_DIGITS_SIZE if kind == "digits" else MAX_IMAGE_SIZE
    if image_size is not None and not (_positive(image_size) and 4 <= image_size <= high):
        raise DataError(f"image size must be an int in [4, {high}]{' for digits' if kind == 'digits' else ''}, "
                        f"got {image_size!r}")
    if kind == "cifar10" and image_size not in (None, 32):
        raise DataError("CIFAR-10 images are 32x32; drop --image-size")
    if subset is not None and not _positive(subset):
        raise DataError(f"subset must be an int >= 1, got {subset!r}")
    return kind, path


def load(spec, image_size=None, subset=None, seed=0):
    """A DataBundle for `spec`. `subset` keeps a fixed random `subset` train and `subset` test samples
    (seeded, for quick runs and tests); image_size applies to digits (default 16), imagefolder (224) and arrays
    (default: the images' side)."""
    kind, path = check_options(spec, image_size, subset)
    if kind == "digits":
        bundle = load_digits(image_size or 16)
    elif kind == "cifar10":
        bundle = load_cifar10(path)
    elif kind == "arrays":
        bundle = load_arrays(path, image_size)
    else:
        bundle = load_imagefolder(path, image_size or 224)
    if subset is not None:
        bundle.train = _fixed_subset(bundle.train, subset, seed)
        bundle.test = _fixed_subset(bundle.test, subset, seed + 1)
    return bundle


def _fixed_subset(ds, n, seed):
    if n >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return Subset(ds, sorted(idx.tolist()))


def load_digits(image_size=16, test_fraction=0.25, split_seed=0):
    try:  # optional dependency (the data extra): imported only for this data set
        from sklearn.datasets import load_digits as sk_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise DataError("the digits data set needs scikit-learn (pip install scikit-learn)") from exc
    d = sk_digits()
    images = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0  # [N, 1, 8, 8], values 0..16
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    idx_train, idx_test = train_test_split(range(len(d.target)), test_size=test_fraction,
                                           stratify=d.target, random_state=split_seed)
    labels = torch.from_numpy(d.target)
    return _shifted_bundle("digits", images[idx_train], labels[idx_train], images[idx_test], labels[idx_test],
                           [str(i) for i in range(10)])


def _shifted_bundle(name, train_x, train_y, test_x, test_y, classes):
    """The DataBundle of small images [N, 1 or 3, S, S] (float, clamped to [0, 1]; gray repeated to 3 channels):
    normalized by the training images' per-channel mean and std, and trained with a random shift of up to S/8
    pixels and no flip (the digits' and the arrays' preprocessing)."""
    train_x, test_x = (x.clamp(0, 1).expand(-1, 3, -1, -1).contiguous() for x in (train_x, test_x))
    side = train_x.shape[-1]
    mean = tuple(train_x.mean(dim=(0, 2, 3)).tolist())
    std = tuple(train_x.std(dim=(0, 2, 3)).clamp(min=1e-6).tolist())  # a constant channel: no division by 0
    train = TensorImages(train_x, train_y, PadCropFlip(max(1, side // 8), False, mean, std))
    test = TensorImages(test_x, test_y, PadCropFlip(0, False, mean, std))
    return DataBundle(name, train, test, len(classes), 3, side, list(classes))


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batch files hold (dicts, lists, bytes, numpy arrays): never code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _read_batch(path):
    try:
        with storage.open_regular(path) as f:  # a FIFO or a device is refused, not waited on
            obj = _BatchUnpickler(f, encoding="bytes").load()
    except Exception as exc:
        raise DataError(f"{path}: not a CIFAR-10 python batch file ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR-10 python batch file (expected a pickled dict)")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_arrays(path):
    batch = _read_batch(path)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 or labels is None \
            or len(labels) != data.shape[0]:
        raise DataError(f"{path}: expected keys b'data' (N x 3072 uint8) and b'labels' (N ints)")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels must be in 0..9")
    images = torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8)).view(-1, 3, 32, 32)
    return images, torch.from_numpy(labels)


def load_cifar10(root):
    root = os.path.abspath(root)
    nested = os.path.join(root, "cifar-10-batches-py")
    if not os.path.exists(os.path.join(root, "data_batch_1")) and os.path.isdir(nested):
        root = nested
    if not os.path.isdir(root):
        raise DataError(f"CIFAR-10 directory {root} does not exist (expected the python batches "
                        f"{', '.join(CIFAR_FILES)} from cifar-10-python.tar.gz)")
    missing = [f for f in CIFAR_FILES if not os.path.isfile(os.path.join(root, f))]
    if missing:
        raise DataError(f"{root} is not a CIFAR-10 python-batch directory: missing {', '.join(missing)} "
                        f"(expected {', '.join(CIFAR_FILES)} from cifar-10-python.tar.gz)")
    parts = [_cifar_arrays(os.path.join(root, f)) for f in CIFAR_FILES[:5]]
    train_x = torch.cat([p[0] for p in parts])
    train_y = torch.cat([p[1] for p in parts])
    test_x, test_y = _cifar_arrays(os.path.join(root, "test_batch"))
    meta = _read_batch(os.path.join(root, "batches.meta"))
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("label_names", [])]
    if len(names) != 10:
        raise DataError(f"{root}/batches.meta: expected 10 label_names, got {len(names)}")
    train = TensorImages(train_x, train_y, PadCropFlip(4, True, CIFAR_MEAN, CIFAR_STD))
    test = TensorImages(test_x, test_y, PadCropFlip(0, False, CIFAR_MEAN, CIFAR_STD))
    return DataBundle("cifar10", train, test, 10, 3, 32, names)


def _read_npz(path):
    """{key: array} of ARRAY_KEYS (+ "classes" when present) from the .npz at path; no pickles."""
    try:
        f = storage.open_regular(path)  # a FIFO or a device is refused, not waited on
    except OSError as exc:
        raise DataError(f"arrays data: {exc}") from None
    try:
        with f:
            z = np.load(f, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise DataError(f"{path}: not a .npz archive (expected the arrays {', '.join(ARRAY_KEYS)})")
            with z:
                return _npz_arrays(z, path)
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz of {', '.join(ARRAY_KEYS)} ({type(exc).__name__}: "
                        f"{exc})") from None


def _npz_arrays(z, path):
    """{key: array} of ARRAY_KEYS (+ "classes" when present) in the open archive z."""
    missing = [k for k in ARRAY_KEYS if k not in z.files]
    if missing:
        raise DataError(f"{path}: missing the array{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                        f"(expected {', '.join(ARRAY_KEYS)}, optionally classes)")
    return {k: z[k] for k in ARRAY_KEYS + ("classes",) if k in z.files}


def _array_images(x, name, path):
    """x as float [N, C, H, W] in [0, 1] (see the module docstring for what is accepted)."""
    if x.dtype == np.uint8:
        t = torch.from_numpy(np.ascontiguousarray(x)).float().div_(255)
    elif np.issubdtype(x.dtype, np.floating):
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if t.numel() and not (bool(torch.isfinite(t).all()) and float(t.min()) >= 0 and float(t.max()) <= 1):
            raise DataError(f"{path}: {name} holds floats outside [0, 1] (or NaN/Inf); give uint8 0..255 or "
                            f"floats in [0, 1]")
    else:
        raise DataError(f"{path}: {name} must be uint8 (0..255) or float in [0, 1], got {x.dtype}")
    if t.ndim == 3:
        t = t.unsqueeze(1)
    elif t.ndim == 4 and t.shape[-1] in (1, 3):
        t = t.permute(0, 3, 1, 2)
    elif not (t.ndim == 4 and t.shape[1] in (1, 3)):
        raise DataError(f"{path}: {name} must be [N, H, W], [N, H, W, C] or [N, C, H, W] with C = 1 or 3, got "
                        f"shape {tuple(x.shape)}")
    if t.shape[0] == 0:
        raise DataError(f"{path}: {name} holds no images")
    return t


def _array_labels(y, name, n, path):
    if y.ndim != 1 or len(y) != n or not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise DataError(f"{path}: {name} must be {n} integer labels (a 1-D array), got {y.dtype} of shape "
                        f"{tuple(y.shape)}")
    y = torch.from_numpy(y.astype(np.int64))
    if int(y.min()) < 0 or int(y.max()) >= MAX_CLASSES:
        raise DataError(f"{path}: {name} has labels outside 0..{MAX_CLASSES - 1}; labels are 0..K-1")
    return y


def load_arrays(path, image_size=None):
    """The arrays:FILE data set (see the module docstring).

    Args:
        path: the .npz file.
        image_size: the input side; default None: the images' own side (square images only).

    Returns:
        A DataBundle named "arrays".

    Raises:
        DataError: a missing or malformed file or array, named with what was expected.
    """
    path = os.path.abspath(path)
    arrays = _read_npz(path)
    images = {s: _array_images(arrays[f"x_{s}"], f"x_{s}", path) for s in ("train", "test")}
    labels = {s: _array_labels(arrays[f"y_{s}"], f"y_{s}", len(images[s]), path) for s in ("train", "test")}
    if images["train"].shape[1:] != images["test"].shape[1:]:
        raise DataError(f"{path}: x_train and x_test have different image shapes "
                        f"({tuple(images['train'].shape[1:])} vs {tuple(images['test'].shape[1:])})")
    height, width = images["train"].shape[-2:]
    if image_size is None:
        if height != width:
            raise DataError(f"{path}: the images are {height}x{width}, not square: give --image-size N")
        image_size = height
    if not 4 <= image_size <= MAX_IMAGE_SIZE:
        raise DataError(f"{path}: the images are {height}x{width}; give --image-size N in [4, {MAX_IMAGE_SIZE}]")
    num_classes = max(int(labels[s].max()) for s in labels) + 1
    names = [str(i) for i in range(num_classes)]
    if "classes" in arrays:
        given = arrays["classes"]
        if given.ndim != 1 or given.dtype.kind not in "UT" or len(given) < num_classes:
            raise DataError(f"{path}: classes must be a 1-D array of at least {num_classes} names (the labels "
                            f"go up to {num_classes - 1}), got {given.dtype} of shape {tuple(given.shape)}")
        names = [str(c) for c in given]
    if (height, width) != (image_size, image_size):
        images = {s: F.interpolate(t, size=(image_size, image_size), mode="bilinear", align_corners=False,
                                   antialias=image_size < max(height, width)) for s, t in images.items()}
    return _shifted_bundle("arrays", images["train"], labels["train"], images["test"], labels["test"], names)


def load_imagefolder(root, image_size=224):
    try:  # optional dependency (the vision extra)
        from torchvision import datasets
        from torchvision import transforms as T
    except ImportError as exc:
        raise DataError("imagefolder data needs torchvision (pip install torchvision)") from exc
    root = os.path.abspath(root)
    dirs = {s: os.path.join(root, s) for s in ("train", "val")}
    missing = [d for d in dirs.values() if not os.path.isdir(d)]
    if missing:
        raise DataError(f"imagefolder data needs {root}/train/<class>/<images> and {root}/val/<class>/"
                        f"<images>; missing {', '.join(missing)}")
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    val_tf = T.Compose([T.Resize(max(image_size, round(image_size * 256 / 224))), T.CenterCrop(image_size),
                        T.ToTensor(), normalize])
    try:
        train = datasets.ImageFolder(dirs["train"], transform=train_tf)
        val = datasets.ImageFolder(dirs["val"], transform=val_tf)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"imagefolder {root}: {exc} (expected train/<class>/<images> and val/<class>/...)") \
            from None
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        parts = [f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''} only in {split}/"
                 for names, split in ((only_train, "train"), (only_val, "val")) if names]
        raise DataError(f"imagefolder {root}: train/ and val/ have different class folders ({'; '.join(parts)})")
    return DataBundle("imagefolder", train, val, len(train.classes), 3, image_size, list(train.classes))


def make_loaders(bundle, batch_size, seed=0, workers=0, rank=0, world_size=1):
    """(train_loader, test_loader). The train loader shuffles with its own seeded generator
    (train_loader.generator, saved in checkpoints); a last batch of one sample is dropped (BatchNorm).
    world_size > 1 (DDP): batch_size is the global batch, each rank loads batch_size / world_size samples
    of its DistributedSampler share (shuffled by seed and the epoch: call train_loader.sampler.set_epoch)
    and every world_size-th test sample from `rank` on (no padding: all-reduced counts are exact)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch size must be an int >= 1, got {batch_size!r}")
    gen = torch.Generator().manual_seed(seed)
    sampler, test_set = None, bundle.test
    if world_size > 1:
        if batch_size % world_size:
            raise DataError(f"--batch-size {batch_size} is the global batch: it must be a multiple of the "
                            f"number of processes, {world_size}")
        sampler = DistributedSampler(bundle.train, world_size, rank, shuffle=True, seed=seed)
        batch_size //= world_size
        test_set = Subset(bundle.test, range(rank, len(bundle.test), world_size))
    samples = len(sampler) if sampler is not None else len(bundle.train)
    train = DataLoader(bundle.train, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, generator=gen,
                       num_workers=workers, drop_last=samples % batch_size == 1, persistent_workers=False)
    test = DataLoader(test_set, batch_size=max(batch_size, 256), shuffle=False, num_workers=workers,
                      generator=torch.Generator().manual_seed(seed + 1))
    return train, test


__all__ = ["DATASETS", "ARRAY_KEYS", "MAX_IMAGE_SIZE", "MAX_DIGITS_SIZE",
           "DataBundle", "DataError", "load", "parse_spec", "check_options", "load_digits", "load_cifar10",
           "load_imagefolder", "load_arrays", "make_loaders"]
