"""A small convolutional classifier of 8x8 images: the CNN of data-parallel training on the digits.

`cnn` or `cnn:C1xC2...`: one 3x3 convolution (padding 1) and ReLU per width C_i, a 2x2 max-pool after
the last, then a hidden layer of 128 and the classes. On scikit-learn's 8x8 digits (1 channel) it is a
real task with a known good answer (about 98% test accuracy), small enough for a 2-core machine.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from placewise.errors import PlacewiseError

CNN_CHANNELS = (32, 64)
CNN_IMAGE = (1, 8, 8)   # scikit-learn's digits
CNN_HIDDEN = 128


def cnn_widths(name: str) -> tuple[int, ...] | None:
    """Convolution widths of `cnn` or `cnn:32x64`; None when `name` is not a CNN name."""
    base, _, sizes = name.partition(":")
    if base != "cnn":
        return None
    if not sizes:
        return CNN_CHANNELS
    parts = sizes.split("x")
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise PlacewiseError(f"model {name!r}: convolution widths must be positive integers, e.g. cnn:32x64")
    return tuple(int(p) for p in parts)


def build_cnn(channels: Sequence[int], image: Sequence[int] = CNN_IMAGE, classes: int = 10) -> nn.Sequential:
    """The CNN for images of shape `image` (C, H, W), drawn from the current random state."""
    if len(image) != 3 or image[1] < 2 or image[2] < 2:
        raise PlacewiseError(f"model cnn: input shape {list(image)}; give channels, height and width, each "
                             f"side 2 or more (e.g. --input-shape 1 8 8)")
    layers: list[nn.Module] = []
    width = image[0]
    for c in channels:
        layers += [nn.Conv2d(width, c, 3, padding=1), nn.ReLU()]
        width = c
    layers += [nn.MaxPool2d(2), nn.Flatten(), nn.Linear(width * (image[1] // 2) * (image[2] // 2), CNN_HIDDEN),
               nn.ReLU(), nn.Linear(CNN_HIDDEN, classes)]
    return nn.Sequential(*layers)
