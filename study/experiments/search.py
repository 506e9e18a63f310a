"""Hyperparameter search (``bin/study ... --search``): per model and width, a grid over learning rates
and weight decays, each trial trained on the training split less a validation split and scored on
the validation split. The best trial (highest validation accuracy, ties to the lower validation
loss) gives the lr and weight_decay the main grid then uses for that model and width.

Trials are units like any other: one JSON record each under ``search/``, skipped when done, so an
interrupted search resumes. The validation split is a seeded random ``validation_fraction`` of the
training split (seed ``search.seed``), the same for every trial; trials use the first grid seed.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from .records import Clock, load_records, make_record, read_record, settings_digest, write_json_atomic


def validation_dataset(dataset, fraction: float, seed: int):
    """``dataset`` with its training split cut in two: train on the rest, the ``test`` split is the
    validation part. Recorded in ``spec["validation"]``."""
    from jacobian_store.datasets import Dataset, Split

    n = dataset.train.x.shape[0]
    n_val = max(1, int(round(fraction * n)))
    if n_val >= n:
        raise ValueError(f"validation_fraction {fraction} leaves no training samples out of {n}")
    order = np.random.default_rng([seed, 104729]).permutation(n)  # a stream of its own
    val, rest = np.sort(order[:n_val]), np.sort(order[n_val:])

    def take(idx):
        t = dataset.train
        index = torch.from_numpy(idx)
        return Split(x=t.x[index], labels=t.labels[index], targets=t.targets[index], indices=t.indices[idx])

    spec = {**dataset.spec, "validation": {"fraction": fraction, "seed": seed, "n_validation": int(n_val)}}
    return Dataset(name=dataset.name, train=take(rest), test=take(val), n_outputs=dataset.n_outputs,
                   in_channels=dataset.in_channels, image_size=dataset.image_size,
                   class_names=list(dataset.class_names), spec=spec)


def search_trials(runner) -> list[tuple]:
    """(variant, model, width, lr, weight_decay) of every trial."""
    exp = runner.exp
    s = exp.search
    return [(v["label"], model, width, float(lr), float(wd))
            for v in exp.variants for model in exp.grid["models"] for width in sorted(exp.grid["widths"])
            for lr in s["lrs"] for wd in s["weight_decays"]]


def trial_key(variant, model, width, lr, wd) -> str:
    from .records import unit_key

    return f"{unit_key(variant, model, width, 0)[:-4]}__lr{lr:g}__wd{wd:g}"


def run_search(runner) -> dict[tuple, dict]:
    """Run (or resume) every trial; return the selection (variant, model, width) → {lr, weight_decay}."""
    from study.train import train

    from jacobian_store.progress import progress_bar, progress_write

    from .records import Unit

    exp = runner.exp
    s = exp.search
    seed = exp.grid["seeds"][0]
    epochs = s.get("epochs", exp.train["epochs"])
    trials = search_trials(runner)
    datasets = {}
    for trial in progress_bar(trials, desc=f"{exp.name} search", unit="trial", enabled=runner.progress):
        variant, model, width, lr, wd = trial
        key = trial_key(*trial)
        unit = Unit(variant, model, width, seed)
        config = runner.train_config(unit, model, {"lr": lr, "weight_decay": wd}, epochs=epochs)
        settings = {"experiment": exp.name, "dataset": exp.variant_dataset(variant), "arch": exp.grid["arch"],
                    "model": model, "validation_fraction": s["validation_fraction"], "validation_seed": s["seed"],
                    "train": {k: v for k, v in dataclasses.asdict(config).items()
                              if k not in ("device", "eval_batch_size")}}
        path = runner.run_dir / "search" / f"{key}.json"
        existing = read_record(path)
        if existing is not None and existing.get("settings_digest") == settings_digest(settings):
            continue
        if variant not in datasets:
            datasets[variant] = validation_dataset(runner.dataset(variant), s["validation_fraction"], s["seed"])
        with Clock() as clock:
            result = train(config, datasets[variant], model, progress=False)
        final = result.final
        metrics = {"lr": lr, "weight_decay": wd, "val_acc": final["test_acc"], "val_loss": final["test_loss"],
                   "train_acc": final["train_acc"], "train_loss": final["train_loss"], "diverged": result.diverged}
        write_json_atomic(path, make_record(key, {"variant": variant, "name": model, "width": width, "seed": seed},
                                            settings, metrics, clock.seconds))
        if runner.progress:
            progress_write(f"search {key}: validation acc {metrics['val_acc']:.4f} ({clock.seconds:.1f} s)")
    selection = select(load_records(runner.run_dir, "search"))
    write_json_atomic(runner.run_dir / "search_selection.json",
                      {"selected": [{"variant": v, "model": m, "width": w, **h} for (v, m, w), h in selection.items()]})
    return selection


def _score(metrics: dict) -> tuple:
    acc, loss = metrics["val_acc"], metrics["val_loss"]
    acc = acc if isinstance(acc, float) and math.isfinite(acc) and not metrics.get("diverged") else -math.inf
    loss = loss if isinstance(loss, float) and math.isfinite(loss) else math.inf
    return acc, -loss


def select(records: list[dict]) -> dict[tuple, dict]:
    """The best trial per (variant, model, width): highest validation accuracy, then lowest loss."""
    best: dict[tuple, dict] = {}
    for record in records:
        unit, metrics = record["unit"], record["metrics"]
        group = (unit["variant"], unit["name"], unit["width"])
        if group not in best or _score(metrics) > _score(best[group]):
            best[group] = metrics
    return {group: {"lr": m["lr"], "weight_decay": m["weight_decay"], "val_acc": m["val_acc"]}
            for group, m in best.items()}
