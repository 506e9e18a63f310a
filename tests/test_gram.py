"""jacobian_store.gram: K = J Jᵀ without J, against J Jᵀ from torch.func.jacrev."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from conftest import DEVICES
from jacobian_store.architectures import create_model
from jacobian_store.gram import GramImplementation, cross_gram_matrix, gram_matrix

# K from float32 products summed in float64 against the float64 product of the float32 jacrev J:
# the difference is float32 rounding of the per-layer products (inner dimensions ≤ 16,384 per
# partial sum, see _COLUMN_CHUNK), observed near 5e-8; 1e-6 leaves room without hiding a wrong term
# (a missing bias or layer share changes K by 1e-3 or more).
RTOL = 1e-6


def jacrev_oracle(model, x1, x2=None):
    """J(X1) J(X2)ᵀ in float64, J from one jacrev over all parameters (sample-major rows)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def jac(x):
        per = jacrev(lambda p: functional_call(model, p, (x,)))(params)  # name → (n, L, *shape)
        n, L = x.shape[0], next(iter(per.values())).shape[1]
        return torch.cat([j.reshape(n, L, -1) for j in per.values()], dim=2).reshape(n * L, -1).double()

    j1 = jac(x1)
    j2 = j1 if x2 is None else jac(x2)
    return (j1 @ j2.T).numpy()


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


CASES = {
    "lenet-binary": dict(arch="lenet", width=0.5, n_outputs=1, image_size=28, n=4),
    "lenet-10": dict(arch="lenet", width=0.5, n_outputs=10, image_size=28, n=4),
    "alexnet-10": dict(arch="alexnet", width=0.05, n_outputs=10, image_size=64, n=3),
}


def case(name, seed=0):
    c = CASES[name]
    model = create_model(c["arch"], width=c["width"], n_outputs=c["n_outputs"], image_size=c["image_size"], seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(c["n"], 1, c["image_size"], c["image_size"], generator=g)
    return model, x


@pytest.fixture(scope="module")
def oracles():
    out = {}
    for name in CASES:
        model, x = case(name)
        out[name] = (model, x, jacrev_oracle(model, x))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("method", ["structured", "jacobian"])
def test_gram_equals_jacrev(oracles, name, method, device):
    model, x, expected = oracles[name]
    K, info = gram_matrix(model, x, method=method, device=device, progress=False, return_info=True)
    assert K.dtype == np.float64 and K.shape == expected.shape
    assert rel(K, expected) <= RTOL
    assert info.method == method
    if method == "structured":
        # LeNet and AlexNet need no fallback: every layer is linear or conv.
        assert set(info.layers.values()) == {"linear", "conv"}


@pytest.mark.parametrize("block_samples,memory_budget", [(1, None), (2, None), (3, 1), (1, 1)])
def test_blocking_does_not_change_k(oracles, block_samples, memory_budget):
    # memory_budget=1 byte forces recomputation of the inner blocks (nothing cached).
    model, x, expected = oracles["lenet-10"]
    K, info = gram_matrix(model, x, block_samples=block_samples, memory_budget=memory_budget, progress=False,
                          return_info=True)
    assert rel(K, expected) <= RTOL
    n_blocks = -(-x.shape[0] // block_samples)
    if memory_budget == 1:
        assert info.panel_blocks == 1 and info.feature_computations == n_blocks * (n_blocks + 1) // 2
    else:
        assert info.panel_blocks == n_blocks and info.feature_computations == n_blocks


def test_panels_compute_each_block_once_per_panel(oracles, monkeypatch):
    # 6 samples in blocks of 1 with panels of 2 blocks: 6 computations for the panels themselves,
    # and the blocks before each panel streamed past it once: 0 + 2 + 4 = 6 more.
    from jacobian_store import gram as gram_module

    model, x, _ = oracles["lenet-10"]
    x6 = torch.cat([x, x[:2] * 0.5])
    monkeypatch.setattr(gram_module, "_choose_blocks", lambda *args, **kwargs: (1, 2))
    K, info = gram_matrix(model, x6, progress=False, return_info=True)
    assert info.panel_blocks == 2 and info.feature_computations == 12
    assert rel(K, jacrev_oracle(model, x6)) <= RTOL


def test_gram_is_symmetric_psd(oracles):
    model, x, _ = oracles["lenet-10"]
    K = gram_matrix(model, x, block_samples=3, progress=False)
    np.testing.assert_array_equal(K, K.T)
    lam = np.linalg.eigvalsh(K)
    assert lam.min() >= -1e-10 * lam.max()


def test_cross_gram(oracles):
    model, x, _ = oracles["lenet-10"]
    x2 = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    expected = jacrev_oracle(model, x, x2)
    for method in GramImplementation:
        K12 = cross_gram_matrix(model, x, x2, method=method, block_samples=2, progress=False)
        assert K12.shape == (40, 30)
        assert rel(K12, expected) <= RTOL
    K12_uncached, info = cross_gram_matrix(model, x, x2, block_samples=2, memory_budget=1, progress=False,
                                           return_info=True)
    assert rel(K12_uncached, expected) <= RTOL
    assert info.panel_blocks == 1 and info.feature_computations == 2 + 2 * 2
    # K(X, X) through the cross path equals the symmetric path.
    assert rel(cross_gram_matrix(model, x, x, progress=False), gram_matrix(model, x, progress=False)) <= RTOL


class Mixed(nn.Module):
    """Every fallback at once: grouped conv, string padding, a Linear on 3-D input, a LayerNorm, a
    bare parameter, a Linear called twice, a Linear without bias and a conv without bias."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(4, 4, 3, padding="same", groups=2)
        self.c3 = nn.Conv2d(4, 3, 2, stride=2, dilation=1)
        self.tok = nn.Linear(6, 5)               # on (n, 3, 6): generic
        self.norm = nn.LayerNorm(5)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 15))
        self.twice = nn.Linear(15, 15)
        self.head = nn.Linear(15, 3, bias=False)
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        h = torch.tanh(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))  # (n, 3, 3, 3)... 6×6 input → 3×3
        h = h.flatten(2)                                                    # (n, 3, 9)
        h = self.norm(self.tok(h[..., :6]))                                 # (n, 3, 5)
        h = h.flatten(1) * self.scale
        h = torch.tanh(self.twice(torch.tanh(self.twice(h))))
        return self.head(h)


def test_generic_fallback_matches_jacrev():
    torch.manual_seed(0)
    model = Mixed()
    x = torch.randn(5, 2, 6, 6)
    K, info = gram_matrix(model, x, block_samples=2, progress=False, return_info=True)
    assert info.layers == {"c1": "conv", "c2": "generic", "c3": "conv", "tok": "generic", "norm": "generic",
                           "<root>": "generic", "twice": "generic", "head": "linear"}
    assert rel(K, jacrev_oracle(model, x)) <= RTOL


def test_inputs_and_model_untouched(oracles):
    model, x, _ = oracles["lenet-binary"]
    x_before = x.clone()
    w_before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    gram_matrix(model, x, progress=False)
    assert torch.equal(x, x_before)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in w_before.items())
    assert flags == [p.requires_grad for p in model.parameters()]
    assert all(p.grad is None for p in model.parameters())


def test_numpy_input_and_frozen_parameters(oracles):
    model, x, expected = oracles["lenet-binary"]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        K = gram_matrix(model, x.numpy(), progress=False)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    assert rel(K, expected) <= RTOL


def test_bad_inputs_give_clear_errors():
    model = create_model("lenet", width=0.25, n_outputs=2, seed=0)
    with pytest.raises(ValueError, match="empty"):
        gram_matrix(model, torch.zeros(0, 1, 28, 28), progress=False)
    with pytest.raises(ValueError, match=r"cannot be evaluated on inputs of shape \(3, 28, 28\)"):
        gram_matrix(model, torch.zeros(2, 3, 28, 28), progress=False)
    with pytest.raises(ValueError, match="cannot be evaluated"):
        gram_matrix(model, torch.zeros(2, 28, 28), progress=False)
    with pytest.raises(ValueError, match=r"batch of inputs with shape \(n, \.\.\.\)"):
        gram_matrix(model, torch.zeros(28), progress=False)
    with pytest.raises(TypeError, match="floating-point"):
        gram_matrix(model, torch.zeros(2, 1, 28, 28, dtype=torch.int64), progress=False)
    with pytest.raises(ValueError, match="unknown Gram method 'svd'.*'structured', 'jacobian'"):
        gram_matrix(model, torch.zeros(2, 1, 28, 28), method="svd", progress=False)
    with pytest.raises(ValueError, match="block_samples must be a positive integer"):
        gram_matrix(model, torch.zeros(2, 1, 28, 28), block_samples=0, progress=False)
    with pytest.raises(ValueError, match="same shape"):
        cross_gram_matrix(model, torch.zeros(2, 1, 28, 28), torch.zeros(2, 1, 32, 32), progress=False)
    with pytest.raises(ValueError, match=r"\(batch, L\) tensor"):
        gram_matrix(nn.Sequential(nn.Flatten(0), nn.Linear(4, 1)), torch.zeros(1, 4), progress=False)


@pytest.mark.parametrize("case", ["lenet-10", "lenet-binary", "alexnet", "mixed"])
def test_structured_jacobian_rows_equal_vmap_jacrev(case):
    """The store's layer-by-layer J against vmap(jacrev) of the whole network, in float64."""
    from jacobian_store.functional import initial_parameters, jacobian_rows
    from jacobian_store.layer_jacobians import structured_jacobian_rows

    torch.manual_seed(0)
    if case == "mixed":  # every fallback, a root-level parameter and an unused layer (zero columns)
        model, x = Mixed().double(), torch.randn(4, 2, 6, 6, dtype=torch.float64)
    else:
        arch, kwargs, shape = {"lenet-10": ("lenet", {}, (1, 28, 28)),
                               "lenet-binary": ("lenet", {"n_outputs": 1}, (1, 28, 28)),
                               "alexnet": ("alexnet", {"in_channels": 3, "image_size": 64}, (3, 64, 64))}[case]
        model = create_model(arch, 0.5 if arch == "lenet" else 0.05, **kwargs).double()
        x = torch.randn(3, *shape, dtype=torch.float64)
    params = initial_parameters(model)
    expected = jacobian_rows(model, params, x)
    got = structured_jacobian_rows(model, params, x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-12 * expected.abs().max()
    if case == "mixed":  # torch.empty would leave garbage in the columns no layer writes
        from jacobian_store.functional import parameter_layout

        unused = [s for s in parameter_layout(model) if s.name.startswith("unused")]
        assert len(unused) == 2
        for slot in unused:
            assert torch.count_nonzero(got[:, slot.offset:slot.offset + slot.size]) == 0


def test_structured_jacobian_rows_of_a_network_without_linear_or_conv_layers():
    from jacobian_store.functional import initial_parameters, jacobian_rows
    from jacobian_store.layer_jacobians import structured_jacobian_rows

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.LayerNorm(8), nn.Tanh()).double()
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    params = initial_parameters(model)
    got = structured_jacobian_rows(model, params, x)
    assert torch.allclose(got, jacobian_rows(model, params, x), rtol=1e-12, atol=1e-14)
