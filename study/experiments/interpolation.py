"""The interpolation threshold: where the minimum-norm fit of the linearization generalizes worst.

J(w0, X) is n·L × p. As n grows at a fixed width, the minimum-norm least-squares solution u = J⁺ r
interpolates (J u = r) until n·L reaches the rank of J on the data distribution, which for LeNet
saturates well below p (many parameter directions are exactly null). Near that threshold J's
smallest kept singular values approach 0, ‖u‖ = ‖Σ c_i/σ_i v_i‖ blows up, and test accuracy dips
(double descent). Regularization — explicit (ridge λ) or implicit (early-stopped CG, SGD) —
damps those directions and removes the dip.

The experiment sweeps n through the threshold at ``interpolation.width`` (the n-sweep) and the width
at ``interpolation.n_train`` (the width sweep over ``grid.widths``). At every point (width, n, seed):

- ``standard`` and ``linearized``: the networks trained by SGD from the same w0 and batches;
- ``solvers``: J materialized into a store, then ``solvers.solve_path(J, r, "ridge", [0, λ…])``:
  one eigendecomposition serves λ = 0 (the minimum-norm ``lstsq`` solution, with lstsq's cut-off)
  and every λ; its singular values give the numerical and effective rank (``spectra.py``, the
  lstsq cut-off) and GCV(λ) (``solvers.gcv``). ``solve_path(J, r, "cg", iterations)`` gives the CG
  path. λ and the CG iteration count are chosen on a validation split: a seeded
  ``validation_fraction`` of the test split, disjoint from the test images every method is scored
  on (ties go to the stronger regularization). GCV chooses a second λ without any split.

The x-axis of the threshold is n·L / r_ref, r_ref the numerical rank of J at the largest n of the
sweep at that width and seed (the rank saturates: it is the capacity the fit runs into, where the
rank at a smaller n is just n·L). A width-sweep point with no n-sweep at its width uses its own rank.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from solvers.api import KNOB_LABELS

# A stream of its own for the validation split of the test images.
_VALIDATION_STREAM = 7919
METHOD_LABELS = {"lstsq": "lstsq (minimum norm)", "ridge_val": "ridge, λ on validation", "ridge_gcv": "ridge, λ by GCV",
                 "cg_val": "CG, iterations on validation", "linearized": "linearized SGD", "standard": "standard SGD"}


def sweep_points(exp) -> list[tuple[float, int]]:
    """(width, n_train) of every point: the n-sweep, then the width sweep's points not already in it."""
    sweep = exp.interpolation
    points = [(sweep["width"], n) for n in sorted(sweep["n_trains"])]
    points += [(w, sweep["n_train"]) for w in sorted(exp.grid["widths"]) if (w, sweep["n_train"]) not in points]
    return points


def point_data(runner, unit):
    """(dataset, validation split) of an interpolation point: the first ``unit.n_train`` of the
    variant's class-balanced training subsets (nested in n), and the test split cut into a
    validation part and the test part every method is scored on."""
    from jacobian_store.datasets import Dataset, Split

    key = ("point", unit.variant, unit.n_train)
    if key not in runner._cache:
        from jacobian_store.datasets import load_dataset

        kwargs = runner.exp.variant_dataset(unit.variant)
        name = kwargs.pop("name")
        if name != "mnist-shifted":
            kwargs.pop("shift", None)
            kwargs.pop("shift_seed", None)
        kwargs["n_train"] = unit.n_train
        dataset = load_dataset(name, data_root=runner.data_root, **kwargs)
        fraction = runner.exp.interpolation["validation_fraction"]
        n_test = dataset.test.x.shape[0]
        n_val = int(round(fraction * n_test))
        if not 0 < n_val < n_test:
            raise ValueError(f"interpolation.validation_fraction {fraction} of {n_test} test images leaves no "
                             f"validation or no test images; raise dataset.n_test")
        order = np.random.default_rng([kwargs.get("seed", 0), _VALIDATION_STREAM]).permutation(n_test)

        def take(idx):
            t, index = dataset.test, torch.from_numpy(np.sort(idx))
            return Split(x=t.x[index], labels=t.labels[index], targets=t.targets[index], indices=t.indices[np.sort(idx)])

        spec = {**dataset.spec, "validation": {"fraction": fraction, "n_validation": n_val, "of": "test"}}
        scored = Dataset(name=dataset.name, train=dataset.train, test=take(order[n_val:]), n_outputs=dataset.n_outputs,
                         in_channels=dataset.in_channels, image_size=dataset.image_size,
                         class_names=list(dataset.class_names), spec=spec)
        runner._cache[key] = (scored, take(order[:n_val]))
    return runner._cache[key]


def run_solvers(runner, unit):
    """The ``solvers`` unit of a point (module docstring): metrics and the two paths."""
    from jacobian_store.store import JacobianStore
    from solvers import solve_path
    from solvers.gcv import gcv
    from study.evaluation import Split, evaluate

    from .records import Clock
    from .spectra import spectrum_metrics

    dataset, val = point_data(runner, unit)
    sweep = runner.exp.interpolation
    lambdas = [0.0, *sorted(float(v) for v in sweep["lambdas"])]
    iterations = sorted(int(v) for v in sweep["cg_iterations"])
    path, build_seconds = runner._build_store(unit)
    device = runner._solver_device()
    with JacobianStore.open(path) as store:
        J, r = store.train_J, store.residual()
        f0 = store.f0().reshape(-1)
        with Clock() as clock:
            # λ = 0 is the minimum-norm solution: ridge_path serves it from the same eigendecomposition
            # with the pseudo-inverse and lstsq's cut-off, so it is solve(J, r, "lstsq") without a second one.
            ridge = solve_path(J, r, "ridge", lambdas, device=device, progress=runner.progress)
            cg = solve_path(J, r, "cg", iterations, device=device, progress=runner.progress)
        model = store.model(str(runner._torch_device()))
        shape = J.shape
    sigma = np.asarray(ridge[0].extras["singular_values"], dtype=np.float64)
    spectrum = spectrum_metrics(sigma, shape)
    kept = sigma[sigma > spectrum["cutoff"]]
    gcv_scores = gcv(kept ** 2, shape[0], [res.residual_norm for res in ridge], lambdas)
    f0_eval, J_eval = _evaluation_jacobian(runner, unit, model, torch.cat([val.x, dataset.test.x]))
    rows = len(val.x) * dataset.n_outputs  # the validation images' rows come first
    splits = {"train": Split(f0, dataset.train.targets.numpy()),
              "val": Split(f0_eval[:rows], val.targets.numpy(), J_eval[:rows]),
              "test": Split(f0_eval[rows:], dataset.test.targets.numpy(), J_eval[rows:])}
    keys = ("train_acc", "val_acc", "test_acc", "train_loss", "val_loss", "test_loss")

    def point(result, value, score, **extra):
        return {"value": value, **{k: score[k] for k in keys}, "u_norm": result.u_norm,
                "relative_residual": result.relative_residual, **extra}

    ridge_path = [point(res, lam, score, gcv=None if math.isinf(g) else float(g))
                  for res, lam, g, score in zip(ridge, lambdas, gcv_scores, evaluate(ridge, splits))]
    cg_path = [point(res, k, score, converged=res.converged)
               for res, k, score in zip(cg, iterations, evaluate(cg, splits))]
    regularized = ridge_path[1:]
    # validation choice: highest validation accuracy, ties to the larger λ / the fewer iterations
    ridge_val = max(regularized, key=lambda p: (p["val_acc"], p["value"]))
    ridge_gcv = min(regularized, key=lambda p: (math.inf if p["gcv"] is None else p["gcv"]))
    cg_val = max(cg_path, key=lambda p: (p["val_acc"], -p["value"]))
    method = lambda p, knob=None: {**{k: p[k] for k in ("train_acc", "val_acc", "test_acc", "u_norm",
                                                        "relative_residual")},
                                   **({knob: p["value"]} if knob else {})}
    metrics = {"n_rows": int(shape[0]), "n_parameters": int(shape[1]),
               **{k: spectrum[k] for k in ("numerical_rank", "effective_rank", "cutoff", "condition_number",
                                           "sigma_max")},
               "lstsq": method(ridge_path[0]), "ridge_val": method(ridge_val, "lambda"),
               "ridge_gcv": method(ridge_gcv, "lambda"), "cg_val": method(cg_val, "iterations"),
               "ridge_path": ridge_path, "cg_path": cg_path, "build_seconds": build_seconds,
               "solve_seconds": clock.seconds}
    metrics["ridge_gcv"]["gcv"] = ridge_gcv["gcv"]
    return metrics, {"store": str(path.relative_to(runner.run_dir)), "singular_values": sigma.tolist()}


def _evaluation_jacobian(runner, unit, model, x_eval) -> tuple[np.ndarray, np.ndarray]:
    """(f(w0, x), J(x)) on the validation and test images, flattened sample-major: the same for every
    n at one (width, seed), so computed once and kept; every solution's outputs are then f0 + J U."""
    from jacobian_store.functional import initial_parameters, jacobian_rows

    key = ("evaluation", unit.variant, unit.width, unit.seed)
    if key not in runner._cache:
        params = initial_parameters(model)
        device = next(iter(params.values())).device
        batch = runner.exp.train["eval_batch_size"]
        f0_parts, J_parts = [], []
        for start in range(0, x_eval.shape[0], batch):
            xb = x_eval[start:start + batch].to(device)
            with torch.no_grad():
                f0_parts.append(model(xb).double().cpu())
            J_parts.append(jacobian_rows(model, params, xb).cpu())
        runner._cache[key] = (torch.cat(f0_parts).numpy().reshape(-1), torch.cat(J_parts).numpy())
    return runner._cache[key]


def with_reference_rank(exp, records: list[dict]) -> list[dict]:
    """``records`` with ``reference_rank`` r_ref and ``rows_per_rank`` = n·L / r_ref added to every
    ``solvers`` record (module docstring); other experiments' records unchanged."""
    if exp.kind != "interpolation":
        return records
    reference: dict[tuple, int] = {}
    for r in records:
        u = r["unit"]
        if u["name"] == "solvers":
            key = (u["variant"], u["width"], u["seed"])
            reference[key] = max(reference.get(key, 0), int(r["metrics"]["numerical_rank"]))
    out = []
    for r in records:
        u = r["unit"]
        if u["name"] == "solvers":
            rank = reference[(u["variant"], u["width"], u["seed"])]
            r = {**r, "metrics": {**r["metrics"], "reference_rank": rank,
                                  "rows_per_rank": r["metrics"]["n_rows"] / max(rank, 1)}}
        out.append(r)
    return out


# -------------------------------------------------------------------------------------------------
# report


def _curve(records, variant, along, fixed, name, metric):
    """axis value → list over seeds of the metric (a dotted path) of unit ``name`` on one sweep."""
    from .claims import _lookup

    other = "width" if along == "n_train" else "n_train"
    out: dict = {}
    for r in records:
        u = r["unit"]
        if u["variant"] == variant and u["name"] == name and u[other] == fixed:
            value = _lookup(r["metrics"], metric)
            if value is not None:
                out.setdefault(u[along], []).append(value)
    return out


_METHOD_METRIC = {"lstsq": ("solvers", "lstsq"), "ridge_val": ("solvers", "ridge_val"),
                  "ridge_gcv": ("solvers", "ridge_gcv"), "cg_val": ("solvers", "cg_val"),
                  "linearized": ("linearized", None), "standard": ("standard", None)}


def _metric_of(method: str, metric: str) -> tuple[str, str]:
    unit, prefix = _METHOD_METRIC[method]
    if prefix is None and metric == "u_norm":
        metric = "distance"  # ‖u‖ of the linearized net, ‖w − w0‖ of the standard one
    return unit, f"{prefix}.{metric}" if prefix else metric


def report(exp, records: list[dict], figure_dir):
    from .formatting import _pm, _stats, _table

    sweep = exp.interpolation
    methods = [m for m in _METHOD_METRIC if _METHOD_METRIC[m][0] in ("solvers", *exp.grid["models"])]
    lines = ["Test accuracy (%) at each point, mean ± std over seeds; every method is scored on the same test "
             "images, disjoint from the validation images that choose λ and the CG iteration count. "
             "n·L / r_ref: rows of J over its numerical rank at the largest n of the sweep (the threshold is at 1); "
             "rank and effective rank of J at the point; ‖u‖ of the minimum-norm fit."]
    for variant in [v["label"] for v in exp.variants]:
        for along, fixed, title in (("n_train", sweep["width"], f"n-sweep at width {sweep['width']:g}"),
                                    ("width", sweep["n_train"], f"width sweep at n = {sweep['n_train']:,}")):
            ratio = _curve(records, variant, along, fixed, "solvers", "rows_per_rank")
            if not ratio:
                continue
            header = ["n" if along == "n_train" else "width", "n·L / r_ref", "rank", "eff. rank", "lstsq ‖u‖",
                      "λ (val)", "CG its (val)", *(METHOD_LABELS[m] for m in methods)]
            rows = []
            for x in sorted(ratio):
                cell = lambda name, metric, scale=1.0, digits=1: _pm(
                    *_stats(_curve(records, variant, along, fixed, name, metric).get(x, []))[:2], scale, digits)
                row = [f"{x:g}", cell("solvers", "rows_per_rank", digits=2), cell("solvers", "numerical_rank", digits=0),
                       cell("solvers", "effective_rank", digits=0), cell("solvers", "lstsq.u_norm", digits=3),
                       cell("solvers", "ridge_val.lambda", digits=3), cell("solvers", "cg_val.iterations", digits=0)]
                row += [cell(*_metric_of(m, "test_acc"), scale=100.0) for m in methods]
                rows.append(row)
            lines += ["", f"### {variant}: {title}", ""] + _table(header, rows)
    paths = []
    if figure_dir is not None and records:
        if "threshold" in exp.figures:
            paths.append(_sweep_figure(exp, records, methods, "n_train", sweep["width"], figure_dir / "threshold.png"))
        if "width_sweep" in exp.figures:
            paths.append(_sweep_figure(exp, records, methods, "width", sweep["n_train"], figure_dir / "width_sweep.png"))
        if "threshold_paths" in exp.figures:
            paths.append(_paths_figure(exp, records, figure_dir / "threshold_paths.png"))
    return lines, [p for p in paths if p is not None]


def _sweep_figure(exp, records, methods, along, fixed, path):
    from .formatting import _plt, _save

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for variant in [v["label"] for v in exp.variants]:
        ratio = _curve(records, variant, along, fixed, "solvers", "rows_per_rank")
        if not ratio:
            continue
        xs_axis = sorted(ratio)
        x_of = {x: float(np.mean(ratio[x])) for x in xs_axis} if along == "n_train" else {x: x for x in xs_axis}
        for ax, metric, scale in ((axes[0], "test_acc", 100.0), (axes[1], "u_norm", 1.0)):
            for m in methods:
                curve = _curve(records, variant, along, fixed, *_metric_of(m, metric))
                xs = [x for x in xs_axis if x in curve]
                if xs:
                    label = METHOD_LABELS[m] if len(exp.variants) == 1 else f"{variant}: {METHOD_LABELS[m]}"
                    ax.errorbar([x_of[x] for x in xs], [np.mean(curve[x]) * scale for x in xs],
                                yerr=[np.std(curve[x]) * scale for x in xs], marker="o", capsize=3, label=label)
    for ax, ylabel in zip(axes, ("test accuracy (%)", "‖u‖ (‖w − w0‖ for the standard net)")):
        ax.set_xscale("log")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if along == "n_train":
            ax.axvline(1.0, color="k", lw=0.8, ls=":")
            ax.set_xlabel("n·L / rank(J)  (rank at the largest n)")
        else:
            ax.set_xlabel(f"width factor (n = {fixed:,})")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    title = (f"n-sweep at width {fixed:g}" if along == "n_train" else f"width sweep at n = {fixed:,}")
    fig.suptitle(f"{exp.name}: {title}, mean ± std over seeds")
    fig.tight_layout()
    return _save(fig, path)


def _paths_figure(exp, records, path):
    """Ridge and CG paths at the peak: the n-sweep point where lstsq's mean test accuracy is lowest."""
    from .formatting import _plt, _save

    sweep = exp.interpolation
    plt = _plt()
    variants = [v["label"] for v in exp.variants]
    fig, axes = plt.subplots(len(variants), 2, figsize=(10, 3.8 * len(variants)), squeeze=False)
    drew = False
    for row, variant in zip(axes, variants):
        lstsq = _curve(records, variant, "n_train", sweep["width"], "solvers", "lstsq.test_acc")
        if not lstsq:
            continue
        peak = min(lstsq, key=lambda n: np.mean(lstsq[n]))
        recs = [r for r in records if r["unit"]["variant"] == variant and r["unit"]["name"] == "solvers"
                and r["unit"]["n_train"] == peak and r["unit"]["width"] == sweep["width"]]
        for ax, key, knob in ((row[0], "ridge_path", KNOB_LABELS["lam"]), (row[1], "cg_path", KNOB_LABELS["maxiter"])):
            for r in recs:
                pts = [p for p in r["metrics"][key] if p["value"] > 0]
                for split, style in (("val", "--"), ("test", "-")):
                    ax.plot([p["value"] for p in pts], [p[f"{split}_acc"] * 100 for p in pts], style, marker="o",
                            label=f"seed {r['unit']['seed']} {split}")
                ax.axhline(r["metrics"]["lstsq"]["test_acc"] * 100, color="gray", lw=0.8, ls=":")
            ax.set_xscale("log")
            ax.set_xlabel(knob)
            ax.set_ylabel("accuracy (%)")
            ax.set_title(f"{variant}, n = {peak:,} (lstsq test: dotted)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            drew = True
        row[0].invert_xaxis()  # less regularization to the right, as for CG
    if not drew:
        plt.close(fig)
        return None
    fig.suptitle("regularization paths at the threshold (the n with the lowest lstsq test accuracy)")
    fig.tight_layout()
    return _save(fig, path)
