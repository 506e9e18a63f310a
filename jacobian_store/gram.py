"""The Gram matrix K = J Jᵀ of a network at its current weights w0, without materializing J.

K is n·L × n·L (rows sample-major: row i·L + l is output l of sample i, DESIGN.md) and
K[(i,l), (j,m)] = ⟨∇_w f_l(w0, x_i), ∇_w f_m(w0, x_j)⟩. It is the tier-2 object of the design: any
width, bounded by n. It is accumulated block by block over pairs of sample blocks (I, J): the per-layer
factors are computed in the model's dtype (float32) on the device, and their products are taken
in float64 (the factors converted column slice by column slice) and added into a float64 K on the
host. Float64 products make K's rounding that of float64 sums, so its spectrum resolves σ down to
√(max(m, p)·ε₆₄)·σ_max, the cut-off of ``solvers/rank.py`` that the solvers use too; float32
products would blur σ below √ε₃₂·σ_max ≈ 3.5e-4·σ_max. :func:`gram_matrix` gives K(X, X) (only
the blocks J ≤ I are computed, the rest mirrored); :func:`cross_gram_matrix` gives K(X1, X2) = J(X1) J(X2)ᵀ, the kernel needed to predict on new inputs.

Implementations (:class:`GramImplementation`, dispatched through ``_implementation_to_fn``):

- ``"structured"`` (default): the per-layer factors of ``jacobian_store.layer_jacobians``
  (``layer_factors``): for a linear layer its inputs A and output gradients Δ, whose share of K is
  (Δ Δᵀ) ∘ (A Aᵀ + 1) without ever forming the layer's weight Jacobian; for a convolution (and any
  other layer) its Jacobian piece G, whose share is G_I G_Jᵀ. Why this wins, and when, is in that
  module's docstring: whenever the parameters sit mostly in linear layers (every width of LeNet and
  AlexNet), the dense fully connected weights that dominate p never enter a product.

- ``"jacobian"``: the oracle. Materializes J in row blocks with
  :func:`jacobian_store.functional.jacobian_rows` and sums J_I J_Jᵀ. Costs O(n²·L²·p) and
  n·L·p·4 bytes per cached block; only wins for tiny models (no per-layer bookkeeping), and is
  what the structured method is tested against.

Assumption (both methods): samples do not interact in the forward pass (no batch statistics,
e.g. BatchNorm in training mode), so a batch's outputs are the per-sample outputs.

Memory: block sizes come from ``memory_budget`` (bytes for the features alive at once and the
work of computing one block; default: half the free GPU memory, or min(4 GiB, half the available
RAM) on the CPU). When the features of all samples fit, every block is computed once. Otherwise
a panel of row blocks is kept in memory while the other blocks stream past it, recomputed once per
panel: about B + B²/(2·panel) feature computations for B blocks. K itself (n·L × n·L float64) lives
in host memory outside the budget, and so do the float64 copies of one column slice of two factors
(64 MiB). Cost of the float64 products, measured against float32 ones (300 digits samples, 10
outputs, 2 CPU threads): ×1.25 at LeNet×1 (12.4 s against 9.9 s) and ×1.3 at ×5.
"""
from __future__ import annotations

import copy
import enum
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from .device import Device, resolve_device
from .functional import initial_parameters
from .layer_jacobians import LayerFactors, factor_bytes_per_sample, jacobian_factors, layer_factors, layer_plan
from .progress import progress_bar
from .sizes import available_memory

logger = logging.getLogger(__name__)

__all__ = ["GramImplementation", "GramInfo", "gram_matrix", "cross_gram_matrix"]

# Bytes of the float64 copies of one column slice of two factors (X_I, X_J) in a block product:
# the float32 factors are converted slice by slice, so the copies stay this small while each slice
# is still a large, efficient GEMM (at b·L = 4,096 rows: 1,024 columns).
_FLOAT64_SLICE_BYTES = 64 * 2**20


class GramImplementation(str, enum.Enum):
    """How K = J Jᵀ is computed (see the module docstring for when each wins)."""
    STRUCTURED = "structured"
    JACOBIAN = "jacobian"


@dataclass
class GramInfo:
    """What ran: recorded next to K so a result says how it was made."""
    method: str
    n_rows: tuple[int, int]
    n_outputs: int
    n_parameters: int
    block_samples: int
    n_blocks: tuple[int, int]
    panel_blocks: int            # row blocks kept in memory at once (all: every block computed once)
    feature_computations: int
    memory_budget: int
    device: str
    dtype: str                   # of the per-layer factors (the model's)
    seconds: float
    layers: dict[str, str] = field(default_factory=dict)  # module name → "linear" | "conv" | "generic"
    accumulation: str = "float64"  # dtype the products of factors are taken and summed in

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def _add_products64(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """out += x yᵀ with the products taken in float64, x and y converted one column slice at a time."""
    step = max(1, _FLOAT64_SLICE_BYTES // (8 * (x.shape[0] + y.shape[0])))
    for c in range(0, x.shape[1], step):
        out.addmm_(x[:, c:c + step].double(), y[:, c:c + step].double().T)
    return out


def _block_gram(fi: LayerFactors, fj: LayerFactors, n_out: int) -> torch.Tensor:
    """K block between two sample blocks, float64 on the factors' device."""
    out = torch.zeros(fi.rows, fj.rows, dtype=torch.float64, device=_device_of(fi, fj))
    for gi, gj in zip(fi.dense, fj.dense):
        _add_products64(out, gi, gj)
    bi, bj = fi.rows // n_out, fj.rows // n_out
    view = out.view(bi, n_out, bj, n_out)
    for (ai, di, bias), (aj, dj, _) in zip(fi.linear, fj.linear):
        aa = _add_products64(torch.full((bi, bj), 1.0 if bias else 0.0, dtype=torch.float64, device=out.device),
                             ai, aj)                             # a_i·a_j (+ 1: the bias's share δ_il·δ_jm)
        dd = _add_products64(torch.zeros(fi.rows, fj.rows, dtype=torch.float64, device=out.device),
                             di, dj).view(bi, n_out, bj, n_out)  # δ_il·δ_jm
        view += dd * aa[:, None, :, None]
    return out


def _device_of(fi: LayerFactors, fj: LayerFactors) -> torch.device:
    for t in fi.dense + [a for a, _, _ in fi.linear]:
        return t.device
    return torch.device("cpu")


def _default_budget(device: torch.device) -> int:
    """Half the free memory of ``device``, and at most 4 GiB on the CPU."""
    available = available_memory(device)
    if device.type == "cuda":
        return int(0.5 * available)
    cap = 4 << 30
    return cap if available is None else int(min(cap, 0.5 * available))


def _accumulate(feature_fn: Callable, model, plan, params, x1: torch.Tensor, x2: torch.Tensor | None,
                n_out: int, block: int, panel: int, device: torch.device, progress: bool, desc: str):
    """Sum the block products into a float64 host array; returns (K, feature computations).

    Panels of ``panel`` consecutive row blocks of x1 are kept in memory; every pair inside a panel
    is formed from them, and each block of the other side (the earlier blocks, for K(X, X)) is
    computed once per panel and paired with the whole panel. Feature computations: for K(X, X)
    with B blocks, B + Σ_panels (first block of the panel) ≈ B + B²/(2·panel); B when panel ≥ B.
    """
    symmetric = x2 is None
    xs2 = x1 if symmetric else x2
    starts1 = list(range(0, x1.shape[0], block))
    starts2 = list(range(0, xs2.shape[0], block))
    K = np.zeros((x1.shape[0] * n_out, xs2.shape[0] * n_out), dtype=np.float64)
    count = [0]

    def features(x, s):
        count[0] += 1
        return feature_fn(model, plan, params, x[s:s + block].to(device))

    def put(i, j, fi, fj):
        blk = _block_gram(fi, fj, n_out).cpu().numpy()
        if symmetric and i == j:
            # A diagonal block is one product, symmetric up to rounding only: symmetrize it
            # (the off-diagonal blocks are mirrored exactly), with no temporary of K's size.
            blk = 0.5 * (blk + blk.T)
        r, c = starts1[i] * n_out, starts2[j] * n_out
        K[r:r + blk.shape[0], c:c + blk.shape[1]] = blk
        if symmetric and i != j:
            K[c:c + blk.shape[1], r:r + blk.shape[0]] = blk.T
        bar.update()

    n_pairs = len(starts1) * (len(starts1) + 1) // 2 if symmetric else len(starts1) * len(starts2)
    bar = progress_bar(total=n_pairs, desc=desc, enabled=progress, unit="block")
    for p0 in range(0, len(starts1), panel):
        members = range(p0, min(p0 + panel, len(starts1)))
        cached = {i: features(x1, starts1[i]) for i in members}
        if symmetric:
            for i in members:
                for j in range(p0, i + 1):
                    put(i, j, cached[i], cached[j])
            outside = range(p0)
        else:
            outside = range(len(starts2))
        for j in outside:
            fj = features(xs2, starts2[j])
            for i in members:
                put(i, j, cached[i], fj)
            del fj
        del cached
    bar.close()
    return K, count[0]


# ------------------------------------------------------------------------------------- public

def _resolve_device(model: nn.Module, device) -> Device:
    """None: where the model's parameters are; else ``resolve_device``'s vocabulary."""
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else "cpu"
    return resolve_device(device)


def _as_batch(x, name: str, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array of inputs (n, ...), got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"{name} must be a batch of inputs with shape (n, ...), e.g. (n, C, H, W) images; "
                         f"got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); pass at least one sample")
    if not x.is_floating_point():
        raise TypeError(f"{name} must hold floating-point inputs, got dtype {x.dtype}")
    return x.detach().to(dtype)


def _prepare(model, x1, x2, method, block_samples, device, memory_budget):
    try:
        implementation = GramImplementation(method)
    except ValueError:
        raise ValueError(f"unknown Gram method {method!r}; choose one of "
                         f"{', '.join(repr(m.value) for m in GramImplementation)}") from None
    if next(model.parameters(), None) is None:
        raise ValueError(f"{type(model).__name__} has no parameters, so J has no columns and K is empty")
    if block_samples is not None and not (isinstance(block_samples, int) and block_samples > 0):
        raise ValueError(f"block_samples must be a positive integer or None (chosen from the memory budget), "
                         f"got {block_samples!r}")
    dev = _resolve_device(model, device).torch
    dtype = next(model.parameters()).dtype
    x1 = _as_batch(x1, "x", dtype)
    x2 = None if x2 is None else _as_batch(x2, "x2", dtype)
    if x2 is not None and tuple(x2.shape[1:]) != tuple(x1.shape[1:]):
        raise ValueError(f"x and x2 must hold inputs of the same shape, got {tuple(x1.shape[1:])} and {tuple(x2.shape[1:])}")
    if next(model.parameters()).device != dev:
        model = copy.deepcopy(model).to(dev)
    probe = x1[:1].to(dev)
    try:
        with torch.no_grad():
            out = model(probe)
    except Exception as err:  # a wrong input shape surfaces here as a shape error deep in the model
        raise ValueError(f"{type(model).__name__} cannot be evaluated on inputs of shape {tuple(x1.shape[1:])} "
                         f"(x has shape {tuple(x1.shape)}; expected a batch (n, C, H, W) the model accepts): {err}") from err
    if out.ndim != 2:
        raise ValueError(f"the model must return a (batch, L) tensor of outputs, got shape {tuple(out.shape)} "
                         f"for a batch of one")
    n_out = out.shape[1]
    plan = layer_plan(model, probe)
    budget = _default_budget(dev) if memory_budget is None else int(memory_budget)
    return implementation, model, x1, x2, dev, dtype, probe, n_out, plan, budget


def _choose_blocks(implementation, model, plan, probe, n_out, itemsize, n1, n_params, budget, block_samples) -> tuple[int, int]:
    """Samples per block and blocks per cached panel, from the memory budget.

    Per sample, ``kept`` bytes of features stay alive with their block and ``work`` bytes more are
    needed while a block is computed. If the features of every sample fit next to one computation,
    everything is computed once. Otherwise a block's computation gets a quarter of the budget and
    the rest holds a panel of blocks (``_accumulate``).
    """
    if implementation is GramImplementation.STRUCTURED:
        work, kept = factor_bytes_per_sample(model, plan, probe, n_out, itemsize)
    else:
        kept = itemsize * n_out * n_params
        work = 3 * kept  # jacrev's per-tensor Jacobians, the concatenation, the graph
    transient = work - kept
    fits = n1 * kept + transient <= budget
    if block_samples is None:
        room = budget - n1 * kept if fits else budget // 4
        block_samples = max(1, min(n1, int(room // max(1, transient if fits else work))))
        # A K block is (b·L)² float64 with a few temporaries of that size: keep them under budget/4.
        block_samples = max(1, min(block_samples, int(math.sqrt(budget / 4 / 24)) // n_out))
    n_blocks = math.ceil(n1 / block_samples)
    if n1 * kept + block_samples * transient <= budget:
        return block_samples, n_blocks
    # Alive while a block streams past a panel: the panel, the streamed block, one block's work.
    spare = budget - block_samples * (kept + transient)
    panel = max(1, min(n_blocks, int(spare // max(1, block_samples * kept))))
    return block_samples, panel


def gram_matrix(model: nn.Module, x, *, method: str | GramImplementation = "structured",
                block_samples: int | None = None, device=None, progress: bool = True,
                memory_budget: int | None = None, return_info: bool = False):
    """K = J(X) J(X)ᵀ at the model's current weights: an (n·L × n·L) float64 array, sample-major.

    Parameters
    ----------
    model : nn.Module mapping a batch (n, ...) to outputs (n, L); its weights are w0.
    x : inputs, (n, ...) tensor or array.
    method : "structured" (default; J never formed) or "jacobian" (J materialized in row blocks; the
        oracle). See :class:`GramImplementation`.
    block_samples : samples per block; default chosen from ``memory_budget``.
    device : where the float32 work runs: None (the model's device), "auto", "cpu", "cuda", ….
        The model is copied there if needed; the caller's model is not moved.
    progress : tqdm progress bar over block pairs.
    memory_budget : bytes for the features alive at once (see the module docstring).
    return_info : also return a :class:`GramInfo` saying what ran.
    """
    return _run(model, x, None, method, block_samples, device, progress, memory_budget, return_info)


def cross_gram_matrix(model: nn.Module, x1, x2, *, method: str | GramImplementation = "structured",
                      block_samples: int | None = None, device=None, progress: bool = True,
                      memory_budget: int | None = None, return_info: bool = False):
    """K(X1, X2) = J(X1) J(X2)ᵀ: (n1·L × n2·L) float64, rows and columns sample-major.

    With α solving K(X, X) α = r, kernel predictions on new inputs are K(X_new, X) α = J(X_new) u for
    u = J(X)ᵀ α. Same arguments as :func:`gram_matrix`.
    """
    return _run(model, x1, x2, method, block_samples, device, progress, memory_budget, return_info)


def _run(model, x1, x2, method, block_samples, device, progress, memory_budget, return_info):
    with _resolve_device(model, device).exact_float32():
        return _run_exact(model, x1, x2, method, block_samples, device, progress, memory_budget, return_info)


def _run_exact(model, x1, x2, method, block_samples, device, progress, memory_budget, return_info):
    t0 = time.perf_counter()
    implementation, model, x1, x2, dev, dtype, probe, n_out, plan, budget = _prepare(
        model, x1, x2, method, block_samples, device, memory_budget)
    n_params = sum(p.numel() for p in model.parameters())
    itemsize = torch.empty((), dtype=dtype).element_size()
    block, panel = _choose_blocks(implementation, model, plan, probe, n_out, itemsize, x1.shape[0], n_params,
                                  budget, block_samples)
    params = initial_parameters(model)
    K, computations = _implementation_to_fn[implementation](model, plan, params, x1, x2, n_out, block, panel,
                                                              dev, progress)
    info = GramInfo(method=implementation.value, n_rows=(K.shape[0], K.shape[1]), n_outputs=n_out,
                    n_parameters=n_params, block_samples=block,
                    n_blocks=(math.ceil(x1.shape[0] / block), math.ceil((x1 if x2 is None else x2).shape[0] / block)),
                    panel_blocks=panel, feature_computations=computations, memory_budget=budget, device=str(dev),
                    dtype=str(dtype).replace("torch.", ""), seconds=time.perf_counter() - t0,
                    layers={(layer.name or "<root>"): layer.kind for layer in plan})
    logger.info("gram %s: %d×%d in %.1f s (blocks of %d samples, panels of %d blocks, %d feature computations)",
                info.method, K.shape[0], K.shape[1], info.seconds, block, panel, computations)
    return (K, info) if return_info else K


def _gram_structured(model, plan, params, x1, x2, n_out, block, panel, device, progress):
    """Outer-product structure for linear layers, im2col Jacobians for convolutions (``layer_jacobians``)."""
    with torch.no_grad():
        return _accumulate(layer_factors, model, plan, params, x1, x2, n_out, block, panel, device,
                           progress, "gram (structured)")


def _gram_jacobian(model, plan, params, x1, x2, n_out, block, panel, device, progress):
    """J materialized in row blocks by jacobian_rows; K_IJ = J_I J_Jᵀ. The oracle."""
    return _accumulate(jacobian_factors, model, plan, params, x1, x2, n_out, block, panel, device,
                       progress, "gram (jacobian)")


_implementation_to_fn = {
    GramImplementation.STRUCTURED: _gram_structured,
    GramImplementation.JACOBIAN: _gram_jacobian,
}
