"""Experiment files: TOML, one per experiment, with a ``cpu`` and a ``paper`` preset.

An experiment file has these tables (every key optional unless marked; defaults in ``_DEFAULTS``)::

    [experiment]  name (a plain file name: letters, digits, ".", "_", "-"), kind ("compare" | "spectrum" |
                  "regularization" | "interpolation"), description
    [dataset]     name (required), n_train, n_test ("all" or a number), binary, seed, shift, shift_seed,
                  image_size: the arguments of jacobian_store.datasets.load_dataset
    [[variants]]  label (a plain file name), plus any [dataset] key to override: one run of the grid per variant
                  (e.g. plain and shifted MNIST); default: one variant labelled by the dataset name
    [grid]        arch, widths, seeds (model seeds: w0 and mini-batch order), models ("standard",
                  "linearized"), solvers ("lstsq", "ridge", "cg", "rsvd", "sgd" on a stored J)
    [train]       epochs, batch_size, momentum, lr, weight_decay, lr_step_epochs, dtype, device,
                  eval_batch_size; per model [train.standard] / [train.linearized] with lr and
                  weight_decay, and per model and width [train.linearized.width.4] (width as key)
    [solver]      options per solver, those of solvers.api.METHOD_OPTIONS (e.g. [solver.ridge] lam,
                  [solver.cg] maxiter, tol, [solver.rsvd] rank), plus [solver.lstsq] tier ("store" |
                  "gram"); [solver.sgd] takes lr, epochs, … from the linearized network's [train];
                  store_dtype for every stored J
    [spectrum]    method ("structured" | "jacobian"): how K = J Jᵀ is computed; bins
    [regularization]  width, seed, lambdas, ranks, cg_iterations, sgd_epochs, sgd_lr, sgd_weight_decay
    [interpolation]  width, n_trains (the n-sweep at that width), n_train (the width sweep over grid.widths
                  at that n), lambdas, cg_iterations, validation_fraction (share of the test split that
                  chooses λ and the CG iteration count; the rest is the test set reported)
    [search]      lrs, weight_decays, validation_fraction, epochs, seed: the hyperparameter search
    [report]      figures: which figures to draw (default: every figure of the kind)
    [[claims]]    the claims the experiment tests, checked on its records (``claims.py``)
    [presets.cpu], [presets.paper]   the same tables (any subset), merged over the ones above,
                  plus ``expected_cost`` (a sentence: what the preset costs, where measured)

Every table and key is checked: an unknown one is an error naming it, the file, and the valid keys.
"""
from __future__ import annotations

import copy
import json
import math
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from solvers.api import METHODS as SOLVERS
from solvers.api import option_types
from study.train import MODEL_KINDS

from .claims import ClaimError, validate_claims

EXPERIMENTS_DIR = Path(__file__).resolve().parent / "configs"
KINDS = ("compare", "spectrum", "regularization", "interpolation")
PRESETS = ("cpu", "paper")
FIGURES = {
    "compare": ("accuracy", "gap"),
    "spectrum": ("effective_rank", "singular_values"),
    "regularization": ("paths", "norm"),
    "interpolation": ("threshold", "width_sweep", "threshold_paths"),
}
# Experiment names and variant labels become file and directory names in the run directory.
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# The study's search grid: learning rates and weight decays 5 × 10^-4 … 5 × 10^-8.
SEARCH_LRS = (1.0, 0.1, 0.01, 0.001)
SEARCH_WEIGHT_DECAYS = (5e-4, 5e-5, 5e-6, 5e-7, 5e-8)


class ConfigError(ValueError):
    """An experiment file that cannot be used: unknown name, bad key, wrong type."""


_NUMBER = (int, float)
_OPTIONAL_COUNT = (int, str)  # a number or "all"

# table → key → allowed types. "width" under train.<model> is handled separately.
_SCHEMA: dict[str, dict[str, tuple]] = {
    "experiment": {"name": (str,), "kind": (str,), "description": (str,)},
    "dataset": {"name": (str,), "n_train": _OPTIONAL_COUNT, "n_test": _OPTIONAL_COUNT, "binary": (int,),
                "seed": (int,), "shift": (int,), "shift_seed": (int,), "image_size": (int,)},
    "grid": {"arch": (str,), "widths": (list,), "seeds": (list,), "models": (list,), "solvers": (list,)},
    "train": {"epochs": (int,), "batch_size": (int,), "momentum": _NUMBER, "lr": _NUMBER, "weight_decay": _NUMBER,
              "lr_step_epochs": (int,), "dtype": (str,), "device": (str,), "eval_batch_size": (int,),
              "standard": (dict,), "linearized": (dict,)},
    "solver": {"store_dtype": (str,), "lstsq": (dict,), "ridge": (dict,), "cg": (dict,), "rsvd": (dict,),
               "sgd": (dict,)},
    "spectrum": {"method": (str,), "bins": (int,)},
    "regularization": {"width": _NUMBER, "seed": (int,), "lambdas": (list,), "ranks": (list,),
                       "cg_iterations": (list,), "sgd_epochs": (list,), "sgd_lr": _NUMBER,
                       "sgd_weight_decay": _NUMBER},
    "interpolation": {"width": _NUMBER, "n_trains": (list,), "n_train": (int,), "lambdas": (list,),
                      "cg_iterations": (list,), "validation_fraction": _NUMBER},
    "search": {"lrs": (list,), "weight_decays": (list,), "validation_fraction": _NUMBER, "epochs": (int,),
               "seed": (int,)},
    "report": {"figures": (list,)},
}
_HYPER_KEYS = {"lr": _NUMBER, "weight_decay": _NUMBER}
# [solver.<method>]: the method's own options (solvers.api.METHOD_OPTIONS), less those the runner
# takes from [train] (stored-J SGD uses the linearized network's hyperparameters), plus lstsq's tier.
_FROM_TRAIN = {"sgd": ("lr", "weight_decay", "epochs", "batch_size", "momentum", "lr_step", "seed")}
_TOML_TYPES = {bool: (bool,), int: (int,), float: _NUMBER, str: (str,)}
_SOLVER_OPTIONS = {method: {option: _TOML_TYPES[kind] for option, kind in option_types(method).items()
                            if option not in _FROM_TRAIN.get(method, ())} for method in SOLVERS}
_SOLVER_OPTIONS["lstsq"]["tier"] = (str,)
# [regularization] key listing the values of each path knob (solvers.api.PATH_KNOBS)
PATH_VALUE_KEYS = {"lam": "lambdas", "rank": "ranks", "maxiter": "cg_iterations", "epochs": "sgd_epochs"}
_VARIANT_KEYS = {"label": (str,), **_SCHEMA["dataset"]}
_TOP_LEVEL = (*_SCHEMA, "variants", "claims", "presets")

_DEFAULTS = {
    "experiment": {"description": ""},
    "dataset": {"n_train": "all", "n_test": "all", "seed": 0, "shift": 7, "shift_seed": 0},
    "grid": {"arch": "lenet", "widths": [1], "seeds": [0], "models": ["standard", "linearized"], "solvers": []},
    "train": {"epochs": 10, "batch_size": 32, "momentum": 0.9, "lr": 0.1, "weight_decay": 5e-5,
              "lr_step_epochs": 0, "dtype": "float32", "device": "auto", "eval_batch_size": 256},
    "solver": {"store_dtype": "float32", "lstsq": {"tier": "store"}, "ridge": {"lam": 1e-3},
               "cg": {"maxiter": 100, "tol": 1e-6}, "rsvd": {"rank": 100, "power_iter": 2}, "sgd": {}},
    "spectrum": {"method": "structured", "bins": 40},
    "regularization": {"width": 1, "seed": 0, "lambdas": [1e-4, 1e-3, 1e-2, 1e-1, 1, 10, 100],
                       "ranks": [10, 30, 100, 300], "cg_iterations": [1, 3, 10, 30, 100],
                       "sgd_epochs": [1, 2, 5, 10], "sgd_lr": 0.01, "sgd_weight_decay": 0.0},
    "interpolation": {"width": 0.25, "n_trains": [500, 1000, 2000, 4000], "n_train": 2000,
                      "lambdas": [1e-3, 1e-2, 1e-1, 1, 10, 100], "cg_iterations": [3, 10, 30, 100],
                      "validation_fraction": 0.5},
    "search": {"lrs": list(SEARCH_LRS), "weight_decays": list(SEARCH_WEIGHT_DECAYS), "validation_fraction": 0.1,
               "seed": 0},
    "report": {},
}


@dataclass
class Experiment:
    """One experiment file resolved for one preset: every setting of the run, JSON-serializable."""

    name: str
    kind: str
    preset: str
    description: str
    expected_cost: str
    source: str
    dataset: dict
    variants: list[dict]
    grid: dict
    train: dict
    solver: dict
    spectrum: dict
    regularization: dict
    search: dict
    report: dict = field(default_factory=dict)
    interpolation: dict = field(default_factory=dict)
    claims: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Experiment":
        return cls(**data)

    # -- derived settings ------------------------------------------------------------------
    def variant_dataset(self, label: str) -> dict:
        """load_dataset keyword arguments of variant ``label`` ("all" → None)."""
        for variant in self.variants:
            if variant["label"] == label:
                merged = {**self.dataset, **{k: v for k, v in variant.items() if k != "label"}}
                return {k: (None if v == "all" else v) for k, v in merged.items()}
        raise ConfigError(f"experiment {self.name!r} has no variant {label!r}; it has: "
                          f"{', '.join(v['label'] for v in self.variants)}")

    def hyperparameters(self, model: str, width: float) -> dict:
        """lr and weight_decay of ``model`` ("standard" or "linearized") at ``width``: the
        [train] values, overridden by [train.<model>], overridden by [train.<model>.width.<w>]."""
        per_model = self.train.get(model, {})
        out = {"lr": self.train["lr"], "weight_decay": self.train["weight_decay"]}
        out.update({k: v for k, v in per_model.items() if k != "width"})
        for key, values in per_model.get("width", {}).items():
            if float(key) == float(width):
                out.update(values)
        return out

    @property
    def figures(self) -> list[str]:
        return list(self.report.get("figures", FIGURES[self.kind]))


def available_experiments() -> dict[str, Path]:
    """Shipped experiment name → TOML file."""
    return {path.stem: path for path in sorted(EXPERIMENTS_DIR.glob("*.toml"))}


def experiment_path(name_or_path: str) -> Path:
    """A shipped experiment's file, or ``name_or_path`` itself when it is a TOML file."""
    path = Path(name_or_path)
    if path.suffix == ".toml":
        if not path.is_file():
            raise ConfigError(f"no experiment file {path}")
        return path
    shipped = available_experiments()
    if name_or_path not in shipped:
        raise ConfigError(f"unknown experiment {name_or_path!r}; shipped experiments: {', '.join(shipped)} "
                          f"(or pass a path to your own .toml file)")
    return shipped[name_or_path]


def load_experiment(name_or_path: str, preset: str = "cpu", overrides: dict | None = None) -> Experiment:
    """Read, validate and resolve an experiment file for ``preset``.

    ``overrides``: a nested dict of the same tables, merged last (e.g. from command-line options).
    """
    path = experiment_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from None
    return resolve(raw, preset, source=str(path), overrides=overrides)


def resolve(raw: dict, preset: str, source: str = "<config>", overrides: dict | None = None) -> Experiment:
    """Validate the parsed TOML ``raw`` and merge defaults, the preset and ``overrides``."""
    _check_tables(raw, source, "", allow_presets=True)
    presets = raw.get("presets", {})
    if not isinstance(presets, dict):
        raise ConfigError(f"{source}: 'presets' must be a table of presets ({', '.join(PRESETS)})")
    for name, table in presets.items():
        if name not in PRESETS:
            raise ConfigError(f"{source}: unknown preset [presets.{name}]; valid presets: {', '.join(PRESETS)}")
        _check_tables(table, source, f"presets.{name}.", allow_presets=False)
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    if presets and preset not in presets:
        raise ConfigError(f"{source} defines no [presets.{preset}]; it defines: {', '.join(presets)}")
    merged = _deep_merge(copy.deepcopy(_DEFAULTS), {k: v for k, v in raw.items() if k != "presets"})
    chosen = copy.deepcopy(presets.get(preset, {}))
    expected_cost = chosen.pop("expected_cost", "")
    merged = _deep_merge(merged, chosen)
    if overrides:
        _check_tables(overrides, "command line", "", allow_presets=False)
        merged = _deep_merge(merged, overrides)
    experiment = merged["experiment"]
    for key in ("name", "kind"):
        if key not in experiment:
            raise ConfigError(f"{source}: [experiment] needs '{key}'")
    if "name" not in merged["dataset"]:
        raise ConfigError(f"{source}: [dataset] needs 'name'")
    variants = merged.get("variants") or [{"label": merged["dataset"]["name"]}]
    resolved = Experiment(name=experiment["name"], kind=experiment["kind"], preset=preset,
                          description=experiment.get("description", ""), expected_cost=expected_cost, source=source,
                          dataset=merged["dataset"], variants=variants, grid=merged["grid"], train=merged["train"],
                          solver=merged["solver"], spectrum=merged["spectrum"],
                          regularization=merged["regularization"], search=merged["search"], report=merged["report"],
                          interpolation=merged["interpolation"], claims=merged.get("claims", []))
    _check_values(resolved, source)
    # Round-trip through JSON so the resolved config equals what a record stores and reads back.
    return Experiment.from_dict(json.loads(json.dumps(resolved.to_dict())))


def _deep_merge(base: dict, top: dict) -> dict:
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def _type_names(types: tuple) -> str:
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}
    return " or ".join(names[t] for t in types)


def _check_key(source: str, where: str, key: str, value, schema: dict) -> None:
    if key not in schema:
        raise ConfigError(f"{source}: unknown key '{where}{key}'; valid keys there: {', '.join(schema)}")
    types = schema[key]
    if isinstance(value, bool) or not isinstance(value, types):
        raise ConfigError(f"{source}: '{where}{key}' must be {_type_names(types)}, got {value!r}")


def _check_tables(raw: dict, source: str, prefix: str, allow_presets: bool) -> None:
    top = _TOP_LEVEL if allow_presets else (*_SCHEMA, "variants", "claims", "expected_cost")
    for table, content in raw.items():
        if table not in top:
            raise ConfigError(f"{source}: unknown table [{prefix}{table}]; valid tables: {', '.join(top)}")
        if table == "presets":
            continue
        if table == "expected_cost":
            if not isinstance(content, str):
                raise ConfigError(f"{source}: '{prefix}expected_cost' must be a string")
            continue
        if table == "claims":
            if not isinstance(content, list) or not all(isinstance(c, dict) for c in content):
                raise ConfigError(f"{source}: '{prefix}claims' must be an array of tables ([[claims]])")
            continue
        if table == "variants":
            if not isinstance(content, list) or not all(isinstance(v, dict) for v in content):
                raise ConfigError(f"{source}: '{prefix}variants' must be an array of tables ([[variants]])")
            for variant in content:
                for key, value in variant.items():
                    _check_key(source, f"{prefix}variants.", key, value, _VARIANT_KEYS)
                if "label" not in variant:
                    raise ConfigError(f"{source}: every [[{prefix}variants]] needs a 'label'")
            continue
        if not isinstance(content, dict):
            raise ConfigError(f"{source}: '{prefix}{table}' must be a table")
        for key, value in content.items():
            _check_key(source, f"{prefix}{table}.", key, value, _SCHEMA[table])
            if table == "train" and key in MODEL_KINDS:
                _check_hyper_table(source, f"{prefix}train.{key}.", value)
            if table == "solver" and key in _SOLVER_OPTIONS:
                for option, option_value in value.items():
                    _check_key(source, f"{prefix}solver.{key}.", option, option_value, _SOLVER_OPTIONS[key])


def _check_hyper_table(source: str, where: str, table: dict) -> None:
    for key, value in table.items():
        if key == "width":
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{where}width' must be a table keyed by width, e.g. [{where}width.4]")
            for width, hyper in value.items():
                try:
                    float(width)
                except ValueError:
                    raise ConfigError(f"{source}: '{where}width.{width}': the key must be a width (a number)") from None
                if not isinstance(hyper, dict):
                    raise ConfigError(f"{source}: '{where}width.{width}' must be a table of lr, weight_decay")
                for name, v in hyper.items():
                    _check_key(source, f"{where}width.{width}.", name, v, _HYPER_KEYS)
        else:
            _check_key(source, where, key, value, {**_HYPER_KEYS, "width": (dict,)})


def _check_values(e: Experiment, source: str) -> None:
    from jacobian_store.architectures import available_models
    from jacobian_store.datasets import DATASETS

    def fail(message):
        raise ConfigError(f"{source}: {message}")

    if e.kind not in KINDS:
        fail(f"experiment.kind must be one of {', '.join(KINDS)}, got {e.kind!r}")
    for what, name in [("experiment.name", e.name)] + [("variants.label", v["label"]) for v in e.variants]:
        if not PLAIN_NAME.fullmatch(name):
            fail(f"{what} {name!r} is not a plain file name (it names files and folders of the run directory): "
                 f"use letters, digits, '.', '_' and '-', starting with a letter or digit, e.g. 'mnist-shifted'")
    labels = [v["label"] for v in e.variants]
    if len(set(labels)) != len(labels):
        fail(f"variant labels must be distinct, got {', '.join(labels)}")
    for variant in e.variants:
        name = e.variant_dataset(variant["label"])["name"]
        if name not in DATASETS:
            fail(f"dataset name {name!r} is unknown; known datasets: {', '.join(DATASETS)}")
    for key in ("n_train", "n_test"):
        for variant in e.variants:
            value = {**e.dataset, **variant}[key]
            if value != "all" and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                fail(f"dataset.{key} must be a positive integer or \"all\" (every sample), got {value!r}")
    grid = e.grid
    if grid["arch"] not in available_models():
        fail(f"grid.arch {grid['arch']!r} is unknown; known architectures: {', '.join(available_models())}")
    if not grid["widths"] or not all(isinstance(w, _NUMBER) and not isinstance(w, bool) and w > 0
                                     for w in grid["widths"]):
        fail(f"grid.widths must be a non-empty list of positive numbers (e.g. [1, 2, 4]), got {grid['widths']!r}")
    if not grid["seeds"] or not all(isinstance(s, int) and s >= 0 for s in grid["seeds"]):
        fail(f"grid.seeds must be a non-empty list of non-negative integers, got {grid['seeds']!r}")
    for model in grid["models"]:
        if model not in MODEL_KINDS:
            fail(f"grid.models: unknown model {model!r}; valid models: {', '.join(MODEL_KINDS)}")
    for solver in grid["solvers"]:
        if solver not in SOLVERS:
            fail(f"grid.solvers: unknown solver {solver!r}; valid solvers: {', '.join(SOLVERS)}")
    if e.solver["lstsq"].get("tier", "store") not in ("store", "gram"):
        fail(f"solver.lstsq.tier must be 'store' (materialized J) or 'gram' (K = J Jᵀ only), "
             f"got {e.solver['lstsq']['tier']!r}")
    for key in ("lr", "weight_decay", "momentum"):
        if not (math.isfinite(e.train[key]) and e.train[key] >= 0):
            fail(f"train.{key} must be a non-negative number, got {e.train[key]!r}")
    if not 0 < e.search["validation_fraction"] < 1:
        fail(f"search.validation_fraction must lie in (0, 1), got {e.search['validation_fraction']!r}")
    for key in ("lrs", "weight_decays"):
        values = e.search[key]
        if not values or not all(isinstance(v, _NUMBER) and v >= 0 for v in values):
            fail(f"search.{key} must be a non-empty list of non-negative numbers, got {values!r}")
    for figure in e.report.get("figures", []):
        if figure not in FIGURES[e.kind]:
            fail(f"report.figures: unknown figure {figure!r} for a {e.kind} experiment; "
                 f"valid figures: {', '.join(FIGURES[e.kind])}")
    if e.spectrum["method"] not in ("structured", "jacobian"):
        fail(f"spectrum.method must be 'structured' or 'jacobian', got {e.spectrum['method']!r}")
    if e.kind == "interpolation":
        _check_interpolation(e, fail)
    try:
        validate_claims(e)
    except ClaimError as err:
        fail(str(err))


def _check_interpolation(e: Experiment, fail) -> None:
    sweep = e.interpolation
    counts = sweep["n_trains"]
    if not counts or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in counts):
        fail(f"interpolation.n_trains must be a non-empty list of positive integers, got {counts!r}")
    if not (isinstance(sweep["n_train"], int) and sweep["n_train"] > 0):
        fail(f"interpolation.n_train must be a positive integer, got {sweep['n_train']!r}")
    if not sweep["width"] > 0:
        fail(f"interpolation.width must be positive, got {sweep['width']!r}")
    if not 0 < sweep["validation_fraction"] < 1:
        fail(f"interpolation.validation_fraction must lie in (0, 1), got {sweep['validation_fraction']!r}")
    lambdas, iterations = sweep["lambdas"], sweep["cg_iterations"]
    if not lambdas or not all(isinstance(v, _NUMBER) and not isinstance(v, bool) and v > 0 for v in lambdas):
        fail(f"interpolation.lambdas must be a non-empty list of positive numbers (λ = 0 is the lstsq point, "
             f"always computed), got {lambdas!r}")
    if not iterations or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in iterations):
        fail(f"interpolation.cg_iterations must be a non-empty list of positive integers, got {iterations!r}")

