"""Run an experiment's grid unit by unit into a run directory, resuming where it stopped.

Units of work, each ending in one record (``records.py``):

- compare: (variant, model, width, seed) for model ∈ {standard, linearized}, trained by
  ``study.train.train`` (matrix-free for the linearized network, checkpointed every epoch), and
  (variant, solver, width, seed) for each solver, fitted on the training set's J: with
  ``solver.lstsq.tier = "store"`` (default) J is built into ``stores/`` by ``build_store`` and solved by
  ``solvers.solve``; with ``"gram"`` only K = J Jᵀ is formed (any width; tier 2 of DESIGN.md).
- spectrum: (variant, "spectrum", width, seed): the singular values of J(w0, X) from K = J Jᵀ.
- regularization: (variant, "<method>-path", width, seed): one ``solvers.solve_path`` per method
  (ridge λ, rsvd rank, cg iterations, sgd epochs) on one store, plus an ``lstsq`` reference.
- interpolation: (variant, model or "solvers", width, seed, n_train) at every point of the n-sweep
  and the width sweep (``interpolation.py``).

Every path a unit writes (records, stores, checkpoints) is checked to lie inside the run directory.

Before a unit runs, its record is looked up: a record with the same settings digest means the unit
is done and is skipped; a record with another digest is an error naming the setting that changed.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from solvers.api import PATH_KNOBS

from study.evaluation import Split, evaluate, scores

from .config import MODEL_KINDS, PATH_VALUE_KEYS, Experiment
from jacobian_store.progress import progress_bar, progress_write

from .records import Clock, Unit, load_records, make_record, read_record, settings_digest, write_json_atomic

# Settings that do not change a unit's result (where it ran, how it was evaluated in batches).
_NOT_IN_DIGEST = ("device", "eval_batch_size")


class ExperimentError(RuntimeError):
    """A run directory that cannot be continued as asked."""


def plan_units(exp: Experiment) -> list[Unit]:
    """Every unit of the experiment, cheapest first within a (variant, seed): widths ascending."""
    units = []
    labels = [v["label"] for v in exp.variants]
    widths = sorted(exp.grid["widths"])
    if exp.kind == "compare":
        names = list(exp.grid["models"]) + list(exp.grid["solvers"])
        for label in labels:
            for seed in exp.grid["seeds"]:
                for width in widths:
                    units += [Unit(label, name, width, seed) for name in names]
    elif exp.kind == "spectrum":
        for label in labels:
            for seed in exp.grid["seeds"]:
                units += [Unit(label, "spectrum", width, seed) for width in widths]
    elif exp.kind == "interpolation":
        from .interpolation import sweep_points

        names = [*exp.grid["models"], "solvers"]
        for label in labels:
            for seed in exp.grid["seeds"]:
                for width, n in sweep_points(exp):
                    units += [Unit(label, name, width, seed, n) for name in names]
    else:
        reg = exp.regularization
        for label in labels:
            units.append(Unit(label, "lstsq", reg["width"], reg["seed"]))
            units += [Unit(label, f"{method}-path", reg["width"], reg["seed"])
                      for method, knob in _PATH_KNOBS.items() if reg[knob]]
    return units


# method → the [regularization] key listing its path's values: the key of its knob (solvers.api.PATH_KNOBS)
_PATH_KNOBS = {method: PATH_VALUE_KEYS[knob] for method, knob in PATH_KNOBS.items()}


class Runner:
    """Runs the units of ``exp`` into ``run_dir``; see the module docstring."""

    def __init__(self, exp: Experiment, run_dir: str | Path, *, data_root=None, device: str | None = None,
                 progress: bool = True, keep_checkpoints: bool = False):
        self.exp = exp
        self.run_dir = Path(run_dir)
        self.data_root = data_root
        self.device = device or exp.train["device"]
        self.progress = progress
        self.keep_checkpoints = keep_checkpoints
        self._datasets: dict[str, object] = {}
        self._cache: dict[tuple, object] = {}  # interpolation: point datasets, evaluation Jacobians
        self.selected: dict[tuple, dict] = {}  # (variant, model, width) → hyperparameters from --search

    # -- data ------------------------------------------------------------------------------------
    def dataset(self, label: str):
        if label not in self._datasets:
            from jacobian_store.datasets import load_dataset

            kwargs = self.exp.variant_dataset(label)
            name = kwargs.pop("name")
            if name != "mnist-shifted":
                kwargs.pop("shift", None)
                kwargs.pop("shift_seed", None)
            self._datasets[label] = load_dataset(name, data_root=self.data_root, **kwargs)
        return self._datasets[label]

    def unit_dataset(self, unit: Unit):
        """The data a unit trains and is tested on: its variant's, or an interpolation point's."""
        if self.exp.kind == "interpolation":
            from .interpolation import point_data

            return point_data(self, unit)[0]
        return self.dataset(unit.variant)

    def check(self, records: bool = True) -> None:
        """Refuse, before anything is written, a run directory that cannot be written or (``records``)
        whose records were made with other settings, so a refused run leaves the directory as it was."""
        self._check_writable()
        for unit in plan_units(self.exp) if records else []:
            self._check_record(unit)

    def _check_writable(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            problem = "is not a directory" if self.run_dir.exists() and not self.run_dir.is_dir() else \
                f"cannot be written ({err.strerror or err})"
            raise ExperimentError(f"run directory {self.run_dir} {problem}; choose another --out") from None

    def inside(self, path: Path) -> Path:
        """``path``, after checking that it lies inside the run directory (labels and names are plain
        file names, ``config.PLAIN_NAME``; this is the check that holds whatever built the path)."""
        root = self.run_dir.resolve()
        if not path.resolve().is_relative_to(root):
            raise ExperimentError(f"{path} lies outside the run directory {self.run_dir}; experiment names and "
                                  f"variant labels must be plain file names")
        return path

    # -- settings --------------------------------------------------------------------------------
    def hyperparameters(self, variant: str, model: str, width: float) -> tuple[dict, str]:
        if (variant, model, width) in self.selected:
            return self.selected[(variant, model, width)], "search"
        return self.exp.hyperparameters(model, width), "config"

    def train_config(self, unit: Unit, model: str, hyper: dict, epochs: int | None = None):
        from study.train import TrainConfig

        t = self.exp.train
        return TrainConfig(arch=self.exp.grid["arch"], width=unit.width, model_seed=unit.seed,
                           epochs=t["epochs"] if epochs is None else epochs, lr=float(hyper["lr"]),
                           weight_decay=float(hyper["weight_decay"]), batch_size=t["batch_size"],
                           lr_step_epochs=t["lr_step_epochs"] or None, momentum=float(t["momentum"]),
                           dtype=t["dtype"], device=self.device, eval_batch_size=t["eval_batch_size"])

    def settings(self, unit: Unit) -> dict:
        """Everything that determines the unit's result (the digest covers this, minus device)."""
        exp = self.exp
        out = {"experiment": exp.name, "kind": exp.kind, "unit": dataclasses.asdict(unit),
               "dataset": exp.variant_dataset(unit.variant), "arch": exp.grid["arch"]}
        if exp.kind == "interpolation":
            sweep = exp.interpolation
            out["dataset"]["n_train"] = unit.n_train
            out["validation_fraction"] = sweep["validation_fraction"]
            if unit.name == "solvers":
                out["solvers"] = {"lambdas": sweep["lambdas"], "cg_iterations": sweep["cg_iterations"],
                                  "store_dtype": exp.solver["store_dtype"]}
        if unit.name in MODEL_KINDS or unit.name == "sgd":
            model = "linearized" if unit.name == "sgd" else unit.name
            hyper, source = self.hyperparameters(unit.variant, model, unit.width)
            config = dataclasses.asdict(self.train_config(unit, model, hyper))
            out["train"] = {k: v for k, v in config.items() if k not in _NOT_IN_DIGEST}
            out["hyperparameters_source"] = source
        if unit.name in ("lstsq", "ridge", "cg", "rsvd", "sgd"):
            out["solver"] = {"method": unit.name, "store_dtype": exp.solver["store_dtype"],
                             **exp.solver.get(unit.name, {})}
        if unit.name == "spectrum":
            out["spectrum"] = {"method": exp.spectrum["method"], "cutoff": "lstsq"}
        if unit.name.endswith("-path"):
            method = unit.name.removesuffix("-path")
            values, options = self.path_inputs(unit)
            # only what this path reads: another method's values (say sgd_lr) leave its record valid
            out["path"] = {"method": method, "values": values, "options": options}
            out["store_dtype"] = exp.solver["store_dtype"]
        return out

    def path_inputs(self, unit: Unit) -> tuple[list, dict]:
        """(the knob's values, the solver's options) of a ``<method>-path`` unit: all it computes from."""
        method = unit.name.removesuffix("-path")
        reg = self.exp.regularization
        options = {}
        if method == "sgd":
            t = self.exp.train
            options = dict(lr=float(reg["sgd_lr"]), weight_decay=float(reg["sgd_weight_decay"]),
                           batch_size=t["batch_size"], momentum=float(t["momentum"]), seed=unit.seed)
        if method == "rsvd":
            options = {k: v for k, v in self.exp.solver["rsvd"].items() if k != "rank"}
        return list(reg[_PATH_KNOBS[method]]), options

    # -- the grid --------------------------------------------------------------------------------
    def run(self, search: bool = False) -> list[dict]:
        """Run every unit not yet finished; returns all records of the run directory."""
        self.check(records=False)  # records are checked once the search has chosen the hyperparameters
        if search:
            from .search import run_search

            if self.exp.kind != "compare":
                raise ExperimentError(f"--search tunes the SGD of compare experiments; {self.exp.name} is a "
                                      f"{self.exp.kind} experiment with nothing to tune")
            self.selected = run_search(self)
        units = plan_units(self.exp)
        self.check()
        write_json_atomic(self.run_dir / "experiment.json", self.exp.to_dict())
        bar = progress_bar(units, desc=f"{self.exp.name} [{self.exp.preset}]", unit="unit", enabled=self.progress)
        for unit in bar:
            bar.set_postfix_str(unit.key)
            self.run_unit(unit)
        return load_records(self.run_dir)

    def _check_record(self, unit: Unit) -> dict | None:
        """The unit's finished record when its settings match; None when there is none; else an error."""
        path = self.inside(self.run_dir / "records" / f"{unit.key}.json")
        settings = self.settings(unit)
        existing = read_record(path)
        if existing is None or existing.get("settings_digest") == settings_digest(settings):
            return existing
        raise ExperimentError(
            f"{path} was made with other settings ({_first_difference(existing.get('settings', {}), settings)}); "
            f"rerun with the settings it was made with, use another --out, or delete that record to recompute it")

    def run_unit(self, unit: Unit) -> dict:
        existing = self._check_record(unit)
        if existing is not None:
            return existing
        path = self.run_dir / "records" / f"{unit.key}.json"
        settings = self.settings(unit)
        from .interpolation import run_solvers

        run = {"standard": self._run_model, "linearized": self._run_model, "spectrum": self._run_spectrum,
               "solvers": lambda unit, settings: run_solvers(self, unit)}.get(
            unit.name, self._run_path if unit.name.endswith("-path") else self._run_solver)
        with Clock() as clock:
            metrics, extra = run(unit, settings)
        record = make_record(unit.key, dataclasses.asdict(unit), settings, metrics, clock.seconds,
                             device=str(self._torch_device()), **extra)
        write_json_atomic(path, record)
        if self.progress:
            shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("train_acc", "test_acc", "effective_rank")
                              if isinstance(metrics.get(k), float))
            progress_write(f"{unit.key}: {shown} ({clock.seconds:.1f} s)")
        return record

    # -- unit implementations ------------------------------------------------------------------
    def _torch_device(self) -> torch.device:
        from jacobian_store.device import resolve_device

        return resolve_device(self.device).torch

    def _solver_device(self) -> str:
        # The solvers run on the GPU through CuPy: "auto" uses it when installed, else the host.
        return "cpu" if self._torch_device().type == "cpu" else "auto"

    def _run_model(self, unit: Unit, settings: dict):
        from study.train import CHECKPOINT_NAME, train

        dataset = self.unit_dataset(unit)
        hyper, _ = self.hyperparameters(unit.variant, unit.name, unit.width)
        config = self.train_config(unit, unit.name, hyper)
        train_dir = self.inside(self.run_dir / "train" / unit.key)
        result = train(config, dataset, unit.name, run_dir=train_dir, resume=True, progress=self.progress)
        if not self.keep_checkpoints:
            (train_dir / CHECKPOINT_NAME).unlink(missing_ok=True)
        final = result.final
        metrics = {k: final[k] for k in ("train_acc", "test_acc", "train_loss", "test_loss")}
        metrics.update(distance=result.distance, w0_norm=result.w0_norm, n_parameters=result.n_parameters,
                       diverged=result.diverged, epochs=final["epoch"],
                       train_seconds=sum(h["seconds"] for h in result.history))
        history = [{k: h[k] for k in ("epoch", "lr", "train_acc", "test_acc", "train_loss", "test_loss", "distance",
                                      "seconds")} for h in result.history]
        return metrics, {"history": history, "initial": result.initial, "dataset_fingerprint": result.dataset}

    def store_path(self, unit: Unit, test_jacobian: bool = False) -> Path:
        suffix = "-test" if test_jacobian else ""
        n = "" if unit.n_train is None else f"-n{unit.n_train}"
        name = f"{unit.variant}__{self.exp.grid['arch']}-w{unit.width:g}-s{unit.seed}{n}-{self.exp.solver['store_dtype']}"
        return self.inside(self.run_dir / "stores" / f"{name}{suffix}.h5")

    def _build_store(self, unit: Unit, test_jacobian: bool = False) -> tuple[Path, float]:
        from jacobian_store.build import BuildSpec, build_store

        path = self.store_path(unit, test_jacobian)
        spec = BuildSpec(arch=self.exp.grid["arch"], width=unit.width, seed=unit.seed,
                         dtype=self.exp.solver["store_dtype"], test_jacobian=test_jacobian)
        with Clock() as clock:
            build_store(path, spec, self.unit_dataset(unit), device=self.device, progress=self.progress,
                        command=f"bin/study {self.exp.name} --preset {self.exp.preset}")
        return path, clock.seconds

    def _solver_options(self, unit: Unit) -> dict:
        options = {k: v for k, v in self.exp.solver.get(unit.name, {}).items() if k != "tier"}
        if unit.name == "sgd":
            hyper, _ = self.hyperparameters(unit.variant, "linearized", unit.width)
            t = self.exp.train
            options.update(lr=float(hyper["lr"]), weight_decay=float(hyper["weight_decay"]), epochs=t["epochs"],
                           batch_size=t["batch_size"], momentum=float(t["momentum"]),
                           lr_step=t["lr_step_epochs"] or None, seed=unit.seed)
        return options

    def _run_solver(self, unit: Unit, settings: dict):
        if unit.name == "lstsq" and self.exp.solver["lstsq"].get("tier", "store") == "gram":
            return self._run_lstsq_gram(unit)
        from jacobian_store.store import JacobianStore
        from solvers import solve

        path, build_seconds = self._build_store(unit)
        with JacobianStore.open(path, "r+") as store:
            with Clock() as clock:
                result = solve(store.train_J, store.residual(), unit.name, device=self._solver_device(),
                               progress=self.progress, **self._solver_options(unit))
            u = _host(result.u)
            store.write_solution(unit.name, u, {"summary": result.summary(), "options": result.options},
                                 overwrite=True)
            train = Split(store.f0(), store.targets())
            model = store.model(str(self._torch_device()))
        data = self.dataset(unit.variant).test
        test = Split.of_network(model, data.x, data.targets.numpy(), device=self.device,
                                batch_size=self.exp.train["eval_batch_size"])
        metrics = evaluate([result], {"train": train, "test": test})[0]
        metrics.update(_solve_metrics(result), build_seconds=build_seconds, solve_seconds=clock.seconds,
                       n_parameters=int(u.size))
        return metrics, {"store": str(path.relative_to(self.run_dir))}

    def _run_lstsq_gram(self, unit: Unit):
        """Minimum-norm least squares from K = J Jᵀ alone (``solvers.gcv.gram_path`` at λ = 0): α = K⁺ r,
        u = Jᵀ α never formed; train outputs f0 + K α and test outputs f0(x) + K(x, X) α."""
        from jacobian_store.gram import cross_gram_matrix, gram_matrix
        from solvers.gcv import gram_path

        dataset = self.dataset(unit.variant)
        model = self._initial_model(unit)
        with torch.no_grad():
            f0_train = _outputs(model, dataset.train.x)
            f0_test = _outputs(model, dataset.test.x)
        r = (dataset.train.targets.double().numpy() - f0_train).reshape(-1)
        n_params = sum(p.numel() for p in model.parameters())
        with Clock() as clock:
            K = gram_matrix(model, dataset.train.x, device=str(self._torch_device()), progress=self.progress)
            # J's dtype is the model's (float32): its storage rounding sets the cut-off's second term
            path = gram_path(K, r, [0.0], n_parameters=n_params, dtype=np.float32,
                             rcond=self.exp.solver["lstsq"].get("rcond"))
            fit = path.fits[0]
            del K
            K_test = cross_gram_matrix(model, dataset.test.x, dataset.train.x, device=str(self._torch_device()),
                                       progress=self.progress)
            test_fit = K_test @ fit.alpha
        metrics = {}
        for split, outputs in (("train", f0_train + fit.fitted.reshape(f0_train.shape)),
                               ("test", f0_test + test_fit.reshape(f0_test.shape))):
            got = scores(outputs, getattr(dataset, split).targets.numpy())
            metrics[f"{split}_acc"], metrics[f"{split}_loss"] = got["acc"], got["loss"]
        metrics.update(method="lstsq", form="gram", converged=True, residual_norm=fit.residual_norm,
                       relative_residual=fit.relative_residual, u_norm=fit.u_norm, rank=path.rank,
                       cutoff=path.cutoff, solve_seconds=clock.seconds, n_parameters=n_params)
        return metrics, {}

    def _initial_model(self, unit: Unit):
        from jacobian_store.architectures import create_model

        dataset = self.dataset(unit.variant)
        return create_model(self.exp.grid["arch"], unit.width, in_channels=dataset.in_channels,
                            n_outputs=dataset.n_outputs, image_size=dataset.image_size, seed=unit.seed)

    def _run_spectrum(self, unit: Unit, settings: dict):
        from jacobian_store.gram import gram_matrix
        from study.spectrum import singular_values_from_gram

        from .spectra import spectrum_metrics

        dataset = self.dataset(unit.variant)
        model = self._initial_model(unit)
        n_params = sum(p.numel() for p in model.parameters())
        with Clock() as clock:
            K = gram_matrix(model, dataset.train.x, method=self.exp.spectrum["method"],
                            device=str(self._torch_device()), progress=self.progress)
            singular_values = singular_values_from_gram(K)
        metrics = spectrum_metrics(singular_values, (K.shape[0], n_params))
        metrics.update(n_parameters=n_params, n_rows=int(K.shape[0]), gram_seconds=clock.seconds)
        return metrics, {"singular_values": singular_values.tolist()}

    def _run_path(self, unit: Unit, settings: dict):
        from jacobian_store.store import JacobianStore
        from solvers import solve_path

        method = unit.name.removesuffix("-path")
        values, options = self.path_inputs(unit)
        path, build_seconds = self._build_store(unit, test_jacobian=True)
        with JacobianStore.open(path) as store:
            with Clock() as clock:
                results = solve_path(store.train_J, store.residual(), method, values, device=self._solver_device(),
                                     progress=self.progress, **options)
            points = self._path_points(store, results, values)
        return ({"method": method, "knob": _PATH_KNOBS[method], "points": points, "build_seconds": build_seconds,
                 "solve_seconds": clock.seconds}, {"store": str(path.relative_to(self.run_dir))})

    def _path_points(self, store, results, values) -> list[dict]:
        """Train scores from J u, test scores from the store's test Jacobian, every point at once."""
        splits = {"train": Split(store.f0("train"), store.targets("train")),
                  "test": Split(store.f0("test"), store.targets("test"), store.jacobian("test"))}
        return [{"value": value, **score, **_solve_metrics(result)}
                for value, result, score in zip(values, results, evaluate(results, splits))]


def _solve_metrics(result) -> dict:
    out = {"method": result.method, "form": result.form, "converged": result.converged,
           "stop_reason": result.stop_reason, "n_iter": result.n_iter, "residual_norm": result.residual_norm,
           "relative_residual": result.relative_residual, "u_norm": result.u_norm, "wall_time": result.wall_time}
    for key in ("rank", "effective_rank", "lambda", "rcond", "epochs", "iterations", "equivalent_ridge_lambda"):
        if key in result.extras and isinstance(result.extras[key], (int, float, np.integer, np.floating)):
            out[key] = float(result.extras[key]) if isinstance(result.extras[key], (float, np.floating)) \
                else int(result.extras[key])
    return out


def _host(array) -> np.ndarray:
    from jacobian_store.device import to_numpy

    return np.asarray(to_numpy(array))


@torch.no_grad()
def _outputs(model, x: torch.Tensor, batch: int = 512) -> np.ndarray:
    return torch.cat([model(x[i:i + batch]) for i in range(0, x.shape[0], batch)]).double().numpy()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _first_difference(old: dict, new: dict) -> str:
    a, b = _flatten(old), _flatten(new)
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            return f"{key} was {a.get(key, '<unset>')!r}, now {b.get(key, '<unset>')!r}"
    return "record format changed"


def remove_stores(run_dir: Path) -> None:
    shutil.rmtree(Path(run_dir) / "stores", ignore_errors=True)
