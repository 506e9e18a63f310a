"""Functional views of a network at its initial weights w0: Jacobian rows, J u and Jᵀ v.

Conventions (DESIGN.md): rows of J are sample-major (row i·L + l is output l of sample i) and
columns follow ``model.named_parameters()`` order, each tensor flattened in C order. A flat vector
u ∈ ℝᵖ is mapped to per-tensor views by :func:`unflatten`.

- :func:`jacobian_rows` materializes J for a batch with ``vmap(jacrev)``: one vectorized reverse
  pass per sample and output, instead of the B·L separate backward passes of the obvious loop.
- :func:`linearized_outputs` evaluates f_lin(u, x) = f(w0, x) + J(x) u with one forward-mode
  product (``torch.func.jvp``), so no Jacobian is ever formed.
- :func:`vjp_flat` computes Jᵀ v with one reverse pass, the gradient of the L2 loss when v is the
  residual.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

# torch.func.jvp loads TorchScript decompositions on first use and warns that torch.jit.script is
# deprecated: torch's own business, printed once into every user's output otherwise.
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)


@dataclass(frozen=True)
class ParameterSlot:
    """Where one parameter tensor lives in the flat vector: columns [offset, offset + size)."""
    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def parameter_layout(model: nn.Module) -> list[ParameterSlot]:
    slots, offset = [], 0
    for name, p in model.named_parameters():
        slots.append(ParameterSlot(name, tuple(p.shape), offset))
        offset += p.numel()
    return slots


def initial_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """w0 as a dict of detached tensors (the point every linearization in lincnn is taken at)."""
    return {name: p.detach() for name, p in model.named_parameters()}


def flatten(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def unflatten(flat: torch.Tensor, layout: list[ParameterSlot]) -> dict[str, torch.Tensor]:
    """Per-tensor views into ``flat`` (no copy)."""
    if flat.ndim != 1 or flat.numel() != sum(s.size for s in layout):
        raise ValueError(f"expected a flat vector of {sum(s.size for s in layout)} entries, got shape {tuple(flat.shape)}")
    return {s.name: flat[s.offset:s.offset + s.size].view(s.shape) for s in layout}


def jacobian_rows(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """J(x) for a batch x of B samples: a (B·L) × p tensor, sample-major rows."""

    def single_output(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    per_tensor = vmap(jacrev(single_output), in_dims=(None, 0))(params, x)  # name → (B, L, *shape)
    batch, n_outputs = x.shape[0], next(iter(per_tensor.values())).shape[1]
    return torch.cat([j.reshape(batch, n_outputs, -1) for j in per_tensor.values()], dim=2).reshape(batch * n_outputs, -1)


def jvp_outputs(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                tangent: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(w0, x), J(x) u) for the direction u given per tensor, in one forward-mode pass."""
    return jvp(lambda p: functional_call(model, p, (x,)), (params,), (tangent,))


def vjp_flat(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
             cotangent: torch.Tensor) -> torch.Tensor:
    """Jᵀ v as a flat vector, for v given as an (B, L) tensor."""
    _, pullback = vjp(lambda p: functional_call(model, p, (x,)), params)
    return flatten(pullback(cotangent)[0])


@torch.no_grad()
def linearized_outputs(model: nn.Module, u_flat: torch.Tensor, x: torch.Tensor,
                       batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(w0, x), f_lin(u, x) = f(w0, x) + J(x) u) for all of x, in batches of ``batch_size``.

    ``model`` holds w0; x is moved batch by batch to the model's device and the results come back
    on the CPU, so a test set larger than GPU memory works.
    """
    params = initial_parameters(model)
    device = next(iter(params.values())).device
    dtype = next(iter(params.values())).dtype
    tangent = unflatten(u_flat.to(device=device, dtype=dtype), parameter_layout(model))
    f0_parts, flin_parts = [], []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device=device, dtype=dtype)
        f0, ju = jvp_outputs(model, params, xb, tangent)
        f0_parts.append(f0.cpu())
        flin_parts.append((f0 + ju).cpu())
    return torch.cat(f0_parts), torch.cat(flin_parts)
