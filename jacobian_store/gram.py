"""The Gram matrix K = J Jᵀ of a network at its current weights w0, without materializing J.

K is n·L × n·L (rows sample-major: row i·L + l is output l of sample i, DESIGN.md) and
K[(i,l), (j,m)] = ⟨∇_w f_l(w0, x_i), ∇_w f_m(w0, x_j)⟩. It is the tier-2 object of the design: any
width, bounded by n. It is accumulated block by block over pairs of sample blocks (I, J), each block
product computed in the model's dtype (float32) on the device and added into a float64 K on the
host. :func:`gram_matrix` gives K(X, X) (only the blocks J ≤ I are computed, the rest mirrored);
:func:`cross_gram_matrix` gives K(X1, X2) = J(X1) J(X2)ᵀ, the kernel needed to predict on new inputs.

Implementations (:class:`GramImplementation`, dispatched through ``_implementation_to_fn``):

- ``"structured"`` (default): one forward pass and one backward pass batched over the L outputs
  (``is_grads_batched``) per block of samples give, for every parametrized layer, its inputs and
  the gradients of each output with respect to its outputs (Δ). Then, per layer kind:

  * ``nn.Linear`` (2-D input): the per-row gradient of z = W a + b is δ ⊗ a (and δ for the bias),
    so ⟨δ_il ⊗ a_i, δ_jm ⊗ a_j⟩ = (δ_il·δ_jm)(a_i·a_j) and the layer's share of K is
    (Δ Δᵀ) ∘ (A Aᵀ + 1) with A Aᵀ broadcast over the outputs l, m. Cost O(n²·(fan_in + L²·fan_out)),
    not O(n²·L²·fan_in·fan_out), and the layer's weight Jacobian is never formed.
  * ``nn.Conv2d`` (groups 1, numeric zero padding): the per-row weight gradient is
    G_il = Δ_il U_iᵀ with U_i the C_in·k² × P input patches (im2col), formed for the whole block by
    one batched matmul, and K gets G_I G_Jᵀ: C_out·C_in·k² per row pair. Why materialize: the
    structured alternative ⟨G_il, G_jm⟩ = ⟨Δ_il (U_iᵀ U_j), Δ_jm⟩ costs about
    P²·(C_in·k²/L² + C_out/L) per row pair, more in LeNet up to width ≈ 13 (conv1: P = 784;
    conv2 at ×10: 3.1e5 against 2.4e5) and in AlexNet's early layers. Why im2col rather than
    ``vmap(jacrev)`` over the conv parameters: the Δ are already there from the backward pass the
    linear layers need, so a conv layer's Jacobian is one batched matmul instead of a second,
    vectorized backward pass through the whole network. Measured (``benchmarks/bench_gram.py
    --conv``, 100 inputs, 2 CPU threads, best of 3): the whole structured pass, linear layers
    included, 0.054 s at LeNet×1 and 0.43 s at ×5, against 0.069 s and 0.74 s for ``vmap(jacrev)``
    over the conv parameters alone. The patches are built from strided windows, not ``F.unfold``, which
    took about 2 s for 100 LeNet inputs on this CPU.
  * anything else that holds parameters (another layer type, a Linear on 3-D input, a Conv2d with
    groups or string padding, a module called more than once per forward): per-layer Jacobians by
    ``vmap(jacrev)`` restricted to those parameters, then G_I G_Jᵀ like the convolutions.

  Wins whenever the parameters sit mostly in linear layers (every width of LeNet and AlexNet):
  the dense fully connected weights that dominate p never enter a product.

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
in host memory outside the budget.
"""
from __future__ import annotations

import copy
import enum
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

from .device import Device, resolve_device
from .functional import initial_parameters, jacobian_rows, parameter_layout
from .sizes import available_memory

logger = logging.getLogger(__name__)

__all__ = ["GramImplementation", "GramInfo", "gram_matrix", "cross_gram_matrix", "layer_plan",
           "structured_jacobian_rows"]

# Columns per float32 product before the partial sum is added into float64: bounds the length of
# float32 accumulations (rounding grows with it); each chunk is still a large, efficient GEMM.
_COLUMN_CHUNK = 16384


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
    dtype: str
    seconds: float
    layers: dict[str, str] = field(default_factory=dict)  # module name → "linear" | "conv" | "generic"

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


# --------------------------------------------------------------------------------------- layers

@dataclass
class _Layer:
    name: str                     # module name ("" for the root)
    kind: str                     # "linear" | "conv" | "generic"
    module: nn.Module
    param_names: list[str]        # full names, as in model.named_parameters()
    n_params: int


def _probe_forward(model: nn.Module, x_probe: torch.Tensor, hooks: list[tuple[nn.Module, Callable]]) -> None:
    """One no-grad forward pass of ``x_probe`` with the given (module, forward hook) pairs attached."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        with torch.no_grad():
            model(x_probe)
    finally:
        for h in handles:
            h.remove()


def layer_plan(model: nn.Module, x_probe: torch.Tensor) -> list[_Layer]:
    """Classify every module that directly holds parameters, from one probe forward pass.

    ``nn.Linear`` called once per forward on a 2-D input → "linear" (outer-product structure);
    ``nn.Conv2d`` called once, groups 1, numeric zero padding → "conv" (unfold); any other module
    holding parameters, or a shared parameter → "generic" (per-layer ``vmap(jacrev)``). Modules
    never called contribute zero columns to J and are left out.
    """
    full_names = {id(p): name for name, p in model.named_parameters()}
    owners: dict[int, int] = {}
    for _, m in model.named_modules():
        for _, p in m.named_parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1

    candidates = []
    for mname, m in model.named_modules():
        own = [(pn, p) for pn, p in m.named_parameters(recurse=False)]
        if own:
            candidates.append((mname, m, own))

    calls: dict[str, list[tuple]] = {mname: [] for mname, _, _ in candidates}
    _probe_forward(model, x_probe, [
        (m, lambda mod, inp, out, _n=mname: calls[_n].append(
            tuple(inp[0].shape) if inp and torch.is_tensor(inp[0]) else None))
        for mname, m, _ in candidates])

    plan = []
    for mname, m, own in candidates:
        seen = calls[mname]
        if not seen:
            continue
        names = [full_names[id(p)] for _, p in own if id(p) in full_names]
        shared = any(owners[id(p)] > 1 for _, p in own)
        kind = "generic"
        if len(seen) == 1 and not shared and seen[0] is not None:
            if type(m) is nn.Linear and len(seen[0]) == 2:
                kind = "linear"
            elif (type(m) is nn.Conv2d and len(seen[0]) == 4 and m.groups == 1
                  and m.padding_mode == "zeros" and not isinstance(m.padding, str)):
                kind = "conv"
        plan.append(_Layer(mname, kind, m, names, sum(p.numel() for _, p in own)))
    # Names owned by shared parameters may repeat across generic layers: keep each once.
    taken: set[str] = set()
    for layer in plan:
        layer.param_names = [n for n in layer.param_names if not (n in taken or taken.add(n))]
    return plan


# ------------------------------------------------------------------------------------- features

@dataclass
class _Features:
    """Per-block factors whose pairwise products sum to the block of K."""
    rows: int                                   # b·L
    dense: list[torch.Tensor]                   # (b·L, p_k) Jacobian pieces: G_I G_Jᵀ
    linear: list[tuple[torch.Tensor, torch.Tensor, bool]]  # (A (b, fan_in), Δ (b·L, fan_out), has_bias)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.dense) + sum(
            a.numel() * a.element_size() + d.numel() * d.element_size() for a, d, _ in self.linear)


def _inputs_and_deltas(model: nn.Module, structured: list[_Layer], params: dict[str, torch.Tensor],
                       x: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int, int]:
    """(A, Δ) for each linear or conv layer, and (b, L).

    A is the layer's input and Δ[i, l] = ∂f_l(x_i)/∂z_i (shape (b, L, *z.shape[1:])) the gradient at
    its output z: one forward pass and one backward pass batched over the L one-hot cotangents.
    """
    if not structured:  # nothing to differentiate here; the caller handles every layer generically
        with torch.no_grad():
            batch, n_out = functional_call(model, params, (x,)).shape
        return [], batch, n_out
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(_module, inputs, output, name):
        captured[name] = (inputs[0].detach(), output)

    handles = [layer.module.register_forward_hook(lambda m, i, o, _n=layer.name: hook(m, i, o, _n))
               for layer in structured]
    try:
        with torch.enable_grad():
            # Parameters requiring grad keep every layer output in the graph, whatever the caller's
            # requires_grad flags are; autograd.grad below only walks paths to the layer outputs.
            f = functional_call(model, {k: v.detach().requires_grad_(True) for k, v in params.items()}, (x,))
            batch, n_out = f.shape
            cotangents = torch.eye(n_out, dtype=f.dtype, device=f.device).unsqueeze(1).expand(n_out, batch, n_out)
            grads = torch.autograd.grad(f, [captured[layer.name][1] for layer in structured],
                                        grad_outputs=cotangents, is_grads_batched=True, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    pairs = []
    for layer, grad in zip(structured, grads):
        a, z = captured[layer.name]
        delta = torch.zeros((n_out, *z.shape), dtype=z.dtype, device=z.device) if grad is None else grad
        pairs.append((a, delta.transpose(0, 1)))
    return pairs, batch, n_out


def _structured_features(model: nn.Module, plan: list[_Layer], params: dict[str, torch.Tensor],
                         xb: torch.Tensor) -> _Features:
    structured = [layer for layer in plan if layer.kind in ("linear", "conv")]
    generic = [layer for layer in plan if layer.kind == "generic"]
    pairs, batch, n_out = _inputs_and_deltas(model, structured, params, xb)

    dense, linear = [], []
    for layer, (a, delta) in zip(structured, pairs):
        m = layer.module
        if layer.kind == "linear":
            linear.append((a, delta.reshape(batch * n_out, -1), m.bias is not None))
        else:
            c_out = m.out_channels
            patches = _patches(a, m)                                         # (b, P, C_in·kh·kw)
            d = delta.reshape(batch, n_out * c_out, -1)                     # (b, L·C_out, P)
            # Per-row weight gradient Δ_il U_iᵀ, columns ordered (C_in, kh, kw) like the weight.
            dense.append(torch.bmm(d, patches).reshape(batch * n_out, -1))
            if m.bias is not None:
                dense.append(d.sum(dim=2).reshape(batch * n_out, c_out))
    if generic:
        names = [n for layer in generic for n in layer.param_names]
        dense.append(_partial_jacobian(model, params, names, xb))
    del pairs
    return _Features(batch * n_out, dense, linear)


def structured_jacobian_rows(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                             plan: list[_Layer] | None = None) -> torch.Tensor:
    """J(x) for a batch of b samples, (b·L) × p, assembled layer by layer from the Gram's factors.

    One forward pass records each layer's input A and output z; one batched backward pass (L
    cotangents at once) gives Δ_il = ∂f_l(x_i)/∂z_i. Then a linear layer's rows δ_il ⊗ a_i are
    written straight into their columns of the result, a convolution's rows Δ_il Uᵢᵀ (Uᵢ: the
    input patches) by one batched matmul, and any other layer falls back to per-layer
    ``vmap(jacrev)``. J is written once, with no per-layer intermediate and no concatenation:
    that is what ``vmap(jacrev)`` of the whole network (``functional.jacobian_rows``, the oracle in
    the tests) spends its memory traffic on at large widths.
    """
    plan = layer_plan(model, x[:1]) if plan is None else plan
    slots = {s.name: s for s in parameter_layout(model)}
    n_params = sum(s.size for s in slots.values())
    structured = [layer for layer in plan if layer.kind in ("linear", "conv")]
    generic = [layer for layer in plan if layer.kind == "generic"]
    pairs, batch, n_out = _inputs_and_deltas(model, structured, params, x)
    first = next(iter(params.values()))
    dtype, device = first.dtype, first.device
    covered = sum(slots[n].size for layer in plan for n in layer.param_names)
    # Parameters the forward pass never uses have zero columns; when there are none, skip the fill.
    allocate = torch.empty if covered == n_params else torch.zeros
    J = allocate(batch, n_out, n_params, dtype=dtype, device=device)
    for layer, (a, delta) in zip(structured, pairs):
        m = layer.module
        weight = slots[f"{layer.name}.weight" if layer.name else "weight"]
        columns = J[:, :, weight.offset:weight.offset + weight.size]
        if layer.kind == "linear":
            torch.mul(delta.unsqueeze(3), a[:, None, None, :], out=columns.view(batch, n_out, *m.weight.shape))
        else:
            patches = _patches(a, m)                                     # (b, P, C_in·kh·kw)
            per_row = torch.matmul(delta.reshape(batch, n_out, m.out_channels, -1), patches.unsqueeze(1))
            columns.copy_(per_row.reshape(batch, n_out, -1))
            delta = delta.sum(dim=(3, 4))                                # bias gradient: Δ summed over positions
        if m.bias is not None:
            bias = slots[f"{layer.name}.bias" if layer.name else "bias"]
            J[:, :, bias.offset:bias.offset + bias.size] = delta.reshape(batch, n_out, -1)
    if generic:
        names = [n for layer in generic for n in layer.param_names]
        pieces = _partial_jacobian(model, params, names, x).reshape(batch, n_out, -1)
        start = 0
        for name in names:
            slot = slots[name]
            J[:, :, slot.offset:slot.offset + slot.size] = pieces[:, :, start:start + slot.size]
            start += slot.size
    return J.reshape(batch * n_out, n_params)


def _patches(a: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Input patches of a convolution, (b, P, C_in·kh·kw) with P = H_out·W_out (im2col).

    Built from strided windows (``Tensor.unfold``) and one copy: on the CPU ``F.unfold`` was 15 to
    100 times slower in our measurements (about 2 s for 100 LeNet inputs against 0.02–0.14 s).
    """
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    if ph or pw:
        a = F.pad(a, (pw, pw, ph, ph))
    windows = a.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)  # (b, C, Ho, Wo, eh, ew)
    windows = windows[..., ::dh, ::dw]                                              # (b, C, Ho, Wo, kh, kw)
    b, c, ho, wo = windows.shape[:4]
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(b, ho * wo, c * kh * kw)


def _partial_jacobian(model: nn.Module, params: dict[str, torch.Tensor], names: Sequence[str],
                      xb: torch.Tensor) -> torch.Tensor:
    """The columns of J(xb) for the parameters ``names`` only: (b·L) × Σ sizes, by vmap(jacrev)."""
    fixed = {k: v for k, v in params.items() if k not in names}
    sub = {k: params[k] for k in names}

    def single_output(p, xi):
        return functional_call(model, {**fixed, **p}, (xi.unsqueeze(0),)).squeeze(0)

    per_tensor = vmap(jacrev(single_output), in_dims=(None, 0))(sub, xb)
    batch, n_out = xb.shape[0], next(iter(per_tensor.values())).shape[1]
    return torch.cat([j.reshape(batch, n_out, -1) for j in per_tensor.values()], dim=2).reshape(batch * n_out, -1)


def _jacobian_features(model: nn.Module, plan, params: dict[str, torch.Tensor], xb: torch.Tensor) -> _Features:
    rows = jacobian_rows(model, params, xb)
    return _Features(rows.shape[0], [rows], [])


def _block_gram(fi: _Features, fj: _Features, n_out: int) -> torch.Tensor:
    """K block between two sample blocks, float64 on the features' device."""
    out = torch.zeros(fi.rows, fj.rows, dtype=torch.float64, device=_device_of(fi, fj))
    for gi, gj in zip(fi.dense, fj.dense):
        for c in range(0, gi.shape[1], _COLUMN_CHUNK):
            out += (gi[:, c:c + _COLUMN_CHUNK] @ gj[:, c:c + _COLUMN_CHUNK].T).double()
    bi, bj = fi.rows // n_out, fj.rows // n_out
    view = out.view(bi, n_out, bj, n_out)
    for (ai, di, bias), (aj, dj, _) in zip(fi.linear, fj.linear):
        aa = (ai @ aj.T).double()                              # a_i·a_j
        if bias:
            aa += 1.0                                           # the bias's share: δ_il·δ_jm
        dd = (di @ dj.T).double().view(bi, n_out, bj, n_out)   # δ_il·δ_jm
        view += dd * aa[:, None, :, None]
    return out


def _device_of(fi: _Features, fj: _Features) -> torch.device:
    for t in fi.dense + [a for a, _, _ in fi.linear]:
        return t.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------- scheduling

def _structured_bytes_per_sample(plan: list[_Layer], probe: dict, n_out: int, itemsize: int) -> int:
    """Bytes of features kept per sample, plus the transient peak of computing them."""
    kept = transient = 0
    for layer in plan:
        in_numel, out_numel = probe[layer.name]
        if layer.kind == "linear":
            kept += in_numel + n_out * out_numel
        elif layer.kind == "conv":
            kept += n_out * layer.n_params
            m = layer.module
            c_in_k2 = layer.n_params // m.out_channels - (1 if m.bias is not None else 0)
            positions = out_numel // m.out_channels
            transient = max(transient, c_in_k2 * positions + 2 * n_out * out_numel)
        else:
            kept += n_out * layer.n_params
            transient = max(transient, 2 * n_out * layer.n_params)  # jacrev's per-tensor pieces + cat
    # The forward graph (activations, twice for the backward's temporaries) and the L gradients of
    # every structured layer's output, gathered then stacked.
    transient += 2 * probe["__activations__"] + 2 * n_out * sum(
        probe[layer.name][1] for layer in plan if layer.kind != "generic")
    return itemsize * (kept + transient), itemsize * kept


def _probe_shapes(model: nn.Module, plan: list[_Layer], x_probe: torch.Tensor) -> dict:
    sizes: dict = {}
    total = [0]
    hooks = [(layer.module, lambda m, i, o, _n=layer.name: sizes.__setitem__(_n, (i[0][0].numel(), o[0].numel())))
             for layer in plan]
    hooks += [(m, lambda m, i, o: total.__setitem__(0, total[0] + (o[0].numel() if torch.is_tensor(o) else 0)))
              for m in model.modules() if not list(m.children())]
    _probe_forward(model, x_probe, hooks)
    sizes["__activations__"] = total[0]
    return sizes


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
    from tqdm.auto import tqdm

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
            # A diagonal block is one float32 product, symmetric up to rounding only: symmetrize it
            # (the off-diagonal blocks are mirrored exactly), with no temporary of K's size.
            blk = 0.5 * (blk + blk.T)
        r, c = starts1[i] * n_out, starts2[j] * n_out
        K[r:r + blk.shape[0], c:c + blk.shape[1]] = blk
        if symmetric and i != j:
            K[c:c + blk.shape[1], r:r + blk.shape[0]] = blk.T
        bar.update()

    n_pairs = len(starts1) * (len(starts1) + 1) // 2 if symmetric else len(starts1) * len(starts2)
    bar = tqdm(total=n_pairs, desc=desc, disable=not progress, unit="block")
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
        work, kept = _structured_bytes_per_sample(plan, _probe_shapes(model, plan, probe), n_out, itemsize)
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
    """Outer-product structure for linear layers, unfold Jacobians for convolutions (module docstring)."""
    with torch.no_grad():
        return _accumulate(_structured_features, model, plan, params, x1, x2, n_out, block, panel, device,
                           progress, "gram (structured)")


def _gram_jacobian(model, plan, params, x1, x2, n_out, block, panel, device, progress):
    """J materialized in row blocks by jacobian_rows; K_IJ = J_I J_Jᵀ. The oracle."""
    return _accumulate(_jacobian_features, model, plan, params, x1, x2, n_out, block, panel, device,
                       progress, "gram (jacobian)")


_implementation_to_fn = {
    GramImplementation.STRUCTURED: _gram_structured,
    GramImplementation.JACOBIAN: _gram_jacobian,
}
