"""Exact global-norm clipping for backward mode: a norm-only backward pass, then the updating one.

Backward-fusion updates a bucket as soon as its gradients are final, but global-norm clipping needs
the norm of every gradient first. Keeping all gradients would give up the memory that releasing
them saves, so the norm is computed by an extra backward pass of the same graph that updates
nothing: each gradient's norm is taken as it becomes final and the gradient is freed at once. The
updating pass then scales each bucket's gradients by the clip coefficient before its update.

The numbers are those of ``torch.nn.utils.clip_grad_norm_`` on the parameters in group order:
the same per-tensor norm function (foreach or not, chosen the same way), stacked in the same
order (torch's grouping by device and dtype), the same coefficient, the same multiplication. It
holds as long as both passes compute the same gradients (the same graph; on a GPU, deterministic
kernels).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._foreach_utils import _device_has_foreach_support, _group_tensors_by_device_and_dtype, _has_foreach_support

from placewise.errors import PlacewiseError


def tensor_norm(grad: Tensor, norm_type: float, foreach: bool | None) -> Tensor:
    """One gradient's norm, by the kernel `torch.nn.utils.clip_grad_norm_` would use for it."""
    if (foreach is None and _has_foreach_support([grad], grad.device)) or (foreach and _device_has_foreach_support(grad.device)):
        return torch._foreach_norm([grad], norm_type)[0]
    if foreach:
        raise PlacewiseError(f"fuse: foreach=True clipping, but torch has no foreach kernels on {grad.device.type}; pass foreach=None")
    return torch.linalg.vector_norm(grad, norm_type)


class NormPass:
    """The per-gradient norms of one backward pass that updates nothing; each gradient is freed once measured.

    Gradients accumulated by earlier micro-steps are set aside before the pass and put back after
    it (`restore`), so the updating pass accumulates onto them exactly as it would without clipping;
    the norm taken during the pass is that of the sum the update will see.
    """

    def __init__(self, params: list[Tensor], norm_type: float, foreach: bool | None) -> None:
        self.params = params  # in group order: the order torch's clip_grad_norm_ sees them
        self.norm_type = float(norm_type)
        self.foreach = foreach
        self._stash: dict[int, tuple[Tensor, Tensor]] = {}  # parameter id -> (parameter, earlier gradient)
        self._norms: dict[int, Tensor] = {}
        for p in params:
            if p.grad is not None:
                self._stash[id(p)] = (p, p.grad)
                p.grad = None

    def on_grad(self, param: Tensor) -> None:
        """A parameter's gradient of this pass is final: keep the norm of what the step will see, free it."""
        if id(param) in self._norms:
            raise PlacewiseError(
                f"fuse: a parameter of shape {tuple(param.shape)} got a second gradient in the norm pass of "
                "clipped_backward (a reentrant backward?); clip with mode='forward' instead"
            )
        grad, param.grad = param.grad, None
        if grad is None:
            return
        earlier = self._stash.get(id(param))
        if earlier is not None:
            grad.add_(earlier[1])  # this pass's own tensor; x + y is y + x, bit for bit
        self._norms[id(param)] = tensor_norm(grad, self.norm_type, self.foreach)

    def restore(self) -> None:
        """Put the earlier micro-steps' gradients back for the updating pass."""
        for param, grad in self._stash.values():
            param.grad = grad
        self._stash.clear()

    def total(self, error_if_nonfinite: bool) -> Tensor:
        """The global norm, computed as torch's clip_grad_norm_ computes it (call before `restore`)."""
        entries: list[tuple[Tensor, Tensor]] = []  # (parameter, norm), in group order
        for p in self.params:
            if id(p) in self._norms:
                entries.append((p, self._norms[id(p)]))
            elif id(p) in self._stash:  # no gradient in this pass: the earlier micro-steps' alone
                entries.append((p, tensor_norm(self._stash[id(p)][1], self.norm_type, self.foreach)))
        if not entries:
            return torch.tensor(0.0)
        # torch stacks the norms grouped by (device, dtype), in its grouping's order.
        shapes = [torch.empty(0, device=p.device, dtype=p.dtype) for p, _ in entries]
        grouped = _group_tensors_by_device_and_dtype([shapes], with_indices=True)  # type: ignore[arg-type]
        first_device = entries[0][0].device
        norms = [entries[i][1].to(first_device) for _, (_, indices) in grouped.items() for i in indices]
        total = torch.linalg.vector_norm(torch.stack(norms), self.norm_type)
        if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
            raise RuntimeError(
                f"The total norm of order {self.norm_type} for gradients from `parameters` is non-finite, so it "
                "cannot be clipped (nothing was updated). To disable this error and scale the gradients by the "
                "non-finite norm anyway, set `error_if_nonfinite=False`"
            )
        return total


def clip_coefficient(max_norm: float, total: Tensor) -> Tensor:
    """The factor torch's clip_grad_norm_ multiplies every gradient by."""
    return torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
