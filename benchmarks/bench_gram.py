"""Structured Gram K = J Jᵀ against K from a materialized J, for LeNet ×1, ×5, ×10.

    .venv/bin/python benchmarks/bench_gram.py                 # 600 MNIST samples (digits if absent)
    .venv/bin/python benchmarks/bench_gram.py --widths 1 --n-samples 100 --conv

Each case runs in its own subprocess, so timings and memory are not polluted by earlier cases:

- time: wall-clock seconds of the ``gram_matrix`` call alone (model, data and imports excluded).
- peak memory: the peak resident set size during that call minus the resident size just before
  it. On Linux the peak (``VmHWM``) is reset first by writing 5 to ``/proc/self/clear_refs``, so
  the transient peak of loading MNIST does not mask the call's own; elsewhere it falls back to the
  rise of ``resource.getrusage(...).ru_maxrss``, which can read 0 when an earlier peak was higher.
  RSS sees every host allocation, torch's CPU allocator included (tracemalloc would not), and K
  itself (n·L × n·L float64). It cannot see a GPU; on CUDA the script also reports
  ``torch.cuda.max_memory_allocated``.

The baseline is ``method="jacobian"``: J materialized by ``jacobian_rows`` (vmap of jacrev) and
K = J Jᵀ summed block by block in float64, J cached whole when the memory budget allows. A
materialized J is capped at ``--max-jacobian-gb`` (8 GB): where J for all n samples would exceed
it, both methods also run on the largest subset whose J fits, which gives the speed ratio and the
difference ‖K_s − K_J‖ / ‖K_J‖ there; the structured method still runs on all n samples. The Gram
products cost O(n²), so the baseline's time on all n is roughly (n / n_subset)² times its subset
time (printed as an estimate, marked "~").

``--conv`` adds the micro-benchmark behind the choice of unfold over ``vmap(jacrev)`` for the
convolution layers' per-row Jacobians (module docstring of ``jacobian_store/layer_jacobians.py``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def load_inputs(n: int, data_root: Path | None):
    from jacobian_store.datasets import load_dataset

    root = data_root or SHARED_DATA
    if (root / "MNIST" / "raw").is_dir():
        ds = load_dataset("mnist", data_root=root, n_train=n, n_test=1)
    else:
        ds = load_dataset("digits", n_train=n, n_test=1)
    return ds


def _proc_status(key: str) -> int:
    """A kB field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _proc_status("VmHWM") <= _proc_status("VmRSS") + 1024
    except (OSError, KeyError):
        return False


def run_case(args) -> None:
    """Child process: one (width, n, method) case; prints one JSON line, saves K to args.save."""
    import torch

    torch.set_num_threads(args.threads)
    from jacobian_store.architectures import create_model, n_parameters
    from jacobian_store.gram import gram_matrix

    ds = load_inputs(args.n_samples, args.data_root)
    x = ds.train.x
    model = create_model("lenet", width=args.width, in_channels=ds.in_channels, n_outputs=ds.n_outputs,
                         image_size=ds.image_size, seed=0)
    budget = None if args.memory_budget_gb is None else int(args.memory_budget_gb * 2**30)
    gc.collect()
    peak_reset = _reset_peak_rss()
    rss0 = _proc_status("VmRSS") if peak_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    K, info = gram_matrix(model, x, method=args.method, device=args.device, progress=False, memory_budget=budget,
                          return_info=True)
    seconds = time.perf_counter() - t0
    rss1 = _proc_status("VmHWM") if peak_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    np.save(args.save, K)
    out = {"width": args.width, "n": int(x.shape[0]), "method": args.method, "dataset": ds.name,
           "p": n_parameters(model), "seconds": seconds, "peak_rss_rise_mb": (rss1 - rss0) / 1024,
           "memory_probe": "VmHWM after clear_refs" if peak_reset else "ru_maxrss rise",
           "block_samples": info.block_samples, "panel_blocks": info.panel_blocks,
           "feature_computations": info.feature_computations}
    if torch.cuda.is_available() and str(info.device).startswith("cuda"):
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(out), flush=True)


def spawn(width: float, n: int, method: str, save: Path, opts) -> dict:
    cmd = [sys.executable, __file__, "--child", "--width", str(width), "--n-samples", str(n), "--method", method,
           "--save", str(save), "--threads", str(opts.threads), "--device", opts.device]
    if opts.data_root:
        cmd += ["--data-root", str(opts.data_root)]
    if opts.memory_budget_gb is not None:
        cmd += ["--memory-budget-gb", str(opts.memory_budget_gb)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"case width={width} n={n} method={method} failed:\n{proc.stderr[-3000:]}")


def rel_diff(ks: Path, kj: Path) -> float:
    a, b = np.load(ks), np.load(kj)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def conv_microbenchmark(widths, n: int, threads: int) -> None:
    """Per-row conv Jacobians for n samples: unfold from the structured pass vs vmap(jacrev)."""
    import torch

    torch.set_num_threads(threads)
    from jacobian_store import layer_jacobians
    from jacobian_store.architectures import create_model
    from jacobian_store.functional import initial_parameters

    print(f"\nconv layers' per-row Jacobians, {n} random 28×28 inputs, 10 outputs (best of 3):")
    print("| width | structured pass (all layers; conv by unfold) s | vmap(jacrev), conv params only s |")
    print("| ---: | ---: | ---: |")
    for w in widths:
        model = create_model("lenet", width=w, n_outputs=10, seed=0)
        x = torch.randn(n, 1, 28, 28)
        plan = layer_jacobians.layer_plan(model, x[:1])
        params = initial_parameters(model)
        conv = [name for layer in plan if layer.kind == "conv" for name in layer.param_names]
        t_unfold, t_jacrev = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            layer_jacobians.layer_factors(model, plan, params, x)
            t_unfold.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            layer_jacobians._partial_jacobian(model, params, conv, x)
            t_jacrev.append(time.perf_counter() - t0)
        print(f"| {w:g} | {min(t_unfold):.3f} | {min(t_jacrev):.3f} |", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=float, nargs="+", default=[1.0, 5.0, 10.0])
    parser.add_argument("--n-samples", type=int, default=600)
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--max-jacobian-gb", type=float, default=8.0)
    parser.add_argument("--memory-budget-gb", type=float, default=None, help="gram_matrix memory_budget (default: its own)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--conv", action="store_true", help="also run the unfold vs vmap(jacrev) micro-benchmark")
    parser.add_argument("--skip-structured-full", action="store_true", help="only the subset comparisons")
    # child mode
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--width", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    if args.child:
        run_case(args)
        return 0

    from jacobian_store.architectures import create_model, n_parameters

    ds = load_inputs(1, args.data_root)
    L = ds.n_outputs
    print(f"LeNet on {args.n_samples} {ds.name} samples, L = {L}, {args.threads} threads, device {args.device}; "
          f"time of gram_matrix, peak RSS rise across it (K included)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for w in args.widths:
            p = n_parameters(create_model("lenet", width=w, in_channels=ds.in_channels, n_outputs=L,
                                          image_size=ds.image_size))
            j_gb = args.n_samples * L * p * 4 / 1e9
            n_sub = min(args.n_samples, int(args.max_jacobian_gb * 1e9 // (L * p * 4)))
            row = {"width": w, "p": p, "n": args.n_samples, "J_gb": j_gb, "n_compare": n_sub}
            if n_sub < 1:
                row["note"] = f"J of one sample exceeds {args.max_jacobian_gb:g} GB; no baseline"
            else:
                s = spawn(w, n_sub, "structured", tmp / "ks.npy", args)
                j = spawn(w, n_sub, "jacobian", tmp / "kj.npy", args)
                row.update(struct_cmp=s, jac_cmp=j, rel_diff=rel_diff(tmp / "ks.npy", tmp / "kj.npy"),
                           speedup=j["seconds"] / s["seconds"])
                print(f"  ×{w:g} on {n_sub} samples: structured {s['seconds']:.1f} s / {s['peak_rss_rise_mb']:.0f} MB, "
                      f"jacobian {j['seconds']:.1f} s / {j['peak_rss_rise_mb']:.0f} MB, speed-up {row['speedup']:.1f}×, "
                      f"‖K_s − K_J‖/‖K_J‖ = {row['rel_diff']:.2e}", flush=True)
            if n_sub < args.n_samples and not args.skip_structured_full:
                s = spawn(w, args.n_samples, "structured", tmp / "ks.npy", args)
                row["struct_full"] = s
                print(f"  ×{w:g} on {args.n_samples} samples: structured {s['seconds']:.1f} s / "
                      f"{s['peak_rss_rise_mb']:.0f} MB (J would be {j_gb:.1f} GB)", flush=True)
            rows.append(row)

    print(f"\n| width | p | J for n={args.n_samples} (GB) | structured s | structured peak MB | "
          f"jacobian s | jacobian peak MB | speed-up | ‖K_s−K_J‖/‖K_J‖ | compared on n |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        full = r.get("struct_full") or r.get("struct_cmp")
        s_time = f"{full['seconds']:.1f}" if full else "—"
        s_mem = f"{full['peak_rss_rise_mb']:.0f}" if full else "—"
        if "jac_cmp" in r:
            j = r["jac_cmp"]
            scale = (r["n"] / r["n_compare"]) ** 2
            j_time = f"{j['seconds']:.1f}" if r["n_compare"] == r["n"] else f"~{j['seconds'] * scale:.0f} (measured {j['seconds']:.1f} on {r['n_compare']})"
            j_mem = f"{j['peak_rss_rise_mb']:.0f}" + ("" if r["n_compare"] == r["n"] else f" (on {r['n_compare']})")
            ratio, diff = f"{r['speedup']:.1f}×", f"{r['rel_diff']:.1e}"
        else:
            j_time = j_mem = ratio = diff = "skipped"
        print(f"| {r['width']:g} | {r['p']:,} | {r['J_gb']:.1f} | {s_time} | {s_mem} | {j_time} | {j_mem} | {ratio} | "
              f"{diff} | {r['n_compare']} |")
    print("\nspeed-up and difference are measured on the 'compared on n' samples (J ≤ "
          f"{args.max_jacobian_gb:g} GB); '~' marks the baseline time scaled by (n/n_compare)².")
    if args.conv:
        conv_microbenchmark([w for w in args.widths if w <= 5], 100, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
