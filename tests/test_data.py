"""Tests of jacobian_store.datasets (datasets) and study.metrics (prediction rule).

Most tests use scikit-learn's digits or tiny synthetic files written to tmp_path; the tests marked
by the ``shared_data_root`` fixture check the real MNIST and CIFAR-10 against the values published
in shared/data/README.md, and skip where that copy is absent.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import struct
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from jacobian_store import datasets as data
from jacobian_store.arguments import add_data_arguments
from jacobian_store.datasets import (DATASETS, SNAKE_CLASSES, DatasetError, dataset_from_args,
                        dataset_from_spec, default_data_root, load_dataset, shift_offsets)
from study.metrics import accuracy, predict_classes

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


@pytest.fixture(autouse=True)
def empty_default_root(monkeypatch, tmp_path):
    """Point the default data root at an empty folder, so no test reads a user's cache."""
    monkeypatch.setenv("LINCNN_DATA", str(tmp_path / "default-root"))


def raw_pixels(split, spec) -> np.ndarray:
    """Undo the standardization: uint8 pixel values of a split (exact for pixel/255 data)."""
    mean = np.array(spec["normalization"]["mean"])[:, None, None]
    std = np.array(spec["normalization"]["std"])[:, None, None]
    return np.rint((split.x.double().numpy() * std + mean) * 255).astype(np.int64)


def naive_shift(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Reference translation of one (C, H, W) image, pixel by pixel: dropped past the border, zero fill."""
    shifted = np.zeros_like(image)
    height, width = image.shape[-2:]
    for y in range(height):
        for x in range(width):
            if 0 <= y + dy < height and 0 <= x + dx < width:
                shifted[:, y + dy, x + dx] = image[:, y, x]
    return shifted


def write_idx(path, array: np.ndarray, magic: int) -> None:
    """An IDX file (gzip-compressed when the name ends in .gz)."""
    payload = struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


@pytest.fixture(scope="module")
def tiny_mnist_root(tmp_path_factory):
    """A data root with synthetic MNIST files: 40 train (gzip), 20 test (uncompressed) samples, each an
    8×8 block of random pixels in the middle of a zero 28×28 image; labels cycle through 0..9."""
    root = tmp_path_factory.mktemp("tiny-mnist")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n, suffix in (("train", 40, ".gz"), ("t10k", 20, "")):
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        images[:, 10:18, 10:18] = rng.integers(1, 256, size=(n, 8, 8))
        write_idx(raw / f"{prefix}-images-idx3-ubyte{suffix}", images, 2051)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, 2049)
    return root


# ----------------------------------------------------------------------------------------------
# digits: the default, no files


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_needs_no_data_root(digits):
    assert (digits.name, digits.n_outputs, digits.in_channels, digits.image_size) == ("digits", 10, 1, 28)
    assert digits.train.x.shape == (1297, 1, 28, 28) and digits.test.x.shape == (500, 1, 28, 28)
    assert digits.train.x.dtype == torch.float32 and digits.train.labels.dtype == torch.int64
    assert torch.bincount(digits.test.labels).tolist() == [50] * 10  # a class-balanced test split
    assert digits.spec["source_sizes"] == {"train": 1297, "test": 500}  # all 1,797 images
    assert torch.equal(digits.train.targets, torch.nn.functional.one_hot(digits.train.labels, 10).float())
    assert abs(digits.train.x.mean().item()) < 1e-5 and abs(digits.train.x.std().item() - 1) < 1e-3
    mean, std = digits.spec["normalization"]["mean"][0], digits.spec["normalization"]["std"][0]
    pixels = digits.train.x * std + mean
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6  # 0..16 mapped into [0, 1]


def test_digits_split_depends_on_seed():
    other = load_dataset("digits", seed=1, n_train=20, n_test=20)
    same = load_dataset("digits", seed=1, n_train=20, n_test=20)
    default = load_dataset("digits", n_train=20, n_test=20)
    assert torch.equal(other.test.x, same.test.x)
    assert not torch.equal(other.test.x, default.test.x)


def test_stratified_subsets_are_balanced_seeded_and_nested():
    first = load_dataset("digits", n_train=100, n_test=30, seed=3)
    again = load_dataset("digits", n_train=100, n_test=30, seed=3)
    other_seed = load_dataset("digits", n_train=100, n_test=30, seed=4)
    assert torch.bincount(first.train.labels).tolist() == [10] * 10
    assert torch.bincount(first.test.labels).tolist() == [3] * 10
    assert np.array_equal(first.train.indices, again.train.indices) and torch.equal(first.train.x, again.train.x)
    assert not np.array_equal(first.train.indices, other_seed.train.indices)
    assert first.train.indices.dtype == np.int64 and np.all(np.diff(first.train.indices) > 0)
    uneven = load_dataset("digits", n_train=105, seed=3)
    counts = torch.bincount(uneven.train.labels)
    assert counts.sum() == 105 and counts.max() - counts.min() == 1
    assert set(first.train.indices) <= set(uneven.train.indices)  # same seed, more samples: a superset


def test_balanced_counts_fill_from_larger_classes_when_one_is_small():
    labels = np.repeat([0, 1, 2], [2, 10, 10])
    subset = data._stratified_subset(labels, 15, seed=0, stream="train")
    assert sorted(np.bincount(labels[subset]).tolist()) == [2, 6, 7]
    assert np.array_equal(data._stratified_subset(labels, 22, seed=0, stream="train"), np.arange(22))


def test_binary_targets():
    dataset = load_dataset("digits", n_train=40, binary=3)
    assert dataset.n_outputs == 1 and dataset.train.targets.shape == (40, 1)
    assert torch.equal(dataset.train.targets[:, 0], (dataset.train.labels == 3).float())
    assert dataset.train.targets.sum() == 4  # 4 of 40 balanced samples are threes
    assert dataset.spec["binary"] == 3


@pytest.mark.parametrize("options, message", [
    ({"binary": 10}, "binary"), ({"binary": -1}, "binary"), ({"binary": True}, "binary"),
    ({"n_train": 2000}, "1297"), ({"n_test": 0}, "n_test"), ({"image_size": "28"}, "image_size"),
    ({"seed": -1}, "seed"),
])
def test_invalid_options_are_clear_errors(options, message):
    with pytest.raises(DatasetError, match=message):
        load_dataset("digits", **options)


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(DatasetError) as error:
        load_dataset("imagenet")
    assert all(name in str(error.value) for name in DATASETS)
    assert isinstance(error.value, ValueError)


def test_datasets_come_from_the_registry(monkeypatch):
    from jacobian_store import datasets

    assert DATASETS == tuple(datasets.available_datasets()) == ("digits", "mnist", "mnist-shifted", "cifar10",
                                                                "snakes")
    monkeypatch.setattr(datasets, "_REGISTRY", dict(datasets._REGISTRY))
    seen = {}

    @datasets.register_dataset("stripes", options=("shift",))
    def _stripes(root, *, seed, download, shift):
        seen.update(seed=seed, shift=shift)
        rng = np.random.default_rng(seed)
        images = {split: rng.integers(0, 256, size=(n, 1, 6, 6), dtype=np.uint8) for split, n in
                  (("train", 40), ("test", 20))}
        labels = {split: np.arange(len(images[split])) % 4 for split in images}
        return datasets._ArraySource.from_arrays(images, labels, ["a", "b", "c", "d"])

    dataset = load_dataset("stripes", n_train=8, seed=3, shift=2)
    assert "stripes" in datasets.available_datasets() and seen == {"seed": 3, "shift": 2}
    assert dataset.n_outputs == 4 and dataset.train.x.shape == (8, 1, 6, 6)
    # the options the source reads are recorded, the others stay None
    assert dataset.spec["shift"] == 2 and dataset.spec["shift_seed"] is None and dataset.spec["snake_classes"] is None
    with pytest.raises(DatasetError, match="shift"):
        load_dataset("stripes", shift=-1)
    with pytest.raises(ValueError, match="unknown dataset options"):
        datasets.register_dataset("bad", options=("colour",))


def test_image_size_resizes():
    dataset = load_dataset("digits", n_train=10, n_test=10, image_size=64)
    assert dataset.train.x.shape == (10, 1, 64, 64) and dataset.image_size == 64 == dataset.spec["image_size"]


def test_spec_round_trip_through_json_is_bit_identical():
    dataset = load_dataset("digits", n_train=60, n_test=30, binary=2, seed=5, image_size=32)
    rebuilt = dataset_from_spec(json.loads(json.dumps(dataset.spec)))
    for split in ("train", "test"):
        original, copy = getattr(dataset, split), getattr(rebuilt, split)
        assert torch.equal(original.x, copy.x) and torch.equal(original.targets, copy.targets)
        assert torch.equal(original.labels, copy.labels) and np.array_equal(original.indices, copy.indices)
    assert rebuilt.spec == dataset.spec


def test_spec_of_other_data_or_incomplete_spec_is_refused():
    spec = load_dataset("digits", n_train=20, n_test=20).spec
    with pytest.raises(DatasetError, match="differ"):
        dataset_from_spec({**spec, "normalization": {"mean": [0.5], "std": [0.25]}})
    with pytest.raises(DatasetError, match="seed"):
        dataset_from_spec({key: value for key, value in spec.items() if key != "seed"})


def test_command_line_options():
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    args = parser.parse_args(["--n-train", "30", "--n-test", "20", "--binary", "1", "--data-seed", "2"])
    dataset = dataset_from_args(args)
    assert (dataset.name, dataset.spec["n_train"], dataset.spec["binary"], dataset.spec["seed"]) == ("digits", 30, 1, 2)
    args = parser.parse_args(["--dataset", "snakes", "--snake-classes", "n01728572, n01742172", "--image-size", "64"])
    assert args.snake_classes == ["n01728572", "n01742172"] and args.image_size == 64
    assert "LINCNN_DATA" in parser.format_help()


def test_default_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("LINCNN_DATA", str(tmp_path / "data"))
    assert default_data_root() == tmp_path / "data"
    monkeypatch.delenv("LINCNN_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_data_root() == tmp_path / "cache" / "lincnn"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_root() == tmp_path / "home" / ".cache" / "lincnn"


# ----------------------------------------------------------------------------------------------
# MNIST and mnist-shifted files (synthetic)


def test_synthetic_mnist_reads_gzip_and_uncompressed_files(tiny_mnist_root):
    dataset = load_dataset("mnist", data_root=tiny_mnist_root)
    assert dataset.train.x.shape == (40, 1, 28, 28) and dataset.test.x.shape == (20, 1, 28, 28)
    assert dataset.test.labels.tolist() == [i % 10 for i in range(20)]
    pixels = raw_pixels(dataset.train, dataset.spec)
    assert pixels[:, :, :10].max() == 0 and pixels[:, :, 10:18, 10:18].min() >= 1


def test_missing_data_root_names_files_and_options(tmp_path):
    for name, expected_file in (("mnist", "train-images-idx3-ubyte"), ("mnist-shifted", "t10k-labels-idx1-ubyte"),
                                ("cifar10", "data_batch_1")):
        with pytest.raises(DatasetError) as error:
            load_dataset(name, data_root=tmp_path)
        message = str(error.value)
        assert all(part in message for part in (expected_file, "--data-root", "LINCNN_DATA", "--download"))
    with pytest.raises(DatasetError, match="default-root"):  # the default root comes from LINCNN_DATA
        load_dataset("mnist")


def test_corrupt_files_are_clear_errors(tiny_mnist_root, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for file in (tiny_mnist_root / "MNIST" / "raw").iterdir():
        (raw / file.name).write_bytes(file.read_bytes())
    images = raw / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:200])  # a truncated download
    with pytest.raises(DatasetError, match="corrupt.*train-images-idx3-ubyte.gz"):
        load_dataset("mnist", data_root=tmp_path)
    images.unlink()
    write_idx(raw / "train-images-idx3-ubyte", np.zeros((40, 28, 28)), 2049)  # a label file's magic number
    with pytest.raises(DatasetError, match="magic"):
        load_dataset("mnist", data_root=tmp_path)
    write_idx(raw / "train-images-idx3-ubyte", np.zeros((39, 28, 28)), 2051)  # one image short of the labels
    with pytest.raises(DatasetError, match="40 labels"):
        load_dataset("mnist", data_root=tmp_path)


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    # A stand-in for torchvision.datasets, whose import alone takes seconds.
    fake_datasets = types.ModuleType("torchvision.datasets")
    fake_datasets.MNIST = offline
    fake_torchvision = types.ModuleType("torchvision")
    fake_torchvision.datasets = fake_datasets
    monkeypatch.setitem(sys.modules, "torchvision", fake_torchvision)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", fake_datasets)
    with pytest.raises(DatasetError, match="could not download MNIST.*unreachable"):
        load_dataset("mnist", data_root=tmp_path, download=True)


def test_shift_offsets_are_uniform_integers_in_range():
    offsets = shift_offsets("train", 5000, shift=3, shift_seed=0)
    assert offsets.shape == (5000, 2) and offsets.dtype == np.int64
    assert set(np.unique(offsets)) == set(range(-3, 4))
    assert not np.array_equal(offsets[:100], shift_offsets("test", 100, shift=3, shift_seed=0))
    assert not np.array_equal(offsets[:100], shift_offsets("train", 100, shift=3, shift_seed=1))


def test_shifted_digits_are_translated_with_zero_fill_and_no_wrap(tiny_mnist_root):
    plain = load_dataset("mnist", data_root=tiny_mnist_root)
    # s = 15 pushes some 8×8 blocks partly out of the 28×28 frame.
    shifted = load_dataset("mnist-shifted", data_root=tiny_mnist_root, shift=15, shift_seed=2)
    for split in ("train", "test"):
        before, after = raw_pixels(getattr(plain, split), plain.spec), raw_pixels(getattr(shifted, split), shifted.spec)
        offsets = shift_offsets(split, len(before), shift=15, shift_seed=2)
        for image, moved, (dx, dy) in zip(before, after, offsets):
            assert np.array_equal(moved, naive_shift(image, dx, dy))
        inside = np.all((offsets >= -10) & (offsets <= 10), axis=1)  # the block spans 10..17 of 0..27
        assert inside.any() and not inside.all()
        mass_before, mass_after = before.sum(axis=(1, 2, 3)), after.sum(axis=(1, 2, 3))
        assert np.array_equal(mass_after[inside], mass_before[inside])
        assert np.all(mass_after[~inside] < mass_before[~inside])


def test_shift_of_a_sample_does_not_depend_on_the_subset(tiny_mnist_root):
    small = load_dataset("mnist-shifted", data_root=tiny_mnist_root, n_train=20, seed=0)
    other = load_dataset("mnist-shifted", data_root=tiny_mnist_root, n_train=30, seed=1)
    common, in_small, in_other = np.intersect1d(small.train.indices, other.train.indices, return_indices=True)
    assert len(common) >= 10
    assert torch.equal(small.train.x[in_small], other.train.x[in_other])
    assert small.spec["normalization"] == other.spec["normalization"]  # statistics of the full shifted split


def test_shifted_spec_round_trip(tiny_mnist_root):
    dataset = load_dataset("mnist-shifted", data_root=tiny_mnist_root, n_train=20, n_test=10, shift=4, shift_seed=9)
    rebuilt = dataset_from_spec(json.loads(json.dumps(dataset.spec)), data_root=tiny_mnist_root)
    assert torch.equal(dataset.train.x, rebuilt.train.x) and torch.equal(dataset.test.x, rebuilt.test.x)
    assert (rebuilt.spec["shift"], rebuilt.spec["shift_seed"]) == (4, 9)


# ----------------------------------------------------------------------------------------------
# CIFAR-10 files (synthetic)


def write_cifar_batches(folder, rows_per_batch=10, corrupt_with=None):
    """Python-2 style batches of random images; ``corrupt_with`` replaces data_batch_3's contents."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, size=(rows_per_batch, 3072), dtype=np.uint8),
                 b"labels": [i % 10 for i in range(rows_per_batch)], b"batch_label": name.encode()}
        with open(folder / name, "wb") as file:
            pickle.dump(batch, file, protocol=2)
    if corrupt_with is not None:
        (folder / "data_batch_3").write_bytes(corrupt_with)


def test_synthetic_cifar10(tmp_path):
    write_cifar_batches(tmp_path / "cifar-10-batches-py")
    dataset = load_dataset("cifar10", data_root=tmp_path, n_test=10)
    assert dataset.train.x.shape == (50, 3, 32, 32) and dataset.in_channels == 3
    assert dataset.class_names[0] == "airplane" and dataset.spec["source_sizes"] == {"train": 50, "test": 10}
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "rb") as file:
        batch_2 = pickle.load(file)
    assert np.array_equal(raw_pixels(dataset.train, dataset.spec)[10:20].reshape(10, -1), batch_2[b"data"])


@pytest.mark.parametrize("contents, message", [
    (b"\x80\x02}q\x00(U\x04data", "not a readable pickle"),  # truncated
    (pickle.dumps({b"data": os.getcwd}, protocol=2), "unexpected object posix.getcwd"),  # code, not data
    (pickle.dumps({b"labels": [0]}, protocol=2), "expected 'data' and 'labels'"),
])
def test_corrupt_cifar10_batches_are_clear_errors(tmp_path, contents, message):
    write_cifar_batches(tmp_path / "cifar-10-batches-py", corrupt_with=contents)
    with pytest.raises(DatasetError, match=f"data_batch_3.*{message}"):
        load_dataset("cifar10", data_root=tmp_path)


# ----------------------------------------------------------------------------------------------
# snakes (a synthetic image folder)

CLASS_COLORS = np.random.default_rng(2).integers(0, 256, size=(len(SNAKE_CLASSES), 3))


@pytest.fixture(scope="module")
def tiny_snakes_root(tmp_path_factory):
    """snakes/{train,val}/<wnid>/ with 2 train and 1 val 20×14 PNG per class, each of one flat color."""
    root = tmp_path_factory.mktemp("tiny-snakes")
    for folder, count in (("train", 2), ("val", 1)):
        for wnid, color in zip(SNAKE_CLASSES, CLASS_COLORS):
            class_dir = root / "snakes" / folder / wnid
            class_dir.mkdir(parents=True)
            for number in range(count):
                Image.new("RGB", (20, 14), tuple(int(c) for c in color)).save(class_dir / f"{wnid}_{number}.png")
    return root


def test_snakes_image_folder(tiny_snakes_root):
    dataset = load_dataset("snakes", data_root=tiny_snakes_root, image_size=8)
    assert dataset.train.x.shape == (20, 3, 8, 8) and dataset.test.x.shape == (10, 3, 8, 8)
    assert dataset.class_names[0] == "thunder snake" and dataset.class_names[-1] == "boa constrictor"
    assert dataset.spec["snake_classes"] == list(SNAKE_CLASSES) and dataset.n_outputs == 10
    assert dataset.spec["normalization"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    expected = (CLASS_COLORS[dataset.train.labels.numpy()] / 255 - IMAGENET_MEAN) / IMAGENET_STD
    assert np.allclose(dataset.train.x.numpy(), expected[:, :, None, None], atol=1e-5)


def test_snakes_class_list_and_default_size(tiny_snakes_root):
    chosen = ["n01742172", "n01728572"]
    dataset = load_dataset("snakes", data_root=tiny_snakes_root, snake_classes=chosen, n_train=2)
    assert dataset.class_names == ["boa constrictor", "thunder snake"] and dataset.n_outputs == 2
    assert dataset.train.x.shape == (2, 3, 224, 224) and dataset.image_size == 224
    assert torch.bincount(dataset.train.labels).tolist() == [1, 1]
    expected = (CLASS_COLORS[9] / 255 - IMAGENET_MEAN) / IMAGENET_STD  # label 0 is now the boa constrictor
    assert np.allclose(dataset.train.x[dataset.train.labels == 0].numpy(), expected[:, None, None], atol=1e-5)


def test_snakes_missing_class_or_bad_image(tiny_snakes_root, tmp_path):
    with pytest.raises(DatasetError, match="n09999999.*--data-root"):
        load_dataset("snakes", data_root=tiny_snakes_root, snake_classes=["n01728572", "n09999999"])
    class_dir = tmp_path / "snakes" / "train" / "n01728572"
    class_dir.mkdir(parents=True)
    (class_dir / "broken.JPEG").write_bytes(b"not an image")
    (tmp_path / "snakes" / "val" / "n01728572").mkdir(parents=True)
    (tmp_path / "snakes" / "val" / "n01728572" / "fine.png").write_bytes(
        (tiny_snakes_root / "snakes" / "val" / "n01728572" / "n01728572_0.png").read_bytes())
    with pytest.raises(DatasetError, match="broken.JPEG"):
        load_dataset("snakes", data_root=tmp_path, snake_classes=["n01728572"], image_size=8)


# ----------------------------------------------------------------------------------------------
# Real MNIST and CIFAR-10 (shared/data), checked against shared/data/README.md


def test_real_mnist(shared_data_root):
    mnist = load_dataset("mnist", data_root=shared_data_root)
    assert mnist.train.x.shape == (60000, 1, 28, 28) and mnist.test.x.shape == (10000, 1, 28, 28)
    assert torch.bincount(mnist.train.labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(mnist.test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert mnist.spec["normalization"]["mean"][0] == pytest.approx(0.130660, abs=1e-6)
    assert mnist.spec["normalization"]["std"][0] == pytest.approx(0.308108, abs=1e-6)
    std, mean = torch.std_mean(mnist.train.x)
    assert abs(mean.item()) < 1e-5 and abs(std.item() - 1) < 1e-5


def test_real_shifted_mnist(shared_data_root):
    plain = load_dataset("mnist", data_root=shared_data_root, n_train=30, n_test=10)
    shifted = load_dataset("mnist-shifted", data_root=shared_data_root, n_train=30, n_test=10)
    assert np.array_equal(plain.train.indices, shifted.train.indices)  # same seed and labels: same subset
    offsets = shift_offsets("train", 60000, shift=7, shift_seed=0)[plain.train.indices]
    before, after = raw_pixels(plain.train, plain.spec), raw_pixels(shifted.train, shifted.spec)
    for image, moved, (dx, dy) in zip(before, after, offsets):
        assert np.array_equal(moved, naive_shift(image, dx, dy))
    # Zero fill lowers the mean a little: the statistics are those of the shifted training split.
    assert 0.12 < shifted.spec["normalization"]["mean"][0] < plain.spec["normalization"]["mean"][0]
    other = load_dataset("mnist-shifted", data_root=shared_data_root, n_train=40, seed=7)
    common, in_shifted, in_other = np.intersect1d(shifted.train.indices, other.train.indices, return_indices=True)
    assert torch.equal(shifted.train.x[in_shifted], other.train.x[in_other])


def test_real_cifar10(shared_data_root):
    cifar = load_dataset("cifar10", data_root=shared_data_root, n_train=50, n_test=20)
    assert cifar.spec["source_sizes"] == {"train": 50000, "test": 10000}
    assert cifar.spec["normalization"]["mean"] == pytest.approx([0.4914, 0.4822, 0.4465], abs=1e-4)
    assert cifar.spec["normalization"]["std"] == pytest.approx([0.2470, 0.2435, 0.2616], abs=1e-4)
    # The parsed source (cached by the load above) against the published raw values.
    source = data._cifar10_source(data._cifar10_files(shared_data_root, download=False))
    rows = source.images["train"].reshape(50000, 3072)
    assert rows[0, :3].tolist() == [59, 43, 50] and rows[0, -3:].tolist() == [140, 84, 72]
    assert rows[9999, :3].tolist() == [62, 61, 60] and rows[9999, -3:].tolist() == [130, 130, 131]
    assert source.images["test"].reshape(10000, 3072)[0, :3].tolist() == [158, 159, 165]
    batch_1_histogram = [1005, 974, 1032, 1016, 999, 937, 1030, 1001, 1025, 981]
    assert np.bincount(source.labels["train"][:10000]).tolist() == batch_1_histogram
    assert np.bincount(source.labels["train"]).tolist() == [5000] * 10
    assert source.labels["test"][:5].tolist() == [3, 8, 8, 0, 6]
    assert np.array_equal(raw_pixels(cifar.train, cifar.spec), source.images["train"][cifar.train.indices])


# ----------------------------------------------------------------------------------------------
# metrics


def test_predict_classes_numpy_and_torch():
    outputs = np.array([[0.1, 0.7, 0.2], [0.5, 0.5, 0.0], [-1.0, -2.0, -0.5]])
    assert predict_classes(outputs, binary=False).tolist() == [1, 0, 2]  # ties go to the lowest class
    assert torch.equal(predict_classes(torch.tensor(outputs), binary=False), torch.tensor([1, 0, 2]))
    binary_outputs = np.array([[0.2], [0.5], [0.51], [3.0]])
    assert predict_classes(binary_outputs, binary=True).tolist() == [0, 0, 1, 1]  # 0.5 is not above 0.5
    predicted = predict_classes(torch.tensor(binary_outputs), binary=True)
    assert predicted.dtype == torch.int64 and predicted.tolist() == [0, 0, 1, 1]


def test_accuracy_on_hand_made_examples():
    outputs = np.array([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.4, 0.6, 0.0]])
    targets = np.eye(3)[[0, 2, 0]]
    assert accuracy(outputs, targets) == pytest.approx(2 / 3)
    assert accuracy(torch.tensor(outputs), targets) == pytest.approx(2 / 3)  # torch and numpy mix
    binary_outputs = np.array([[0.7], [0.5], [0.2], [0.9]])
    binary_targets = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    assert accuracy(binary_outputs, binary_targets) == 0.5
    assert accuracy(binary_targets, binary_targets) == 1.0
    with pytest.raises(ValueError, match="shape"):
        accuracy(outputs, targets[:, :2])
