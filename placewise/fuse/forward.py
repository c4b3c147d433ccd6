"""Forward-fusion scheduling: updates recorded at ``step()`` and applied right before their layer runs next.

Each bucket is applied in the forward pre-hook of the module holding it, or, for a module whose own
forward never runs (MultiheadAttention's ``out_proj``), of its nearest ancestor seen running. A
forward with gradients disabled (evaluation, where inference fast paths read children's weights)
applies everything pending at its first module.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from placewise.fuse.buckets import Bucket, Layout

Update = Callable[[Bucket, dict[str, Any]], None]  # runs the optimizer on one bucket with these hyper-parameters


def hyper_snapshot(group: dict[str, Any]) -> dict[str, Any]:
    """A group's hyper-parameters frozen at this moment (schedulers fill_ tensor-valued lr in place)."""
    return {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in group.items() if k != "params"}


def zero_grads(params: Iterable[Tensor], set_to_none: bool) -> None:
    """Clear gradients the way `torch.optim.Optimizer.zero_grad` does."""
    for p in params:
        if p.grad is None:
            continue
        if set_to_none:
            p.grad = None
        else:
            if p.grad.grad_fn is not None:
                p.grad.detach_()
            else:
                p.grad.requires_grad_(False)
            p.grad.zero_()


class ForwardSchedule:
    """The pending bucket updates of forward mode and the module pre-hooks that apply them.

    It holds no reference to the optimizer (whose hooks must die with it): each call that may
    apply an update is given the optimizer's `update`.
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.pending: dict[int, Bucket] = {}  # bucket index -> bucket to apply
        self._snapshots: list[dict[str, Any]] = []  # hyper-parameters at step()
        self._zero_after_apply: bool | None = None  # a deferred zero_grad(set_to_none)
        self._ran: set[int] = set()  # ids of modules whose forward was seen running
        self._ran_at_last_triggers = -1
        self._applies_at: dict[int, list[Bucket]] = {}  # module id -> buckets its pre-hook applies
        self._triggered: set[int] = set()  # indices of the buckets some pre-hook applies

    def relayout(self, layout: Layout) -> None:
        """New buckets (a param group was added); nothing may be pending."""
        self.layout = layout
        self._ran_at_last_triggers = -1

    def schedule(self, groups: list[dict[str, Any]], update: Update) -> None:
        """At step(): defer each bucket with gradients to its next forward (or update it now if none is known)."""
        self._snapshots = [hyper_snapshot(g) for g in groups]
        self._refresh_triggers()
        for bucket in self.layout.buckets:
            if any(p.grad is not None for p in bucket.params):
                if bucket.index in self._triggered:
                    self.pending[bucket.index] = bucket
                else:  # no forward is known to use it: update now, like the unfused optimizer
                    update(bucket, self._snapshots[bucket.group])

    def on_forward(self, module: nn.Module, update: Update, grad_enabled: bool) -> None:
        """A module is about to run: apply the pending updates it uses (all of them in evaluation)."""
        mid = id(module)
        if mid not in self._ran:
            self._ran.add(mid)
        if not self.pending:
            return
        if not grad_enabled:  # inference fast paths may read any weight from any module
            self.flush(update)
            return
        for buckets in (self._applies_at.get(mid, ()), self.layout.held_by.get(mid, ())):
            for bucket in buckets:
                if bucket.index in self.pending:
                    self._apply(bucket, update)

    def flush(self, update: Update) -> None:
        """Apply every pending update now."""
        for bucket in list(self.pending.values()):
            self._apply(bucket, update)

    def zero_grad(self, groups: list[dict[str, Any]], set_to_none: bool) -> bool:
        """Clear the gradients of applied buckets now, of pending ones once applied; False if nothing is pending."""
        if not self.pending:
            return False
        self._zero_after_apply = set_to_none
        bucket_of = self.layout.bucket_of
        zero_grads((p for g in groups for p in g["params"] if bucket_of[id(p)].index not in self.pending), set_to_none)
        return True

    def _apply(self, bucket: Bucket, update: Update) -> None:
        del self.pending[bucket.index]
        update(bucket, self._snapshots[bucket.group])
        if self._zero_after_apply is not None:
            zero_grads(bucket.params, self._zero_after_apply)
        if not self.pending:
            self._zero_after_apply = None

    def _refresh_triggers(self) -> None:
        """Map each module seen running to the pending buckets its pre-hook applies."""
        if self._ran_at_last_triggers == len(self._ran):
            return
        applies_at: dict[int, list[Bucket]] = defaultdict(list)
        for bucket in self.layout.buckets:
            for mod in bucket.holders:
                # The holder itself if it runs, else the nearest ancestor that does: its pre-hook
                # fires before any use of the parameter inside it.
                node: nn.Module | None = mod
                while node is not None and id(node) not in self._ran:
                    node = self.layout.parent.get(id(node))
                if node is not None and all(b is not bucket for b in applies_at[id(node)]):
                    applies_at[id(node)].append(bucket)
        self._applies_at = dict(applies_at)
        self._triggered = {b.index for buckets in applies_at.values() for b in buckets}
        self._ran_at_last_triggers = len(self._ran)
