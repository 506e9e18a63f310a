"""Registry of the study's architectures, at any width factor.

``create_model("lenet", width=5, in_channels=1, n_outputs=10, image_size=28, seed=0)`` returns a
seeded ``nn.Module`` with PyTorch's default initialization. The width factor k multiplies every
hidden channel count and hidden unit count (rounded, at least 1); the output layer keeps
``n_outputs``. The same arguments always give bit-identical weights.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_PARAMETER_COUNTS: dict[str, Callable[..., int]] = {}


def register_model(name: str, n_parameters: Callable[..., int]):
    """Decorator adding a constructor ``fn(width, in_channels, n_outputs, image_size)`` to the registry,
    with ``n_parameters(width, in_channels, n_outputs, image_size)``: its parameter count, worked out
    from the layer sizes without building anything (so a size that cannot fit is refused first)."""

    def decorate(fn):
        _MODELS[name] = fn
        _PARAMETER_COUNTS[name] = n_parameters
        return fn

    return decorate


def available_models() -> list[str]:
    return sorted(_MODELS)


def scaled(channels: int, width: float) -> int:
    """Hidden size ``channels·k`` rounded to the nearest integer, never below 1."""
    return max(1, int(round(channels * width)))


def create_model(name: str, width: float = 1.0, in_channels: int = 1, n_outputs: int = 10,
                 image_size: int = 28, seed: int = 0) -> nn.Module:
    """Build architecture ``name`` at width factor ``width`` with weights drawn under ``seed``.

    The model is built on the CPU in float32 inside a private RNG scope, so the global torch RNG
    is untouched and the weights do not depend on the device the caller later moves it to.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown architecture {name!r}; known architectures: {', '.join(available_models())}")
    if not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
        raise ValueError(f"width must be a positive number, got {width!r}")
    for label, value in (("in_channels", in_channels), ("n_outputs", n_outputs), ("image_size", image_size)):
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _MODELS[name](width=width, in_channels=in_channels, n_outputs=n_outputs, image_size=image_size)
    return model


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def parameter_count(name: str, width: float = 1.0, in_channels: int = 1, n_outputs: int = 10,
                    image_size: int = 28) -> int:
    """p of ``create_model(name, width, ...)``, computed from the layer sizes (exact; nothing is allocated)."""
    if name not in _MODELS:
        raise ValueError(f"unknown architecture {name!r}; known architectures: {', '.join(available_models())}")
    if not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
        raise ValueError(f"width must be a positive number, got {width!r}")
    return _PARAMETER_COUNTS[name](width=width, in_channels=in_channels, n_outputs=n_outputs, image_size=image_size)


def _conv(c_in: int, c_out: int, kernel: int) -> int:
    return c_in * c_out * kernel * kernel + c_out


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


class LeNet(nn.Module):
    """LeNet-5 with ReLU and max-pooling.

    conv(6k, 5×5) → pool → conv(16k, 5×5) → pool → linear 120k → 84k → n_outputs. On 28×28 inputs the
    first convolution pads by 2 (the classic 32×32 geometry), so MNIST and CIFAR-10 both reach a
    16k × 5 × 5 feature map before the first linear layer.
    """

    def __init__(self, width: float, in_channels: int, n_outputs: int, image_size: int):
        super().__init__()
        c1, c2, h1, h2 = (scaled(c, width) for c in (6, 16, 120, 84))
        padding = 2 if image_size == 28 else 0
        side = lenet_feature_side(image_size)
        if side < 1:
            raise ValueError(f"LeNet needs images of at least 16×16 pixels, got {image_size}×{image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=padding), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(c2 * side * side, h1), nn.ReLU(),
            nn.Linear(h1, h2), nn.ReLU(),
            nn.Linear(h2, n_outputs),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def lenet_feature_side(image_size: int) -> int:
    """Side of LeNet's last feature map: conv5 (pad 2 on 28×28) → pool2 → conv5 → pool2."""
    side = image_size + (4 if image_size == 28 else 0) - 4
    side //= 2
    side -= 4
    return side // 2


class AlexNet(nn.Module):
    """torchvision's AlexNet layout without dropout; channels and hidden units times k.

    Channels 64, 192, 384, 256, 256 and hidden units 4096, 4096. The adaptive 6×6 average pool
    makes any input of at least 63×63 work; 224×224 is the standard.
    """

    def __init__(self, width: float, in_channels: int, n_outputs: int, image_size: int):
        super().__init__()
        if image_size < 63:
            raise ValueError(f"AlexNet needs images of at least 63×63 pixels (224×224 is standard), got "
                             f"{image_size}×{image_size}; resize the dataset (--image-size 224)")
        c1, c2, c3, c4, c5, h1, h2 = (scaled(c, width) for c in (64, 192, 384, 256, 256, 4096, 4096))
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c3, c4, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c4, c5, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Linear(c5 * 36, h1), nn.ReLU(),
            nn.Linear(h1, h2), nn.ReLU(),
            nn.Linear(h2, n_outputs),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _lenet_parameters(width, in_channels, n_outputs, image_size) -> int:
    c1, c2, h1, h2 = (scaled(c, width) for c in (6, 16, 120, 84))
    side = lenet_feature_side(image_size)
    return (_conv(in_channels, c1, 5) + _conv(c1, c2, 5) + _linear(c2 * side * side, h1) + _linear(h1, h2)
            + _linear(h2, n_outputs))


def _alexnet_parameters(width, in_channels, n_outputs, image_size) -> int:
    c1, c2, c3, c4, c5, h1, h2 = (scaled(c, width) for c in (64, 192, 384, 256, 256, 4096, 4096))
    return (_conv(in_channels, c1, 11) + _conv(c1, c2, 5) + _conv(c2, c3, 3) + _conv(c3, c4, 3) + _conv(c4, c5, 3)
            + _linear(c5 * 36, h1) + _linear(h1, h2) + _linear(h2, n_outputs))


@register_model("lenet", _lenet_parameters)
def _lenet(width, in_channels, n_outputs, image_size):
    return LeNet(width, in_channels, n_outputs, image_size)


@register_model("alexnet", _alexnet_parameters)
def _alexnet(width, in_channels, n_outputs, image_size):
    return AlexNet(width, in_channels, n_outputs, image_size)
