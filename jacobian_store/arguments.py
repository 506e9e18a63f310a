"""The command-line options every command shares: the network at w0 and the data.

Kept apart from ``architectures`` and ``datasets`` (which need torch) so that building a parser does
not import torch: ``bin/solve --store`` on a stored J computes with NumPy only, and torch's import
(about 1.5 s) would be a third of a small store's whole command. The choices of ``--arch`` and
``--dataset`` are the registries' names, read when an option is checked or ``--help`` is printed.
"""
from __future__ import annotations

import argparse
import importlib
import math
from pathlib import Path


class _RegistryNames:
    """The names of a registry, as argparse ``choices``: imported on first use (a check or --help)."""

    def __init__(self, module: str, function: str):
        self.module, self.function = module, function

    def _names(self) -> list[str]:
        return getattr(importlib.import_module(self.module), self.function)()

    def __iter__(self):
        return iter(self._names())

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __eq__(self, other) -> bool:
        return isinstance(other, _RegistryNames) and (self.module, self.function) == (other.module, other.function)

    def __hash__(self) -> int:
        return hash((self.module, self.function))


NETWORK_DTYPES = ("float32", "float64")


def add_network_arguments(parser: argparse.ArgumentParser, *, seed_flag: str = "--seed", dtype_flag: str = "--dtype",
                          dtype_help: str = "dtype of J (default float32)", title: str = "network"):
    """Add the options naming a network at w0 (``--arch``, ``--width``, the seed of w0 and the dtype
    of its Jacobian) as one argument group, shared by ``bin/build-jacobian`` and ``bin/solve``.

    ``seed_flag``/``dtype_flag``: where a command already uses ``--seed`` or ``--dtype`` for something
    else (``bin/solve``: ``--init-seed``, ``--network-dtype``); argparse names the attributes after
    the flags (``args.seed`` or ``args.init_seed``). ``--width`` is checked positive and finite here.
    Returns the group, for a command's own network options.
    """
    group = parser.add_argument_group(title)
    group.add_argument("--arch", default="lenet", choices=_RegistryNames("jacobian_store.architectures", "available_models"),
                       help="architecture (default lenet)")
    group.add_argument("--width", type=float, default=1.0, action=_WidthAction,
                       help="width factor k: every hidden channel and unit count is multiplied by k (default 1)")
    seed_help = "seed of the initialization w0 (default 0)"
    if seed_flag != "--seed":
        seed_help = "seed of the initialization w0: bin/build-jacobian's --seed (default 0)"
    group.add_argument(seed_flag, type=int, default=0, help=seed_help)
    group.add_argument(dtype_flag, choices=NETWORK_DTYPES, default="float32", help=dtype_help)
    return group


class _WidthAction(argparse.Action):
    """Stores --width after checking it is a positive finite number."""

    def __call__(self, parser, namespace, value, option_string=None):
        if not (math.isfinite(value) and value > 0):
            parser.error(f"{option_string} must be a positive number, got {value}")
        setattr(namespace, self.dest, value)


def add_data_arguments(parser: argparse.ArgumentParser, default_dataset: str = "digits") -> None:
    """Add the data options (``--dataset``, ``--data-root``, ...) read by
    ``jacobian_store.datasets.dataset_from_args``."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", choices=_RegistryNames("jacobian_store.datasets", "available_datasets"),
                       default=default_dataset, help=f"dataset to use (default: {default_dataset}; digits needs no files)")
    group.add_argument("--data-root", type=Path, default=None, metavar="DIR",
                       help="folder holding MNIST/raw/, cifar-10-batches-py/ or snakes/ (default: $LINCNN_DATA, "
                            "else $XDG_CACHE_HOME/lincnn or ~/.cache/lincnn)")
    group.add_argument("--n-train", type=int, default=None, metavar="N",
                       help="class-balanced random subset of N training samples (default: all)")
    group.add_argument("--n-test", type=int, default=None, metavar="N",
                       help="class-balanced random subset of N test samples (default: all)")
    group.add_argument("--binary", type=int, default=None, metavar="C",
                       help="one output: target 1 for class C, 0 for every other class (default: one-hot)")
    group.add_argument("--data-seed", type=int, default=0, metavar="SEED",
                       help="seed of the subsets and of the digits train/test split (default: 0)")
    group.add_argument("--shift", type=int, default=7, metavar="S",
                       help="mnist-shifted: offsets (dx, dy) uniform on [-S, S]^2 (default: 7)")
    group.add_argument("--shift-seed", type=int, default=0, metavar="SEED",
                       help="mnist-shifted: seed of the per-sample offsets; independent of --data-seed so a "
                            "sample is shifted alike in every subset (default: 0)")
    group.add_argument("--image-size", type=int, default=None, metavar="P",
                       help="resize images to P x P, e.g. 224 for AlexNet, which needs at least 63 "
                            "(default: native size; 224 for snakes)")
    group.add_argument("--snake-classes", type=_comma_separated, default=None, metavar="WNID,...",
                       help="snakes: comma-separated WordNet ids in label order (default: the 10 classes of "
                            "jacobian_store.datasets.SNAKE_CLASSES)")
    group.add_argument("--download", action="store_true",
                       help="let torchvision download missing MNIST or CIFAR-10 files into the data root")


def _comma_separated(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]
