"""Optimizers, built one way for every trainer: pipeline stages, parameter servers, DDP ranks and the
references tests compare them with."""

from __future__ import annotations

import torch
import torch.nn as nn

from placewise.errors import PlacewiseError
from placewise.run.choices import FUSE_MODES, OPTIMIZERS


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    classes = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
               "adagrad": torch.optim.Adagrad}
    if name not in OPTIMIZERS:
        raise PlacewiseError(f"optimizer {name!r} is unknown; use one of {', '.join(OPTIMIZERS)}")
    return classes[name]


def optimizer_kwargs(name: str, lr: float, momentum: float) -> dict[str, float]:
    return {"lr": lr, "momentum": momentum} if name == "sgd" else {"lr": lr}


def make_optimizer(name: str, params: list[torch.Tensor], lr: float, momentum: float) -> torch.optim.Optimizer:
    """The optimizer `name` over `params`, as the server, the DDP workers and references all build it."""
    return optimizer_class(name)(params, **optimizer_kwargs(name, lr, momentum))


def module_optimizer(module: nn.Module, name: str, lr: float, momentum: float,
                     fuse: str = "none", keep_grads: bool = False) -> torch.optim.Optimizer | None:
    """The optimizer of `module`'s trainable parameters (None when it has none), fused into its passes
    by `placewise.fuse` unless `fuse` is "none". Backward fusion frees each bucket's gradients once
    its update is applied (the memory it is for), unless `keep_grads`: a caller that reads `.grad`
    after the step (tests comparing gradients) keeps them."""
    if fuse not in FUSE_MODES:
        raise PlacewiseError(f"--fuse {fuse!r}: use one of {', '.join(FUSE_MODES)}")
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return None
    if fuse == "none":
        return make_optimizer(name, params, lr, momentum)
    from placewise.fuse import fuse_optimizer
    mode, _, overlap = fuse.partition("-")  # "backward-overlap": backward mode on a worker thread
    return fuse_optimizer(module, optimizer_class(name), mode=mode, overlap=overlap == "overlap",
                          release_grads=mode == "backward" and not keep_grads, **optimizer_kwargs(name, lr, momentum))
