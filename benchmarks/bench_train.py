"""Cost of one matrix-free linearized training step against one standard step, in one run.

LeNet at each width on MNIST-sized inputs (digits, 10 outputs), batch 32: the median wall time of
interleaved standard and linearized SGD steps (``study.train``'s own trainers, the same code
``bin/train`` runs). Target (issue 4): the linearized step costs about 2-3 standard steps, not L
backward passes.

    .venv/bin/python benchmarks/bench_train.py [--widths 1 5] [--steps 15]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from jacobian_store.datasets import load_dataset
from study.train import _TRAINERS, TrainConfig, initial_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=float, nargs="+", default=[1, 5])
    parser.add_argument("--steps", type=int, default=15, help="timed steps of each kind (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    dataset = load_dataset("digits", n_train=args.batch_size, n_test=10)
    x, y = dataset.train.x, dataset.train.targets
    print(f"torch threads: {torch.get_num_threads()}; batch {args.batch_size}; median of {args.steps} steps\n")
    print("| width | standard step (ms) | linearized step (ms) | ratio |\n|---:|---:|---:|---:|")
    for width in args.widths:
        config = TrainConfig(arch="lenet", width=width, model_seed=0, epochs=1, lr=1e-3, weight_decay=5e-5,
                             batch_size=args.batch_size)
        trainers = {kind: _TRAINERS[kind](initial_model(config, dataset), config) for kind in _TRAINERS}
        seconds = {kind: [] for kind in trainers}
        for step in range(args.steps + 1):
            for kind, trainer in trainers.items():  # interleaved, so load changes hit both alike
                started = time.perf_counter()
                trainer.step(x, y, config.lr)
                if step:  # the first step of each is a warm-up
                    seconds[kind].append(time.perf_counter() - started)
        standard, linearized = (statistics.median(seconds[k]) * 1e3 for k in ("standard", "linearized"))
        print(f"| {width:g} | {standard:.1f} | {linearized:.1f} | {linearized / standard:.2f}× |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
