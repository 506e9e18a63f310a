"""Architectures: parameter counts against closed forms, gradients, seeding, bad input."""
import math

import pytest
import torch

from jacobian_store.architectures import available_models, create_model, n_parameters, scaled


def conv(c_in, c_out, k):
    return c_out * c_in * k * k + c_out


def linear(n_in, n_out):
    return n_out * n_in + n_out


def lenet_count(k, in_channels=1, n_outputs=10, image_size=28):
    c1, c2, h1, h2 = (scaled(c, k) for c in (6, 16, 120, 84))
    side = 5 if image_size in (28, 32) else None
    return conv(in_channels, c1, 5) + conv(c1, c2, 5) + linear(c2 * side * side, h1) + linear(h1, h2) + linear(h2, n_outputs)


def alexnet_count(k, in_channels=3, n_outputs=10):
    c = [scaled(v, k) for v in (64, 192, 384, 256, 256)]
    h1, h2 = scaled(4096, k), scaled(4096, k)
    return (conv(in_channels, c[0], 11) + conv(c[0], c[1], 5) + conv(c[1], c[2], 3) + conv(c[2], c[3], 3)
            + conv(c[3], c[4], 3) + linear(c[4] * 36, h1) + linear(h1, h2) + linear(h2, n_outputs))


def test_known_counts():
    assert n_parameters(create_model("lenet", 1)) == 61_706  # LeNet-5 on MNIST, the study's ×1
    assert alexnet_count(1) == 57_044_810  # torchvision's AlexNet with a 10-way head


@pytest.mark.parametrize("width", [0.5, 1, 2, 3.5])
@pytest.mark.parametrize("in_channels,image_size,n_outputs", [(1, 28, 10), (3, 32, 10), (1, 28, 1)])
def test_lenet_count_matches_formula(width, in_channels, image_size, n_outputs):
    model = create_model("lenet", width, in_channels=in_channels, n_outputs=n_outputs, image_size=image_size)
    assert n_parameters(model) == lenet_count(width, in_channels, n_outputs, image_size)


@pytest.mark.parametrize("width", [0.05, 0.1, 0.25])
def test_alexnet_count_matches_formula(width):
    model = create_model("alexnet", width, in_channels=3, n_outputs=10, image_size=64)
    assert n_parameters(model) == alexnet_count(width)


@pytest.mark.parametrize("name", ["lenet", "alexnet"])
def test_count_grows_quadratically(name):
    kwargs = dict(in_channels=3, image_size=64) if name == "alexnet" else {}
    small, large = (n_parameters(create_model(name, k, **kwargs)) for k in (0.25, 0.5))
    # Doubling k multiplies the k² terms by 4; the linear-in-k terms (biases, first and last
    # layers) pull the ratio slightly below 4.
    assert 3.6 < large / small < 4.0


@pytest.mark.parametrize("name,width,kwargs", [
    ("lenet", 0.5, dict()), ("lenet", 1, dict(in_channels=3, image_size=32)), ("lenet", 2, dict(n_outputs=1)),
    ("alexnet", 0.05, dict(in_channels=3, image_size=64)), ("alexnet", 0.1, dict(in_channels=1, image_size=63)),
])
def test_forward_finite_and_every_parameter_gets_a_gradient(name, width, kwargs):
    model = create_model(name, width, **kwargs)
    size = kwargs.get("image_size", 28)
    x = torch.randn(4, kwargs.get("in_channels", 1), size, size)
    out = model(x)
    assert out.shape == (4, kwargs.get("n_outputs", 10))
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    for param_name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, param_name


def test_same_seed_same_weights_and_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = create_model("lenet", 1.5, seed=7)
    after = torch.rand(1)
    b = create_model("lenet", 1.5, seed=7)
    c = create_model("lenet", 1.5, seed=8)
    assert torch.equal(before, after)  # building a model leaves the caller's RNG alone
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb)
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_bad_input():
    with pytest.raises(ValueError, match="known architectures: " + ", ".join(available_models())):
        create_model("resnet")
    for width in (0, -1, math.nan, math.inf, "2"):
        with pytest.raises(ValueError, match="width must be a positive number"):
            create_model("lenet", width)
    with pytest.raises(ValueError, match="at least 63"):
        create_model("alexnet", 1, image_size=32)
    with pytest.raises(ValueError, match="n_outputs"):
        create_model("lenet", 1, n_outputs=0)
