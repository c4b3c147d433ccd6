"""Count the bytes of live tensors while code runs: a per-process peak that works on CPU too.

CUDA has allocator statistics; CPU tensors have none, and a process's resident size mixes tensors
with torch's libraries and every other stage's copy of the model. `LiveTensorBytes` is a
`TorchDispatchMode` that sees every tensor an operator creates, counts its storage once (views and
in-place results share their input's storage and are not counted again) and uncounts it when the
storage is freed. Tensors that exist before it starts (parameters, gradients kept from an earlier
step, optimizer state) are added with `hold`.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


class LiveTensorBytes(TorchDispatchMode):
    """`with LiveTensorBytes() as live: ...`; then `live.peak` is the most bytes alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.counting = True
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Tensors made meanwhile are not counted (a step's input data: the data loader's, not the stage's)."""
        self.counting = False
        try:
            yield
        finally:
            self.counting = True

    def hold(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count tensors made before the mode started (each storage once)."""
        for t in tensors:
            self._add(t)

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage in self._seen:
            return
        nbytes = storage.nbytes()
        self._seen[storage] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, nbytes)

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not self.counting:
            return out
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            # A view or an in-place result shares an input's storage: not new memory.
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self._add(t)
        return out
