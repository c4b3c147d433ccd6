"""`fuse_optimizer`: build a torch optimizer with its update fused into backward or the next forward."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from placewise.errors import PlacewiseError
from placewise.fuse.optimizer import MODES, FusedOptimizer, Mode
from placewise.fuse.sizing import choose_buckets, fixed

# Optimizers whose update of one parameter depends on other parameters cannot be split per bucket.
_WHOLE_MODEL_OPTIMIZERS: tuple[type, ...] = (torch.optim.LBFGS,)


def fuse_optimizer(
    model_or_params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
    optimizer_cls: type[torch.optim.Optimizer],
    mode: Mode = "backward",
    *,
    module: nn.Module | None = None,
    min_bucket_numel: int | Literal["auto"] = "auto",
    overlap: bool = False,
    release_grads: bool = False,
    **optimizer_kwargs: Any,
) -> FusedOptimizer:
    """Build `optimizer_cls(params, **optimizer_kwargs)` with its update fused into backward or forward.

    `model_or_params` is an `nn.Module` (all its parameters, one group) or what torch optimizers
    take (parameters or param-group dicts). With param groups, pass `module=` (the model) to get
    per-layer buckets; forward mode requires it. Without a module, backward mode updates each
    parameter on its own as its gradient becomes final. Adjacent layers of one group are merged
    into one bucket until it holds `min_bucket_numel` elements (0: exactly one bucket per layer;
    "auto": sized from a short measurement of the optimizer on this device, possibly falling back
    to one unfused call in ``step()``, see `placewise.fuse.sizing`). `overlap=True` (backward mode)
    runs each bucket's update on a worker thread while backward goes on with the earlier layers;
    ``close()`` (or dropping the optimizer) ends that thread. `release_grads=True` (backward mode)
    frees each bucket's gradients as soon as its update is applied, so all of them never exist at once.
    """
    if mode not in MODES:
        raise PlacewiseError(f"fuse: mode {mode!r} is not one of {', '.join(MODES)}; pick one")
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise PlacewiseError(f"fuse: optimizer_cls {optimizer_cls!r} is not a torch.optim.Optimizer subclass; pass e.g. torch.optim.AdamW")
    if issubclass(optimizer_cls, FusedOptimizer) or issubclass(optimizer_cls, _WHOLE_MODEL_OPTIMIZERS):
        raise PlacewiseError(f"fuse: {optimizer_cls.__name__} updates all parameters jointly and cannot be fused per layer; use SGD, Adam, AdamW, Adagrad or another per-parameter optimizer")
    if isinstance(model_or_params, nn.Module):
        if module is not None and module is not model_or_params:
            raise PlacewiseError("fuse: both a model and a different module= were given; pass one")
        module = model_or_params
        params: Any = list(model_or_params.parameters())
    else:
        params = list(model_or_params)
    _check_flags(mode, module, overlap, release_grads, min_bucket_numel)
    if optimizer_kwargs.get("differentiable"):
        raise PlacewiseError("fuse: differentiable=True optimizers cannot be fused (updates happen inside hooks); drop it")
    try:
        inner = optimizer_cls(params, **optimizer_kwargs)
    except (TypeError, ValueError) as exc:
        raise PlacewiseError(f"fuse: {optimizer_cls.__name__}({', '.join(optimizer_kwargs)}) rejected its arguments: {exc}") from exc
    choice = choose_buckets(inner) if min_bucket_numel == "auto" else fixed(min_bucket_numel)
    return FusedOptimizer(inner, mode, module, choice, overlap, release_grads)


def _check_flags(mode: str, module: nn.Module | None, overlap: Any, release_grads: Any, min_bucket_numel: Any) -> None:
    """One line per combination of options that cannot work."""
    for name, value in (("overlap", overlap), ("release_grads", release_grads)):
        if not isinstance(value, bool):
            raise PlacewiseError(f"fuse: {name}={value!r} must be True or False")
    if overlap and mode != "backward":
        raise PlacewiseError("fuse: overlap=True runs updates beside the rest of backward; forward mode applies each update right before its layer needs it, so use mode='backward' or drop overlap")
    if release_grads and mode != "backward":
        raise PlacewiseError("fuse: release_grads=True frees gradients during backward; forward mode needs them until the next forward (zero_grad() already frees each after its update), so use mode='backward' or drop it")
    if mode == "forward" and module is None:
        raise PlacewiseError("fuse: forward-fusion applies updates in the owning module's forward pre-hook; pass the model (or module=model with param groups)")
    if min_bucket_numel != "auto" and (isinstance(min_bucket_numel, bool) or not isinstance(min_bucket_numel, int) or min_bucket_numel < 0):
        raise PlacewiseError(f"fuse: min_bucket_numel={min_bucket_numel!r} must be an integer >= 0 or 'auto'")
