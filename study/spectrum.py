"""Spectra of the Jacobian J = ∇_w f(w0, X) at initialization, from its Gram matrix K = J Jᵀ.

J is m × p with m = n·L rows and p parameters. Its singular values are σ_i = √λ_i(K) (eigenvalues
clipped at 0: rounding can make the smallest slightly negative), so the spectrum of any width costs
one n·L × n·L symmetric eigenvalue problem (``jacobian_store.gram`` builds K without forming J).

Summaries, for σ_1 ≥ σ_2 ≥ … ≥ 0:

- numerical rank: #{i : σ_i > c} for a cut-off c. The default c is the one rule of
  ``solvers/rank.py`` (``rank_cutoff``, route "gram"), the same τ that ``bin/solve --method lstsq``
  applies to the same J, so both report the same rank:

      c = max( √(max(m, p)·ε₆₄)·σ_max ,  ε_J·‖J‖_F ),   ‖J‖_F = (Σ σ_i²)^½,

  the rounding of K accumulated in float64 (``jacobian_store.gram`` takes the products of the
  float32 per-layer pieces in float64) read through Weyl's inequality, and the storage rounding of
  J in its dtype (ε_J = 1.2e-7 for float32). Both come from the singular values alone, so a spectrum
  read back from .npy gets the same c. ``cutoff="matrix_rank"`` is numpy's ``matrix_rank`` rule
  σ_max·max(m, p)·ε_J (route "svd" in J's precision): a worst-case bound for an SVD of J itself in
  float32 that grows with p, to 0.72·σ_max for LeNet×10 (p = 6.06 M) and beyond σ_max for
  p > 1/ε₃₂ ≈ 8.4 M (AlexNet from width ≈ 0.4: rank 0). ``cutoff=`` a number sets c directly.
- effective rank (Roy & Vetterli, 2007): p_i = σ_i / Σ_j σ_j, erank = exp(−Σ_i p_i log p_i) with
  0·log 0 = 0. It lies in [1, rank] and equals k for k equal non-zero singular values. The report
  computes it over the non-vanishing σ (those above c; the rest count as 0): thousands of rounding-
  level σ near the floor would otherwise add up to a visible share of Σσ.
  ``effective_rank_unfiltered`` keeps every σ, as the definition reads.
- condition number: σ_1 / σ_min over the non-vanishing σ (> c).

``spectrum_of_model(model, x)`` runs the whole chain and returns a :class:`SpectrumReport`;
``python -m study.spectrum`` (``bin/spectrum``) does it over widths and writes JSON, a Markdown
table and figures.
"""
from __future__ import annotations

import argparse
import logging
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.linalg
import torch

logger = logging.getLogger(__name__)

__all__ = ["SpectrumReport", "singular_values_from_gram", "singular_values_from_eigenvalues", "effective_rank",
           "numerical_rank", "condition_number", "spectrum_from_gram", "spectrum_from_singular_values",
           "spectrum_of_model", "main"]


# ---------------------------------------------------------------------------------- primitives

def singular_values_from_eigenvalues(eigenvalues) -> np.ndarray:
    """σ = √max(λ, 0), sorted in decreasing order (float64); λ in any order."""
    lam = np.asarray(eigenvalues, dtype=np.float64).ravel()
    if not np.all(np.isfinite(lam)):
        raise ValueError("the eigenvalues contain NaN or infinite entries; is K finite?")
    return np.sort(np.sqrt(np.clip(lam, 0.0, None)))[::-1].copy()


def singular_values_from_gram(K) -> np.ndarray:
    """Singular values of J from K = J Jᵀ (float64 symmetric eigenvalue problem), decreasing."""
    K = np.asarray(K, dtype=np.float64)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"K must be a square matrix, got shape {K.shape}")
    if K.shape[0] == 0:
        raise ValueError("K is empty (0 × 0); it needs at least one row")
    if not np.all(np.isfinite(K)):
        raise ValueError("K contains NaN or infinite entries")
    lam = scipy.linalg.eigvalsh(K, check_finite=False)  # ascending
    return singular_values_from_eigenvalues(lam)


def _checked_spectrum(sigma) -> np.ndarray:
    s = np.asarray(sigma, dtype=np.float64).ravel()
    if not np.all(np.isfinite(s)):
        raise ValueError("singular values must be finite")
    if np.any(s < 0):
        raise ValueError(f"singular values must be non-negative, got minimum {s.min()!r}; clip eigenvalues of K "
                         f"at 0 before taking square roots (singular_values_from_eigenvalues does)")
    return s


def effective_rank(sigma) -> float:
    """Roy & Vetterli's effective rank exp(H(p)), p_i = σ_i / Σσ, 0·log 0 = 0.

    Uses every σ given (filter them first to drop a noise floor). An all-zero (or empty) spectrum
    has effective rank 0 by convention: the zero matrix has rank 0.
    """
    s = _checked_spectrum(sigma)
    total = s.sum()
    if total == 0.0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def numerical_rank(sigma, cutoff: float) -> int:
    """#{i : σ_i > cutoff}."""
    return int(np.count_nonzero(_checked_spectrum(sigma) > cutoff))


def condition_number(sigma, cutoff: float = 0.0) -> float:
    """σ_max / σ_min over the σ above ``cutoff``; NaN when none is."""
    s = _checked_spectrum(sigma)
    kept = s[s > cutoff]
    return float(kept.max() / kept.min()) if kept.size else math.nan


# ----------------------------------------------------------------------------------------- report

@dataclass
class SpectrumReport:
    """Singular-value summaries of J (m × p); ``singular_values`` decreasing, float64."""
    n_rows: int                      # m = n·L
    n_parameters: int | None         # p (None when only K was given)
    singular_values: np.ndarray
    sigma_max: float
    sigma_min: float                 # smallest σ above the cutoff
    cutoff: float
    cutoff_rule: str                 # the formula applied (solvers.rank.describe_rank_cutoff) or "user"
    numerical_rank: int
    effective_rank: float            # over σ > cutoff (module docstring)
    effective_rank_unfiltered: float  # over every σ
    condition_number: float          # σ_max / σ_min over σ > cutoff
    eps: float                       # ε_J, machine epsilon of J's dtype
    metadata: dict = field(default_factory=dict)

    def to_dict(self, include_singular_values: bool = False) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "singular_values"}
        out["n_singular_values"] = int(self.singular_values.size)
        for k, v in out.items():
            if isinstance(v, float) and not math.isfinite(v):
                out[k] = None if math.isnan(v) else str(v)  # JSON has no NaN/inf
        if include_singular_values:
            out["singular_values"] = self.singular_values.tolist()
        return out


def spectrum_from_singular_values(sigma, n_rows: int, n_parameters: int | None = None, *,
                                  cutoff: float | str | None = None, j_dtype="float32", accumulation="float64",
                                  metadata: dict | None = None) -> SpectrumReport:
    """A :class:`SpectrumReport` from singular values of J (any order).

    cutoff: None or "gram" (default: ``solvers.rank.rank_cutoff`` for σ computed through a Gram
    matrix accumulated in ``accumulation`` from a J of ``j_dtype``), "matrix_rank" (numpy's rule,
    route "svd" in J's precision), or a number.
    """
    from solvers.rank import describe_rank_cutoff, machine_epsilon, rank_cutoff

    s = np.sort(_checked_spectrum(sigma))[::-1]
    if n_parameters is not None:
        s = s[:min(n_rows, n_parameters)]  # J has min(m, p) singular values; the rest of K's are zeros
    if s.size == 0:
        raise ValueError("no singular values given")
    sigma_max = float(s[0])
    shape = (n_rows, n_parameters)
    if cutoff is None or cutoff == "gram":
        route = dict(route="gram", accumulation=accumulation, j_dtype=j_dtype)
    elif cutoff == "matrix_rank":
        route = dict(route="svd", accumulation=j_dtype, j_dtype=j_dtype)
    else:
        if isinstance(cutoff, str) or not (isinstance(cutoff, (int, float)) and math.isfinite(cutoff) and cutoff >= 0):
            raise ValueError(f"cutoff must be a non-negative number, 'gram' (default) or 'matrix_rank', got {cutoff!r}")
        route = None
    if route is None:
        c, rule = float(cutoff), "user"
    else:
        c, rule = rank_cutoff(s, shape, **route), describe_rank_cutoff(**route)
    kept = s[s > c]
    return SpectrumReport(
        n_rows=int(n_rows), n_parameters=None if n_parameters is None else int(n_parameters), singular_values=s,
        sigma_max=sigma_max, sigma_min=float(kept[-1]) if kept.size else math.nan, cutoff=c, cutoff_rule=rule,
        numerical_rank=int(kept.size), effective_rank=effective_rank(kept),
        effective_rank_unfiltered=effective_rank(s), condition_number=condition_number(s, c),
        eps=machine_epsilon(j_dtype),
        metadata=dict(metadata or {}))


def spectrum_from_gram(K, n_parameters: int | None = None, *, cutoff: float | str | None = None,
                       j_dtype="float32", accumulation="float64", metadata: dict | None = None) -> SpectrumReport:
    """A :class:`SpectrumReport` of J from K = J Jᵀ (n_parameters = p keeps J's min(m, p) values);
    ``accumulation``: the dtype K's products were summed in, ``j_dtype``: J's (for the cut-off)."""
    t0 = time.perf_counter()
    sigma = singular_values_from_gram(K)
    meta = {"eigh_seconds": time.perf_counter() - t0, **(metadata or {})}
    return spectrum_from_singular_values(sigma, np.shape(K)[0], n_parameters, cutoff=cutoff, j_dtype=j_dtype,
                                         accumulation=accumulation, metadata=meta)


def spectrum_of_model(model: torch.nn.Module, x, *, method: str = "structured", cutoff: float | str | None = None,
                      block_samples: int | None = None, device=None, progress: bool = True,
                      memory_budget: int | None = None) -> SpectrumReport:
    """Spectrum of J = ∇_w f(w0, x) at the model's current weights, through K (J is never formed
    with the default ``method="structured"``; see ``jacobian_store.gram``)."""
    from jacobian_store.gram import gram_matrix

    K, info = gram_matrix(model, x, method=method, block_samples=block_samples, device=device, progress=progress,
                          memory_budget=memory_budget, return_info=True)
    return spectrum_from_gram(K, info.n_parameters, cutoff=cutoff, j_dtype=info.dtype, accumulation=info.accumulation,
                              metadata={"gram": info.to_dict()})


# -------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    from jacobian_store.architectures import available_models
    from jacobian_store.arguments import add_data_arguments

    parser = argparse.ArgumentParser(
        prog="bin/spectrum",
        description="Singular values of the Jacobian J = ∇_w f(w0, X) at initialization, for one or several widths, "
                    "from K = J Jᵀ built block by block without forming J. Writes per width a JSON record and the "
                    "singular values (.npy); for all widths a Markdown table and figures.",
        epilog="Example: bin/spectrum --arch lenet --width 1 5 10 --dataset mnist --n-samples 600 --out runs/spectrum",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    net = parser.add_argument_group("network")
    net.add_argument("--arch", default="lenet", choices=available_models(), help="architecture (default lenet)")
    net.add_argument("--width", type=float, nargs="+", default=[1.0], metavar="K",
                     help="one or several width factors (default 1)")
    net.add_argument("--seed", type=int, default=0, help="seed of the initialization w0 (default 0)")
    add_data_arguments(parser)
    parser.add_argument("--n-samples", type=int, default=None, metavar="N",
                        help="class-balanced training subset J is taken on (default 600; same as --n-train)")
    run = parser.add_argument_group("computation and output")
    run.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (created)")
    run.add_argument("--method", choices=("structured", "jacobian"), default="structured",
                     help="structured: K without forming J (default); jacobian: J in row blocks (checking only)")
    run.add_argument("--cutoff", type=_cutoff_arg, default=None,
                     help="singular values ≤ cutoff count as zero: a number, 'gram' (default: max(√(max(m,p)·ε64)·σ_max, "
                          "ε_J·‖J‖_F), the rule of bin/solve --method lstsq) or 'matrix_rank' (σ_max·max(m,p)·ε_J)")
    run.add_argument("--block-samples", type=int, default=None, help="samples per Gram block (default: from the budget)")
    run.add_argument("--memory-budget", default=None,
                     help="memory for the Gram features, e.g. 2GiB (default: min(4 GiB, half the available RAM); "
                          "half the free memory on a GPU)")
    run.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda or cuda:N")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _cutoff_arg(text: str):
    if text in ("gram", "matrix_rank"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, 'gram' or 'matrix_rank', got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"a cutoff must be a non-negative number, got {text}")
    return value


def _n_samples(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.n_samples is not None and args.n_train is not None and args.n_samples != args.n_train:
        parser.error(f"--n-samples {args.n_samples} and --n-train {args.n_train} disagree; give one of them")
    n = args.n_samples if args.n_samples is not None else args.n_train if args.n_train is not None else 600
    if n < 1:
        parser.error(f"--n-samples must be at least 1, got {n}")
    return n


def _width_label(width: float) -> str:
    return f"{width:g}".replace(".", "p")


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the spectra of ``--width`` values; returns the JSON records written."""
    from jacobian_store.architectures import create_model
    from jacobian_store.provenance import dumps, library_versions
    from jacobian_store.sizes import parse_bytes
    from jacobian_store.datasets import DatasetError, dataset_from_args

    parser = build_parser()
    args = parser.parse_args(argv)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    for w in args.width:
        if not (math.isfinite(w) and w > 0):
            parser.error(f"--width values must be positive, got {w:g}")
    args.n_train = _n_samples(parser, args)
    if args.n_test is None:
        args.n_test = 1  # the spectrum needs no test split; keep its loading trivial
    try:
        budget = None if args.memory_budget is None else parse_bytes(args.memory_budget)
    except ValueError as error:
        parser.error(str(error))
    try:
        dataset = dataset_from_args(args)
    except DatasetError as error:
        parser.error(str(error))
    x = dataset.train.x
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for width in args.width:
        model = create_model(args.arch, width=width, in_channels=dataset.in_channels, n_outputs=dataset.n_outputs,
                             image_size=dataset.image_size, seed=args.seed)
        t0 = time.perf_counter()
        report = spectrum_of_model(model, x, method=args.method, cutoff=args.cutoff,
                                   block_samples=args.block_samples, device=args.device, progress=not args.quiet,
                                   memory_budget=budget)
        seconds = time.perf_counter() - t0
        stem = f"{args.arch}_w{_width_label(width)}"
        np.save(out / f"{stem}_singular_values.npy", report.singular_values)
        record = {
            "arch": args.arch, "width": width, "seed": args.seed, "n_samples": int(x.shape[0]),
            "n_outputs": int(dataset.n_outputs), "dataset": dataset.spec, "method": args.method,
            "spectrum": report.to_dict(), "singular_values_file": f"{stem}_singular_values.npy",
            "seconds": seconds, "command": " ".join(["bin/spectrum", *argv_list]),
            "versions": library_versions(), "platform": platform.platform(),
        }
        (out / f"{stem}.json").write_text(dumps(record, finite_only=False, indent=2) + "\n")
        records.append(record)
        print(f"{args.arch} ×{width:g}: m={report.n_rows} p={report.n_parameters} erank={report.effective_rank:.2f} "
              f"rank={report.numerical_rank} cond={report.condition_number:.3g} ({seconds:.1f} s)", file=sys.stderr)
        del model
    _write_table(out / f"{args.arch}_spectrum.md", records)
    _plot(out, args.arch, records)
    return records


def _write_table(path: Path, records: list[dict]) -> None:
    lines = ["| width | n·L | p | effective rank | numerical rank | condition number | cutoff |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in records:
        s = r["spectrum"]
        cond = s["condition_number"]
        cond_text = "—" if cond is None else f"{float(cond):.4g}"
        lines.append(f"| {r['width']:g} | {s['n_rows']} | {s['n_parameters']} | {s['effective_rank']:.2f} | "
                     f"{s['numerical_rank']} | {cond_text} | {s['cutoff']:.3g} |")
    first = records[0]
    lines += ["", f"{first['arch']}, {first['dataset']['name']}, {first['n_samples']} samples, "
              f"{first['n_outputs']} output(s), init seed {first['seed']}; K by the {first['method']} method. "
              f"Effective rank (Roy & Vetterli 2007), numerical rank and condition number over σ above the "
              f"cutoff ({first['spectrum']['cutoff_rule']}).", ""]
    path.write_text("\n".join(lines))


def _plot(out: Path, arch: str, records: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = [r["width"] for r in records]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(widths, [r["spectrum"]["effective_rank"] for r in records], "o-", label="effective rank")
    ax.plot(widths, [r["spectrum"]["numerical_rank"] for r in records], "s--", label="numerical rank")
    ax.axhline(records[0]["spectrum"]["n_rows"], color="gray", lw=0.8, ls=":", label="n·L")
    ax.set_xscale("log" if len(widths) > 1 and max(widths) / min(widths) > 4 else "linear")
    ax.set_xlabel("width factor k")
    ax.set_ylabel("rank of J")
    ax.set_title(f"{arch}: rank of J at initialization vs width")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{arch}_erank_vs_width.png", dpi=120)
    plt.close(fig)

    for r in records:
        sigma = np.load(out / r["singular_values_file"])
        positive = sigma[sigma > 0]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        if positive.size:
            lo, hi = positive.min(), positive.max()
            bins = np.logspace(np.log10(lo), np.log10(hi) + 1e-9, 50) if hi > lo else 10
            ax.hist(positive, bins=bins, color="C0")
            ax.set_xscale("log")
            ax.axvline(r["spectrum"]["cutoff"], color="C3", ls="--", lw=1, label="cutoff")
            ax.legend()
        ax.set_xlabel("singular value σ of J")
        ax.set_ylabel("count")
        ax.set_title(f"{arch} ×{r['width']:g}: singular values (erank {r['spectrum']['effective_rank']:.1f})")
        fig.tight_layout()
        fig.savefig(out / f"{arch}_w{_width_label(r['width'])}_singular_values.png", dpi=120)
        plt.close(fig)


if __name__ == "__main__":
    main()
    sys.exit(0)
