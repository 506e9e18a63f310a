"""Fit the linearized network with one solver (or along its knob), evaluate it and save it: the
library behind ``bin/solve`` (``study/solve.py`` parses and checks the command line, then calls
:func:`fit`).

J is a store's (rows from HDF5, or Dask over them with a scheduler) or, without a store, the
network's own (``NetworkJacobian``: cg and rsvd only). Train accuracy is that of f0 + J u, test
accuracy that of f0(x) + J(x) u by jvp at w0 (``study.evaluation``).

Saving (store mode) is one short step at the end, under the store's exclusive lock: the JSON record
is written to a temporary file, the store is checked to be the file the solve read (not replaced
meanwhile), the record is renamed into place and u, with the same record as its attribute, is
stored. A stored solution therefore always has its JSON record; a kill in the instant between
leaves a record without u, which rerunning the same command replaces.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jacobian_store.progress import progress_bar
from jacobian_store.provenance import dumps, jsonable
from solvers.api import PATH_KNOBS, solve, solve_path
from study.evaluation import Split, evaluate

# What to change when a solver diverges, in bin/solve's flags.
DIVERGENCE_FIX = {"sgd": "Lower --lr (e.g. by 10×) or raise --batch-size."}


@dataclass
class FitRequest:
    """Everything one fit needs, already checked (``study/solve.py`` checks a command line).

    ``store``: the Jacobian store; without it ``network`` defines J: ``arch``, ``width``, ``seed``,
    ``dtype`` (of the jvp/vjp), ``batch_size`` (samples per jvp/vjp, None: the memory plan's) and
    ``dataset`` (a function returning the ``jacobian_store.datasets.Dataset``).
    ``path_values``: with ``path``, the knob's values (None: a default grid, :func:`path_values`).
    ``json``/``out``/``save_u``: the JSON record, the path report's prefix, a .npy copy of u.
    ``eval_batch_size``: test samples per jvp (None: the memory plan's).
    """

    method: str
    options: dict
    name: str
    command: str
    store: Path | None = None
    network: dict | None = None
    path: bool = False
    path_values: list | None = None
    json: Path | None = None
    out: Path | None = None
    save_u: Path | None = None
    no_save: bool = False
    overwrite: bool = False
    device: str = "auto"
    memory_limit: str | int | None = "auto"
    scheduler: str | None = None
    test: bool = True
    eval_batch_size: int | None = None
    data_root: Path | None = None
    standard: dict | None = None
    progress: bool = True


@dataclass
class FitReport:
    """One record per solution (a path: one per knob value), the JSON payload written, and the files
    of a path report."""

    records: list[dict]
    payload: dict
    report_paths: list[Path] = field(default_factory=list)


def fit(request: FitRequest) -> FitReport:
    """Solve, evaluate and save as ``request`` says; see the module docstring."""
    return _fit_network(request) if request.store is None else _fit_store(request)


def _fit_store(req: FitRequest) -> FitReport:
    from jacobian_store.store import JacobianStore

    started = time.perf_counter()
    with JacobianStore.open(req.store) as store, contextlib.ExitStack() as cluster:
        identity = store.identity  # a save checks that the store was not replaced meanwhile
        J = store.train_J  # checks the build (and shards) before any cluster is started
        store.check_finite_inputs()
        if req.scheduler:
            from solvers.distributed import connect, dask_operator_from_store

            client = connect(req.scheduler)
            cluster.callback(client.close)  # closed before the store; a local cluster goes with it
            J = dask_operator_from_store(store, client)
        r = store.residual()
        train = Split(store.f0("train"), store.targets("train"))
        names, values = _names(req, J)
        _refuse_existing(store, names, req)
        results = _solve(req, J, r, values)
        for res, solution in zip(results, names):
            check_result(res, solution)
        test, note = _test_split(req, lambda: _store_test_split(req, store))
        records = _records(req, results, names, train, test, note)
        payload = {"store": str(req.store), "store_summary": store.summary(), "command": req.command,
                   "scheduler": req.scheduler, "initial": _initial(train, test), "standard": req.standard}
    return _finish(req, results, records, payload, started, identity)


def _fit_network(req: FitRequest) -> FitReport:
    """cg or rsvd on the network's own Jacobian; train and test accuracy as with a store."""
    import torch

    from jacobian_store.architectures import create_model
    from jacobian_store.matrix_free import NetworkJacobian

    started = time.perf_counter()
    net = req.network
    dataset = net["dataset"]()
    model = create_model(net["arch"], net["width"], in_channels=dataset.in_channels, n_outputs=dataset.n_outputs,
                         image_size=dataset.image_size, seed=net["seed"])
    J = NetworkJacobian(model, dataset.train.x, device=req.device, batch_size=net["batch_size"],
                        dtype=getattr(torch, net["dtype"]))
    train = Split(J.outputs(), dataset.train.targets.numpy())
    r = (train.targets - train.f0).reshape(-1)
    names, values = _names(req, J)
    results = _solve(req, J, r, values)
    test, note = _test_split(req, lambda: Split.of_network(J.model, dataset.test.x, dataset.test.targets.numpy(),
                                                           device=req.device, batch_size=req.eval_batch_size))
    records = _records(req, results, names, train, test, note)
    payload = {"store": None, "operator": repr(J), "dataset": dataset.spec, "command": req.command,
               "network": {k: net[k] for k in ("arch", "width", "seed", "dtype")},
               "initial": _initial(train, test), "standard": req.standard}
    return _finish(req, results, records, payload, started)


def _finish(req: FitRequest, results, records, payload, started, identity=None) -> FitReport:
    """Write the JSON record (with u into the store, unless --no-save), --save-u and a path's report."""
    payload["seconds"] = time.perf_counter() - started
    payload.update({"path": records} if req.path else records[0])
    if req.store is not None and not req.no_save:
        _save(req, identity, [res.u for res in results], records, payload)
    elif req.json:
        req.json.parent.mkdir(parents=True, exist_ok=True)
        req.json.write_text(dumps(payload, indent=1) + "\n")
    _save_u(req.save_u, results[0].u)
    report = FitReport(records, payload)
    if req.path:
        from study.path_report import write_path_report

        report.report_paths = write_path_report(req.out, records, PATH_KNOBS[req.method], req.method, req.standard)
    return report


def _names(req: FitRequest, J) -> tuple[list[str], list | None]:
    """(solution names, knob values): the request's name, or one name per knob value of a path."""
    if not req.path:
        return [req.name], None
    values = path_values(req, J)
    return [path_name(req.name, PATH_KNOBS[req.method], v) for v in values], values


def _solve(req: FitRequest, J, r, values) -> list:
    common = dict(device=req.device, memory_limit=req.memory_limit, progress=req.progress)
    if req.path:
        return solve_path(J, r, req.method, values, **common, **req.options)
    return [solve(J, r, req.method, **common, **req.options)]


def _test_split(req: FitRequest, make_split):
    """(the test split, None) to evaluate on, or (None, why not): skipped, or no data here (then
    train accuracy is still reported, with a warning saying why test accuracy is missing)."""
    if not req.test:
        return None, "skipped (--no-test)"
    try:
        return make_split(), None
    except Exception as error:  # no data here: report train accuracy, say why test is missing
        note = f"not evaluated: {error}"
        print(f"bin/solve: warning: test accuracy {note}", file=sys.stderr)
        return None, note


def _store_test_split(req: FitRequest, store) -> Split:
    """The store's test split: f0 and y as stored at build time; J(x) the stored test Jacobian when
    the store has one (``--test-jacobian``: one pass over it, no network, no torch), else the
    network's jvp at w0 on the test images rebuilt from the store's dataset spec."""
    if store.is_complete("test"):
        J = store.jacobian("test")
    else:
        from jacobian_store.device import resolve_device
        from jacobian_store.matrix_free import NetworkJacobian

        device = resolve_device(req.device)
        J = NetworkJacobian(store.model(device=str(device)), store.dataset(data_root=req.data_root).test.x,
                            device=device, batch_size=req.eval_batch_size)
    return Split(store.f0("test"), store.targets("test"), J)


def _records(req: FitRequest, results, names, train, test, note) -> list[dict]:
    splits = {"train": train, **({"test": test} if test is not None else {})}
    scores = evaluate(progress_bar(results, enabled=req.progress and len(results) > 1, desc="evaluate"), splits)
    records = []
    for res, solution, score in zip(results, names, scores):
        record = {"name": solution, **res.to_dict(), **score}
        if test is None:
            record.update(test_acc=None, test_note=note)
        if req.path:
            knob = PATH_KNOBS[req.method]
            record["knob"], record["value"] = knob, res.options[knob]
        records.append(record)
    return records


def _initial(train, test) -> dict:
    """Accuracies of f(w0, ·), u = 0."""
    return {"train_acc": train.at_init()["acc"], "test_acc": test.at_init()["acc"] if test is not None else None}


def path_name(name: str, knob: str, value) -> str:
    return f"{name}@{knob}={value:g}"


def path_values(req: FitRequest, J) -> list:
    """The knob values of a path: those given, else a default grid for the method."""
    if req.path_values:
        return list(req.path_values)
    m, p = J.shape
    if req.method == "ridge":
        scale = _mean_row_norm2(J)  # mean diagonal of K = J Jᵀ: λ relative to the typical eigenvalue
        if not math.isfinite(scale):
            J.check_finite()  # names the row of J that holds the NaN or Inf
        return [float(f"{scale * 10.0 ** e:.3g}") for e in range(-6, 3)]
    if req.method == "rsvd":
        grid = [k * 10 ** d for d in range(7) for k in (1, 2, 5)]
        return sorted({k for k in grid if k < min(m, p)} | {min(m, p)})
    if req.method == "cg":
        limit = req.options.get("maxiter") or 1000
        return [k for k in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if k <= limit]
    return [1, 2, 5, 10, 20]


def _mean_row_norm2(J) -> float:
    total = 0.0
    for _, block in J.row_blocks():
        b = np.asarray(block, dtype=np.float64)
        total += float(np.einsum("ij,ij->", b, b))
    return total / J.shape[0]


def _refuse_existing(store, names, req: FitRequest) -> None:
    if req.no_save or req.overwrite:
        return
    taken = [n for n in names if n in store.solution_names()]
    if taken:
        raise ValueError(f"{req.store} already holds solution {taken[0]!r}; pass --overwrite or another --name")


def check_result(res, name: str) -> None:
    """Refuse a result that is not a solution: non-finite u or residual, or a divergence.

    SGD starts at u = 0, where ‖J u − r‖ = ‖r‖; ending above that means its steps made the fit worse
    (too large a learning rate), whatever its stopping rule said.
    """
    relative = res.relative_residual
    if not (np.all(np.isfinite(res.u)) and math.isfinite(relative)):
        raise ValueError(f"{name}: {res.method} gave a non-finite solution ({res.stop_reason}); nothing was saved. "
                         f"{DIVERGENCE_FIX.get(res.method, 'Check the store with bin/build-jacobian')}")
    if "diverge" in res.stop_reason or (res.method == "sgd" and relative > 1):
        raise ValueError(f"{name}: sgd diverged (‖Ju−r‖/‖r‖ = {relative:.3e} > 1, worse than u = 0; "
                         f"{res.stop_reason}); nothing was saved. {DIVERGENCE_FIX['sgd']}")


def _save(req: FitRequest, identity, solutions, records, payload) -> None:
    """Write the JSON record and u with it, in one short step (module docstring)."""
    from jacobian_store.store import JacobianStore, StoreError, exclusive_lock, file_identity

    req.json.parent.mkdir(parents=True, exist_ok=True)
    staged = req.json.with_name(f".{req.json.name}.tmp")  # one name: a rerun replaces what a kill left
    try:
        with open(staged, "w") as f:
            f.write(dumps(payload, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        with exclusive_lock(req.store, wait=True) as fd:
            if file_identity(fd) != identity:
                raise StoreError(f"{req.store} was replaced by another process while this solve ran; nothing was "
                                 f"saved: rerun the command on the new store")
            import h5py

            with h5py.File(req.store, "r+", locking=False) as file:
                store = JacobianStore(file)
                os.replace(staged, req.json)
                try:
                    for u, record in zip(solutions, records):
                        store.write_solution(record["name"], u, _info(record, req.command), overwrite=req.overwrite)
                except BaseException:
                    req.json.unlink(missing_ok=True)  # no record without its solution
                    raise
    finally:
        staged.unlink(missing_ok=True)


def _info(record, command: str) -> dict:
    info = {k: v for k, v in record.items() if k != "extras"}
    info["extras"] = dict(record.get("extras", {}))
    info["command"] = command
    return jsonable(info)


def _save_u(path: Path | None, u) -> None:
    """--save-u FILE.npy: the one solution u, float64 on the host."""
    if path is None:
        return
    from jacobian_store.device import to_numpy

    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.asarray(to_numpy(u), dtype=np.float64))
