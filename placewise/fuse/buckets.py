"""Buckets: the parameters updated together by one optimizer call (one layer, or a few adjacent ones)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

# A bucket size floor that merges every run of adjacent layers of one group into one bucket.
WHOLE_GROUP = 1 << 62


class Bucket:
    """Parameters of one param group held by one layer (or a few adjacent small ones), updated by one kernel call."""

    __slots__ = ("index", "group", "params", "holders", "hooked", "fired", "done", "view")

    def __init__(self, index: int, group: int, params: list[Tensor], holders: list[nn.Module]) -> None:
        self.index = index
        self.group = group
        self.params = params
        self.holders = holders
        # Parameters whose gradient hook must fire before the bucket counts as complete.
        self.hooked = sum(1 for p in params if p.requires_grad)
        self.fired = 0  # how many of them did fire this step
        self.done = False
        # The one-group list swapped into the inner optimizer to update only this bucket.
        self.view: list[dict[str, Any]] = [{"params": params}]


@dataclass
class Layout:
    """The buckets of all groups, and how to find them from a parameter or a module."""

    buckets: list[Bucket] = field(default_factory=list)
    bucket_of: dict[int, Bucket] = field(default_factory=dict)  # parameter id -> its bucket
    parent: dict[int, nn.Module] = field(default_factory=dict)  # module id -> its parent module
    held_by: dict[int, list[Bucket]] = field(default_factory=dict)  # module id -> buckets it holds


def build_layout(groups: list[dict[str, Any]], module: nn.Module | None, min_bucket_numel: int) -> Layout:
    """Split the groups into buckets: one per module and group, adjacent ones merged up to `min_bucket_numel`."""
    group_of = {id(p): gi for gi, group in enumerate(groups) for p in group["params"]}
    holders: dict[int, list[nn.Module]] = defaultdict(list)
    owner: dict[int, int] = {}  # parameter id -> id of the first module holding it
    layout = Layout()
    if module is not None:
        for mod in module.modules():
            for child in mod.children():
                layout.parent.setdefault(id(child), mod)
            for p in mod.parameters(recurse=False):
                if id(p) in group_of:
                    holders[id(p)].append(mod)
                    owner.setdefault(id(p), id(mod))
    # Key: (holding module or the parameter itself when no module is known, group, hookable).
    # Frozen parameters go to their own bucket so they never hold back a bucket's completion.
    grouped: dict[tuple[int, int, bool], list[Tensor]] = {}
    for gi, group in enumerate(groups):
        for p in group["params"]:
            grouped.setdefault((owner.get(id(p), id(p)), gi, p.requires_grad), []).append(p)
    # Adjacent small layers of one group share a bucket: each bucket update costs a Python-level
    # optimizer step (tens of microseconds), more than a tiny layer's update itself.
    merged: list[tuple[tuple[int, bool], list[Tensor]]] = []
    for (_, gi, hookable), params in grouped.items():
        if merged and merged[-1][0] == (gi, hookable) and sum(p.numel() for p in merged[-1][1]) < min_bucket_numel:
            merged[-1][1].extend(params)
        else:
            merged.append(((gi, hookable), list(params)))
    held_by: dict[int, list[Bucket]] = defaultdict(list)
    for (gi, _), params in merged:
        mods: list[nn.Module] = []
        for p in params:
            mods.extend(m for m in holders.get(id(p), []) if all(m is not n for n in mods))
        bucket = Bucket(len(layout.buckets), gi, params, mods)
        layout.buckets.append(bucket)
        for p in params:
            layout.bucket_of[id(p)] = bucket
        for mod in mods:
            held_by[id(mod)].append(bucket)
    layout.held_by = dict(held_by)
    return layout
