"""Datasets of the study, as standardized tensors plus everything needed to rebuild them exactly.

``load_dataset("mnist", n_train=1000, binary=3)`` returns a :class:`Dataset` with a train and a
test :class:`Split`. Each dataset is one source function registered by name with
:func:`register_dataset` (like the architectures); ``DATASETS`` lists them. Known datasets:

- ``digits``: scikit-learn's bundled handwritten digits (1,797 images, 8×8, values 0..16), resized
  to 28×28 (bilinear) and split by ``seed`` into a class-balanced test split of 500 images and a
  training split of the other 1,297. The default: it needs no data root and no download.
- ``mnist``: read from ``<data root>/MNIST/raw/`` (torchvision's layout): the four original IDX
  files, gzip-compressed or not.
- ``mnist-shifted``: MNIST with every digit translated by an integer offset (dx, dy) drawn
  uniformly from [−s, s]² (``shift`` = s), zero fill, no wrap-around. The offset of a sample is a
  function of (``shift_seed``, split, source index) only (see :func:`shift_offsets`), so a sample
  looks the same in every subset.
- ``cifar10``: the python pickle batches in ``<data root>/cifar-10-batches-py/``, read directly
  (not through torchvision, whose md5 check rejects rebuilt but pixel-identical copies).
- ``snakes``: 10 ImageNet snake classes (``SNAKE_CLASSES``) from an image-folder root
  ``<data root>/snakes/{train,val}/<wnid>/*.JPEG``; resized to 256 and center-cropped to 224, or
  the same framing at ``image_size``; ImageNet normalization. ``val`` is the test split.

MNIST, its shifted variant, CIFAR-10 and digits are standardized with the per-channel mean and
standard deviation of their full training split (of the shifted images for ``mnist-shifted``), in
pixel/255 units, recorded in ``Dataset.spec["normalization"]``.

Options for every dataset: ``n_train``/``n_test`` draw class-balanced random subsets (seeded by
``seed``); ``binary=C`` gives one output with target 1 for class C and 0 otherwise (one-hot targets
otherwise); ``image_size`` resizes (bilinear), e.g. to 224 for AlexNet.

The data root is ``data_root`` (``--data-root``), else ``$LINCNN_DATA``, else
``$XDG_CACHE_HOME/lincnn`` or ``~/.cache/lincnn``. With ``download=True`` torchvision fetches
missing MNIST or CIFAR-10 files into it. Anything missing, corrupt or invalid raises
:class:`DatasetError` saying what was expected and which option to pass.

Parsed MNIST and CIFAR-10 arrays and their statistics are cached per process, keyed on each
file's path, size and modification time, since experiments load the same data repeatedly.
"""
from __future__ import annotations

import argparse
import gzip
import os
import pickle
import struct
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

#: The default snake classes: WordNet id → name, in label order.
SNAKE_CLASSES = {
    "n01728572": "thunder snake",
    "n01728920": "ringneck snake",
    "n01729322": "hognose snake",
    "n01729977": "green snake",
    "n01734418": "king snake",
    "n01735189": "garter snake",
    "n01737021": "water snake",
    "n01739381": "vine snake",
    "n01740131": "night snake",
    "n01742172": "boa constrictor",
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS_TEST_SIZE = 500
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR10_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
# The file types torchvision's ImageFolder accepts.
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC = 2051, 2049
_SPLITS = ("train", "test")
# Independent random streams per purpose: numpy.random.default_rng([seed, stream]). Distinct
# streams keep, e.g., the subset of a split and the shifts of its digits uncorrelated even when
# --data-seed equals --shift-seed.
_RNG_STREAMS = {"train": 0, "test": 1, "digits-test": 2, "shift-train": 3, "shift-test": 4}
_ROOT_HINT = ("Pass --data-root DIR (data_root=...) or set LINCNN_DATA to the folder that holds it"
              "{download}.")


class DatasetError(ValueError):
    """A dataset cannot be loaded as asked: unknown name, invalid option, missing or corrupt files."""


@dataclass
class Split:
    """One split (train or test) of a dataset, possibly a subset of the source split."""

    x: torch.Tensor  # float32 (n, C, H, W), standardized
    labels: torch.Tensor  # int64 (n,), original class labels
    targets: torch.Tensor  # float32 (n, L): one-hot, or (n, 1) with 1.0/0.0 when binary
    indices: np.ndarray  # int64 (n,), positions in the source split (train or test)


@dataclass
class Dataset:
    """A loaded dataset; ``spec`` (JSON-serializable) rebuilds it through :func:`dataset_from_spec`."""

    name: str
    train: Split
    test: Split
    n_outputs: int  # L: 1 when binary, else the number of classes
    in_channels: int
    image_size: int
    class_names: list[str]
    spec: dict = field(default_factory=dict)


def default_data_root() -> Path:
    """``$LINCNN_DATA`` if set, else ``$XDG_CACHE_HOME/lincnn``, else ``~/.cache/lincnn``."""
    if os.environ.get("LINCNN_DATA"):
        return Path(os.environ["LINCNN_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "lincnn"


def load_dataset(name: str, *, data_root: str | os.PathLike | None = None, n_train: int | None = None,
                 n_test: int | None = None, binary: int | None = None, seed: int = 0, shift: int = 7,
                 shift_seed: int = 0, image_size: int | None = None,
                 snake_classes: Sequence[str] | None = None, download: bool = False) -> Dataset:
    """Load dataset ``name`` (one of :func:`available_datasets`), standardized, as train and test splits.

    n_train, n_test: sizes of class-balanced random subsets drawn with ``seed`` (None: the whole
        split). Classes get equal counts, except that a class too small to give its share gives
        all it has and the others make up the difference; a larger n with the same seed gives a
        superset. ``seed`` also draws the train/test split of ``digits``.
    binary: a class label C: one output, target 1.0 for class C and 0.0 for every other class.
    shift, shift_seed: ``mnist-shifted`` only: the largest offset s and the seed of the offsets.
    image_size: resize to image_size × image_size (default: native size; 224 for snakes).
    snake_classes: ``snakes`` only: WordNet ids in label order (default: ``SNAKE_CLASSES``).
    download: let torchvision fetch missing MNIST or CIFAR-10 files into the data root.
    """
    if name not in _REGISTRY:
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(_REGISTRY)}")
    entry = _REGISTRY[name]
    n_train = _checked_int("n_train", n_train, minimum=1, optional=True)
    n_test = _checked_int("n_test", n_test, minimum=1, optional=True)
    seed = _checked_int("seed", seed, minimum=0)
    image_size = _checked_int("image_size", image_size, minimum=1, optional=True)
    root = Path(data_root).expanduser() if data_root is not None else default_data_root()
    # Only the options the source reads are checked, passed and recorded; the others stay None.
    given = {"shift": shift, "shift_seed": shift_seed, "snake_classes": snake_classes}
    own = {key: _OPTION_CHECKS[key](given[key]) for key in entry.options}

    source = entry.load(root, seed=seed, download=download, **own)
    n_classes = len(source.class_names)
    if binary is not None:
        binary = _checked_int("binary", binary, minimum=0, maximum=n_classes - 1)
    size = image_size or source.native_size
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        available = len(source.labels[split])
        if n is not None and n > available:
            raise DatasetError(f"n_{split}={n} (--n-{split}) is more than the {available} samples of the "
                               f"{name} {split} split")
        splits[split] = _make_split(source, split, n, seed, size, binary)
    spec = {
        "name": name, "n_train": n_train, "n_test": n_test, "binary": binary, "seed": seed,
        "shift": own.get("shift"), "shift_seed": own.get("shift_seed"),
        "image_size": size, "snake_classes": list(own["snake_classes"]) if "snake_classes" in own else None,
        "normalization": {"mean": list(source.mean), "std": list(source.std)},
        "source_sizes": {split: len(source.labels[split]) for split in _SPLITS},
    }
    return Dataset(name=name, train=splits["train"], test=splits["test"],
                   n_outputs=1 if binary is not None else n_classes, in_channels=source.in_channels,
                   image_size=size, class_names=list(source.class_names), spec=spec)


def dataset_from_spec(spec: dict, data_root: str | os.PathLike | None = None) -> Dataset:
    """Rebuild, bit for bit, the dataset whose ``Dataset.spec`` is ``spec`` (e.g. read back from JSON).

    Raises :class:`DatasetError` when the data found differ from those the spec was built from
    (other split sizes or normalization statistics), e.g. when the data root holds another copy.
    """
    required = ("name", "n_train", "n_test", "binary", "seed", "shift", "shift_seed", "image_size",
                "snake_classes", "normalization", "source_sizes")
    missing = [key for key in required if key not in spec]
    if missing:
        raise DatasetError(f"not a dataset spec: it lacks {', '.join(missing)}")
    shift_options = {key: spec[key] for key in ("shift", "shift_seed") if spec[key] is not None}
    dataset = load_dataset(spec["name"], data_root=data_root, n_train=spec["n_train"], n_test=spec["n_test"],
                           binary=spec["binary"], seed=spec["seed"], image_size=spec["image_size"],
                           snake_classes=spec["snake_classes"], **shift_options)
    for key in ("source_sizes", "normalization"):
        if dataset.spec[key] != spec[key]:
            raise DatasetError(f"the {spec['name']} data found differ from those the spec was built from: "
                               f"{key} is {dataset.spec[key]} here but {spec[key]} in the spec; does "
                               f"--data-root point to the same copy?")
    return dataset


def shift_offsets(split: str, n_source: int, shift: int = 7, shift_seed: int = 0) -> np.ndarray:
    """Offsets (dx, dy) of every sample of a source split of ``mnist-shifted``, int64 (n_source, 2).

    Row i belongs to the sample at source index i; each coordinate is uniform on [−shift, shift].
    dx > 0 moves the digit right, dy > 0 moves it down.
    """
    rng = np.random.default_rng([shift_seed, _RNG_STREAMS[f"shift-{split}"]])
    return rng.integers(-shift, shift + 1, size=(n_source, 2), dtype=np.int64)


def dataset_from_args(args: argparse.Namespace) -> Dataset:
    """Load the dataset described by the options of ``jacobian_store.arguments.add_data_arguments``."""
    return load_dataset(args.dataset, data_root=args.data_root, n_train=args.n_train, n_test=args.n_test,
                        binary=args.binary, seed=args.data_seed, shift=args.shift, shift_seed=args.shift_seed,
                        image_size=args.image_size, snake_classes=args.snake_classes, download=args.download)


# ----------------------------------------------------------------------------------------------
# From a source (full splits) to standardized subsets


def _make_split(source: _ArraySource | _ImageFolderSource, split: str, n: int | None, seed: int, size: int,
                binary: int | None) -> Split:
    indices = _stratified_subset(source.labels[split], n, seed, split)
    x = source.read_images(split, indices, size)
    # Standardize in place: x is a fresh float32 tensor of pixel/255 values.
    x.sub_(torch.tensor(source.mean).view(-1, 1, 1)).div_(torch.tensor(source.std).view(-1, 1, 1))
    labels = torch.from_numpy(source.labels[split][indices])
    if binary is not None:
        targets = (labels == binary).to(torch.float32).unsqueeze(1)
    else:
        targets = F.one_hot(labels, len(source.class_names)).to(torch.float32)
    return Split(x=x, labels=labels, targets=targets, indices=indices)


def _stratified_subset(labels: np.ndarray, n: int | None, seed: int, stream: str) -> np.ndarray:
    """Sorted positions (int64) of a class-balanced random subset of ``n`` ≤ len(labels) samples.

    Each class's samples are permuted once per (seed, stream), whatever n, and the subset takes
    the first ``counts[c]`` of class c; counts grow with n, so subsets are nested.
    """
    if n is None:
        return np.arange(len(labels), dtype=np.int64)
    classes, available = np.unique(labels, return_counts=True)
    rng = np.random.default_rng([seed, _RNG_STREAMS[stream]])
    priority = rng.permutation(len(classes))
    shuffled_members = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    counts = _balanced_counts(available, n, priority)
    chosen = np.concatenate([members[:count] for members, count in zip(shuffled_members, counts)])
    return np.sort(chosen).astype(np.int64)


def _balanced_counts(available: np.ndarray, n: int, priority: np.ndarray) -> np.ndarray:
    """Per-class counts summing to ``n``, as equal as the class sizes ``available`` allow.

    Every class gets min(available, level) for the largest level whose total fits in n; the few
    samples left go one each to the classes that still have some, first in ``priority`` order.
    """
    levels = np.arange(available.max() + 1)
    totals = np.minimum(available[None, :], levels[:, None]).sum(axis=1)
    level = np.searchsorted(totals, n, side="right") - 1
    counts = np.minimum(available, level)
    leftover = n - counts.sum()
    open_classes = [c for c in priority if available[c] > level][:leftover]
    counts[open_classes] += 1
    return counts


def _resized(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


@dataclass(frozen=True, eq=False)
class _ArraySource:
    """Full train and test splits in memory: images (n, C, H, W), uint8 pixels or float32 in [0, 1]."""

    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]  # int64
    class_names: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, of pixel/255 over the full training split
    std: tuple[float, ...]

    @classmethod
    def from_arrays(cls, images: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                    class_names: Sequence[str]) -> _ArraySource:
        for array in (*images.values(), *labels.values()):
            array.setflags(write=False)  # shared by every load through the cache
        mean, std = _channel_statistics(images["train"])
        return cls(images=images, labels=labels, class_names=tuple(class_names), mean=mean, std=std)

    @property
    def in_channels(self) -> int:
        return self.images["train"].shape[1]

    @property
    def native_size(self) -> int:
        return self.images["train"].shape[-1]

    def read_images(self, split: str, indices: np.ndarray, size: int) -> torch.Tensor:
        """Float32 (n, C, size, size) pixel/255 values of the samples at ``indices``."""
        selected = self.images[split][indices]  # fancy indexing copies: a writable array
        x = torch.from_numpy(selected).to(torch.float32)
        if selected.dtype == np.uint8:
            x /= 255
        return _resized(x, size)


def _channel_statistics(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of pixel/255 over all images.

    uint8 images go through a 256-bin histogram per channel: exact, and no float copy of the data.
    """
    means, stds = [], []
    for channel in range(images.shape[1]):
        if images.dtype == np.uint8:
            counts = np.bincount(images[:, channel].ravel(), minlength=256)
            values = np.arange(256) / 255.0
        else:
            values = images[:, channel].astype(np.float64).ravel()
            counts = np.ones_like(values)
        # np.sum's pairwise summation, not a BLAS dot: the dot's rounding depends on the thread
        # count, and these statistics are part of a store's identity, compared bit for bit.
        mean = float(np.sum(counts * values) / counts.sum())
        means.append(mean)
        stds.append(float(np.sqrt(np.sum(counts * (values - mean) ** 2) / counts.sum())))
    return tuple(means), tuple(stds)


# ----------------------------------------------------------------------------------------------
# The registry: one source function per dataset


class _Registered(NamedTuple):
    load: Callable  # (root, *, seed, download, **options) → _ArraySource | _ImageFolderSource
    options: tuple[str, ...]  # dataset-specific options it reads (in ``_OPTION_CHECKS``)


_REGISTRY: dict[str, _Registered] = {}


def register_dataset(name: str, options: Sequence[str] = ()):
    """Decorator adding a source ``fn(root, *, seed, download, **options)`` (full train and test
    splits, pixel statistics) to the registry; ``options`` names the dataset-specific keyword
    arguments of :func:`load_dataset` it reads, which are validated, passed and recorded in the spec."""
    unknown = [key for key in options if key not in _OPTION_CHECKS]
    if unknown:
        raise ValueError(f"unknown dataset options {unknown}; known: {', '.join(_OPTION_CHECKS)}")

    def decorate(fn):
        _REGISTRY[name] = _Registered(fn, tuple(options))
        return fn

    return decorate


def available_datasets() -> list[str]:
    """Registered dataset names, in registration order (the default, digits, first)."""
    return list(_REGISTRY)


_OPTION_CHECKS: dict[str, Callable] = {
    "shift": lambda value: _checked_int("shift", value, minimum=0, maximum=27),
    "shift_seed": lambda value: _checked_int("shift_seed", value, minimum=0),
    "snake_classes": lambda value: _checked_snake_classes(value),
}


@register_dataset("digits")
def _digits(root: Path, *, seed: int, download: bool) -> _ArraySource:
    return _digits_source(seed)


@register_dataset("mnist")
def _mnist(root: Path, *, seed: int, download: bool) -> _ArraySource:
    return _mnist_source(_mnist_files(root, download))


@register_dataset("mnist-shifted", options=("shift", "shift_seed"))
def _mnist_shifted(root: Path, *, seed: int, download: bool, shift: int, shift_seed: int) -> _ArraySource:
    return _mnist_shifted_source(_mnist_files(root, download), shift, shift_seed)


@register_dataset("cifar10")
def _cifar10(root: Path, *, seed: int, download: bool) -> _ArraySource:
    return _cifar10_source(_cifar10_files(root, download))


@register_dataset("snakes", options=("snake_classes",))
def _snakes(root: Path, *, seed: int, download: bool, snake_classes: tuple[str, ...]) -> _ImageFolderSource:
    return _snakes_source(root, snake_classes)


#: Known dataset names, from the registry.
DATASETS = tuple(_REGISTRY)


# ----------------------------------------------------------------------------------------------
# Files on disk


class _FileStamp(NamedTuple):
    """A file as a cache key: a replaced or rewritten file has another size or mtime."""

    path: Path
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> _FileStamp:
        status = path.stat()
        return cls(path.resolve(), status.st_size, status.st_mtime_ns)


def _download_hint(downloadable: bool) -> str:
    return _ROOT_HINT.format(download=", or add --download (download=True) to fetch it with torchvision"
                             if downloadable else "")


def _corrupt(path: Path, problem: str, downloadable: bool = True) -> DatasetError:
    remedy = ("delete it and rerun with --download (download=True), or point --data-root (LINCNN_DATA) at a "
              "good copy" if downloadable else "replace it, or point --data-root (LINCNN_DATA) at a good copy")
    return DatasetError(f"corrupt data file {path}: {problem}; {remedy}")


def _download(dataset_class_name: str, root: Path) -> None:
    """Let torchvision fetch (or finish fetching) a dataset into ``root``."""
    import torchvision.datasets

    try:
        getattr(torchvision.datasets, dataset_class_name)(str(root), train=True, download=True)
    except Exception as err:  # network, disk or checksum failure alike: the files are not there
        raise DatasetError(f"could not download {dataset_class_name} into {root}: {type(err).__name__}: {err}. "
                           f"Download it on a machine with network access and pass --data-root "
                           f"(LINCNN_DATA).") from None


def _mnist_files(root: Path, download: bool) -> tuple[_FileStamp, ...]:
    """The four MNIST files under ``root/MNIST/raw`` (uncompressed preferred, else .gz), in
    ``_MNIST_FILES`` order, downloading them first when they are missing and ``download``."""
    raw = root / "MNIST" / "raw"
    names = [name for split in _SPLITS for name in _MNIST_FILES[split]]

    def existing(name):
        return next((path for path in (raw / name, raw / f"{name}.gz") if path.is_file()), None)

    if download and any(existing(name) is None for name in names):
        _download("MNIST", root)
    paths = {name: existing(name) for name in names}
    missing = [name for name, path in paths.items() if path is None]
    if missing:
        raise DatasetError(f"MNIST not found in {root}: expected {raw}/<name> or <name>.gz for each of "
                           f"{', '.join(names)} (missing: {', '.join(missing)}). "
                           + _download_hint(downloadable=True))
    return tuple(_FileStamp.of(paths[name]) for name in names)


def _cifar10_files(root: Path, download: bool) -> tuple[_FileStamp, ...]:
    """The six CIFAR-10 batches under ``root/cifar-10-batches-py``, train batches first."""
    folder = root / "cifar-10-batches-py"
    names = [name for split in _SPLITS for name in _CIFAR10_FILES[split]]
    if download and not all((folder / name).is_file() for name in names):
        _download("CIFAR10", root)
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise DatasetError(f"CIFAR-10 not found in {root}: expected the python batches {', '.join(names)} in "
                           f"{folder} (missing: {', '.join(missing)}). " + _download_hint(downloadable=True))
    return tuple(_FileStamp.of(folder / name) for name in names)


# ----------------------------------------------------------------------------------------------
# MNIST and mnist-shifted


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """A uint8 IDX array (magic, big-endian sizes, then the values), gzip-compressed or not."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:  # truncated or damaged gzip stream
        raise _corrupt(path, f"{type(err).__name__}: {err}") from None
    header_size = 4 * (1 + ndim)
    if len(data) < header_size:
        raise _corrupt(path, f"only {len(data)} bytes, shorter than an IDX header")
    found_magic, *shape = struct.unpack(f">{1 + ndim}I", data[:header_size])
    if found_magic != magic:
        raise _corrupt(path, f"IDX magic number {found_magic}, expected {magic}")
    if len(data) != header_size + int(np.prod(shape)):
        raise _corrupt(path, f"{len(data) - header_size} data bytes but the header announces shape {tuple(shape)}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


@lru_cache(maxsize=2)
def _mnist_source(files: tuple[_FileStamp, ...]) -> _ArraySource:
    images, labels = {}, {}
    stamps = iter(files)
    for split in _SPLITS:
        image_file, label_file = next(stamps).path, next(stamps).path
        split_images = _read_idx(image_file, _IDX_IMAGES_MAGIC, ndim=3)
        split_labels = _read_idx(label_file, _IDX_LABELS_MAGIC, ndim=1)
        if len(split_images) != len(split_labels):
            raise _corrupt(label_file, f"{len(split_labels)} labels for the {len(split_images)} images of {image_file}")
        if split_labels.max(initial=0) > 9:
            raise _corrupt(label_file, f"label {split_labels.max()} outside 0..9")
        images[split] = split_images[:, None]  # (n, 1, 28, 28)
        labels[split] = split_labels.astype(np.int64)
    return _ArraySource.from_arrays(images, labels, [str(digit) for digit in range(10)])


@lru_cache(maxsize=2)
def _mnist_shifted_source(files: tuple[_FileStamp, ...], shift: int, shift_seed: int) -> _ArraySource:
    mnist = _mnist_source(files)
    images = {}
    for split, plain in mnist.images.items():
        images[split] = _shift_images(plain, shift_offsets(split, len(plain), shift, shift_seed))
    return _ArraySource.from_arrays(images, dict(mnist.labels), mnist.class_names)


def _shift_images(images: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Translate image i of ``images`` (n, C, H, W) by ``offsets[i]`` = (dx, dy), filling with zeros.

    Pixels pushed past the border are dropped (no wrap-around). Images sharing an offset are moved
    together by one slice assignment, so the cost is one pass over the data.
    """
    shifted = np.zeros_like(images)
    height, width = images.shape[-2:]
    unique_offsets, group = np.unique(offsets, axis=0, return_inverse=True)
    for number, (dx, dy) in enumerate(unique_offsets):
        members = np.flatnonzero(group.ravel() == number)
        # Output rows max(dy, 0) .. height + min(dy, 0) come from input rows shifted by −dy.
        shifted[members, :, max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
            images[members, :, max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)]
    return shifted


# ----------------------------------------------------------------------------------------------
# CIFAR-10


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR-10 batches but refuses to build anything except numpy arrays, since a
    pickle can otherwise run arbitrary code."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (n, 3, 32, 32) and labels int64 (n,) of one python batch file."""
    try:
        with open(path, "rb") as file:
            batch = _NumpyOnlyUnpickler(file, encoding="bytes").load()
    except Exception as err:  # damaged pickles fail in many ways (EOFError, UnpicklingError, ...)
        raise _corrupt(path, f"not a readable pickle ({type(err).__name__}: {err})") from None
    if not isinstance(batch, dict):
        raise _corrupt(path, f"holds a {type(batch).__name__}, expected a dict")
    batch = {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise _corrupt(path, f"keys {sorted(batch)}, expected 'data' and 'labels'")
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise _corrupt(path, f"data {data.dtype} {data.shape} with {len(labels)} labels, expected uint8 "
                             f"(n, 3072) with n labels")
    if labels.size and not 0 <= labels.min() <= labels.max() <= 9:
        raise _corrupt(path, "labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels  # each row holds the R, G and B planes, row-major


@lru_cache(maxsize=1)
def _cifar10_source(files: tuple[_FileStamp, ...]) -> _ArraySource:
    batches = {split: [] for split in _SPLITS}
    for stamp in files:
        split = "train" if stamp.path.name in _CIFAR10_FILES["train"] else "test"
        batches[split].append(_read_cifar10_batch(stamp.path))
    images = {split: np.concatenate([data for data, _ in batches[split]]) for split in _SPLITS}
    labels = {split: np.concatenate([labels for _, labels in batches[split]]) for split in _SPLITS}
    return _ArraySource.from_arrays(images, labels, CIFAR10_CLASSES)


# ----------------------------------------------------------------------------------------------
# digits (scikit-learn, no files)


@lru_cache(maxsize=4)
def _digits_source(seed: int) -> _ArraySource:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = torch.from_numpy(bunch.images / 16.0).to(torch.float32).unsqueeze(1)  # values 0..16 → [0, 1]
    images = F.interpolate(pixels, size=(28, 28), mode="bilinear", align_corners=False).numpy()
    labels = bunch.target.astype(np.int64)
    test = _stratified_subset(labels, DIGITS_TEST_SIZE, seed, "digits-test")
    train = np.setdiff1d(np.arange(len(labels)), test)
    return _ArraySource.from_arrays({"train": images[train], "test": images[test]},
                                    {"train": labels[train], "test": labels[test]}, [str(d) for d in range(10)])


# ----------------------------------------------------------------------------------------------
# snakes (an ImageNet image folder)


@dataclass(frozen=True, eq=False)
class _ImageFolderSource:
    """Image files listed per split, read and resized on demand (the full splits do not fit in memory)."""

    files: dict[str, list[Path]]
    labels: dict[str, np.ndarray]
    class_names: tuple[str, ...]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    in_channels: int = 3
    native_size: int = 224

    def read_images(self, split: str, indices: np.ndarray, size: int) -> torch.Tensor:
        """Float32 (n, 3, size, size) pixel/255 values: the shorter side resized to 256·size/224
        (bilinear, antialiased), then a center crop of size × size (ImageNet's 256 → 224 framing at
        any size, as torchvision's ``Resize`` and ``CenterCrop`` do)."""
        from PIL import Image

        resize_to = round(size * 256 / 224)
        x = torch.empty((len(indices), 3, size, size), dtype=torch.float32)
        for row, index in enumerate(indices):
            path = self.files[split][index]
            try:
                with Image.open(path) as image:
                    image = image.convert("RGB")
            except OSError as err:  # unreadable or truncated image (PIL.UnidentifiedImageError included)
                raise _corrupt(path, f"{type(err).__name__}: {err}", downloadable=False) from None
            short, long = sorted(image.size)
            resized_long = int(resize_to * long / short)
            width, height = (resize_to, resized_long) if image.width <= image.height else (resized_long, resize_to)
            image = image.resize((width, height), Image.Resampling.BILINEAR)
            left, top = round((width - size) / 2), round((height - size) / 2)
            image = image.crop((left, top, left + size, top + size))
            x[row] = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).to(torch.float32) / 255
        return x


def _snakes_source(root: Path, classes: tuple[str, ...]) -> _ImageFolderSource:
    base = root / "snakes"
    files, labels, empty = {}, {}, []
    for split, folder in (("train", "train"), ("test", "val")):
        files[split], split_labels = [], []
        for label, wnid in enumerate(classes):
            class_dir = base / folder / wnid
            images = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in _IMAGE_EXTENSIONS) \
                if class_dir.is_dir() else []
            if not images:
                empty.append(str(class_dir))
            files[split] += images
            split_labels += [label] * len(images)
        labels[split] = np.array(split_labels, dtype=np.int64)
    if empty:
        shown = ", ".join(empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        raise DatasetError(f"snakes not found in {root}: expected images ({', '.join(_IMAGE_EXTENSIONS)}) in "
                           f"{base}/{{train,val}}/<wnid>/ for each of {', '.join(classes)}; none in {shown}. "
                           f"ImageNet cannot be downloaded automatically: copy these classes from ILSVRC-2012 "
                           f"(validation images sorted into class folders). " + _download_hint(downloadable=False))
    names = tuple(SNAKE_CLASSES.get(wnid, wnid) for wnid in classes)
    return _ImageFolderSource(files=files, labels=labels, class_names=names)


# ----------------------------------------------------------------------------------------------
# Argument checks


def _checked_int(name: str, value, minimum: int, maximum: int | None = None, optional: bool = False) -> int | None:
    """``value`` as a plain int (JSON-serializable) after checking its range."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DatasetError(f"{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        allowed = f"at least {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise DatasetError(f"{name} must be {allowed}, got {value}")
    return int(value)


def _checked_snake_classes(classes: Sequence[str] | None) -> tuple[str, ...]:
    if classes is None:
        return tuple(SNAKE_CLASSES)
    classes = tuple(classes)
    if not classes or not all(isinstance(wnid, str) and wnid for wnid in classes):
        raise DatasetError(f"snake_classes must be a non-empty list of WordNet ids, got {classes!r}")
    if len(set(classes)) != len(classes):
        raise DatasetError(f"snake_classes lists a class twice: {', '.join(classes)}")
    return classes
