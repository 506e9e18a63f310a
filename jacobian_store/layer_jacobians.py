"""The Jacobian of a network, layer by layer: the pieces shared by the build and the Gram matrix.

J = ∇_w f(w0, X) has one column block per parametrized layer. One forward pass and one backward pass
batched over the L outputs (``is_grads_batched``) per block of samples give, for every linear or
convolutional layer, its inputs and the gradients of each output with respect to its outputs (Δ).
From them:

- :func:`structured_jacobian_rows` writes the rows of J (``jacobian_store.build``);
- :func:`layer_factors` gives per-block factors whose pairwise products sum to a block of
  K = J Jᵀ (``jacobian_store.gram``), so the largest layers' Jacobians are never formed.

:func:`layer_plan` classifies the layers from one probe forward pass; per kind:

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

The Gram's factors win whenever the parameters sit mostly in linear layers (every width of LeNet
and AlexNet): the dense fully connected weights that dominate p never enter a product.

Assumption: samples do not interact in the forward pass (no batch statistics, e.g. BatchNorm in
training mode), so a batch's outputs are the per-sample outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

from .functional import jacobian_rows, parameter_layout

__all__ = ["Layer", "LayerFactors", "layer_plan", "probe_forward", "structured_jacobian_rows", "layer_factors",
           "jacobian_factors", "factor_bytes_per_sample"]


@dataclass
class Layer:
    """A module that directly holds parameters, and how its columns of J are computed."""
    name: str                     # module name ("" for the root)
    kind: str                     # "linear" | "conv" | "generic"
    module: nn.Module
    param_names: list[str]        # full names, as in model.named_parameters()
    n_params: int


def probe_forward(model: nn.Module, x_probe: torch.Tensor, hooks: list[tuple[nn.Module, Callable]]) -> None:
    """One no-grad forward pass of ``x_probe`` with the given (module, forward hook) pairs attached."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        with torch.no_grad():
            model(x_probe)
    finally:
        for h in handles:
            h.remove()


def layer_plan(model: nn.Module, x_probe: torch.Tensor) -> list[Layer]:
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
    probe_forward(model, x_probe, [
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
        plan.append(Layer(mname, kind, m, names, sum(p.numel() for _, p in own)))
    # Names owned by shared parameters may repeat across generic layers: keep each once.
    taken: set[str] = set()
    for layer in plan:
        layer.param_names = [n for n in layer.param_names if not (n in taken or taken.add(n))]
    return plan


@dataclass
class LayerFactors:
    """Per-block factors whose pairwise products sum to the block of K (``jacobian_store.gram``)."""
    rows: int                                   # b·L
    dense: list[torch.Tensor]                   # (b·L, p_k) Jacobian pieces: G_I G_Jᵀ
    linear: list[tuple[torch.Tensor, torch.Tensor, bool]]  # (A (b, fan_in), Δ (b·L, fan_out), has_bias)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.dense) + sum(
            a.numel() * a.element_size() + d.numel() * d.element_size() for a, d, _ in self.linear)


def _inputs_and_deltas(model: nn.Module, structured: list[Layer], params: dict[str, torch.Tensor],
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


def layer_factors(model: nn.Module, plan: list[Layer], params: dict[str, torch.Tensor],
                         xb: torch.Tensor) -> LayerFactors:
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
    return LayerFactors(batch * n_out, dense, linear)


def structured_jacobian_rows(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                             plan: list[Layer] | None = None) -> torch.Tensor:
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


def jacobian_factors(model: nn.Module, plan, params: dict[str, torch.Tensor], xb: torch.Tensor) -> LayerFactors:
    """J(xb) as one dense factor, by ``vmap(jacrev)`` of the whole network: the Gram's oracle."""
    rows = jacobian_rows(model, params, xb)
    return LayerFactors(rows.shape[0], [rows], [])


def factor_bytes_per_sample(model: nn.Module, plan: list[Layer], x_probe: torch.Tensor, n_out: int,
                            itemsize: int) -> tuple[int, int]:
    """(work, kept): bytes per sample of :func:`layer_factors` alive while a block is computed, and
    kept with the block afterwards; from one probe forward pass of ``x_probe`` (one sample)."""
    probe = _probe_shapes(model, plan, x_probe)
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


def _probe_shapes(model: nn.Module, plan: list[Layer], x_probe: torch.Tensor) -> dict:
    sizes: dict = {}
    total = [0]
    hooks = [(layer.module, lambda m, i, o, _n=layer.name: sizes.__setitem__(_n, (i[0][0].numel(), o[0].numel())))
             for layer in plan]
    hooks += [(m, lambda m, i, o: total.__setitem__(0, total[0] + (o[0].numel() if torch.is_tensor(o) else 0)))
              for m in model.modules() if not list(m.children())]
    probe_forward(model, x_probe, hooks)
    sizes["__activations__"] = total[0]
    return sizes


