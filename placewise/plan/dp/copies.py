"""The DP's compiled core for shared copies of replicable nodes (`plan.replicable.SharedCopies`): a
copy group is paid once, in time and memory, by a set holding any unit that needs it.

Kept apart from `UnitData` on purpose, and None when there are no groups: numba passes a named
tuple to a compiled call as all of its arrays' fields, so every array added to the tuples handed to
the per-step kernels costs on every step. With the copy arrays in `UnitData`, PipeDream's
inception_v3 (no copy groups) took about 30% more CPU time. With `copies` None, numba compiles the
DP's kernels a second time with these functions empty (`copies is None` is decided while compiling).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit


class Copies(NamedTuple):
    """The copy groups, per unit and per ideal."""

    time: np.ndarray  # (kinds, groups)
    memory: np.ndarray  # (groups,)
    ptr: np.ndarray  # CSR over units: the groups each needs
    groups: np.ndarray
    count: np.ndarray  # scratch: per group, units of the walked set that need it
    in_ideal: np.ndarray  # (ideals, groups): units of each ideal that need the group


@njit(cache=True)
def toggle_copies(u, sign, comp, state, copies):
    """Add (sign=+1) or remove (sign=-1) unit u's copy groups from the walked set (state[0]: memory)."""
    if copies is None:
        return
    for k in range(copies.ptr[u], copies.ptr[u + 1]):
        g = copies.groups[k]
        before = copies.count[g]
        copies.count[g] += sign
        if (before == 0) != (copies.count[g] == 0):  # the set starts or stops needing the group
            for t in range(comp.shape[0]):
                comp[t] += sign * copies.time[t, g]
            state[0] += sign * copies.memory[g]


@njit(cache=True)
def copies_in_difference(outer, inner, copies, comp):
    """Add to comp the time of every copy group that outer \\ inner needs (inner is a sub-ideal of
    outer, so the set holds a needer exactly when outer counts more needers); return their memory."""
    if copies is None:
        return 0.0
    memory = 0.0
    for g in range(copies.memory.shape[0]):
        if copies.in_ideal[outer, g] > copies.in_ideal[inner, g]:
            for t in range(comp.shape[0]):
                comp[t] += copies.time[t, g]
            memory += copies.memory[g]
    return memory


@njit(cache=True)
def copies_per_ideal(down_ptr, down_ideal, down_unit, copy_ptr, copy_groups, n_groups):
    """Per ideal and copy group, how many of the ideal's units need the group (along one down edge)."""
    n = down_ptr.shape[0] - 1
    out = np.zeros((n, n_groups), dtype=np.int32)
    for i in range(1, n):
        k = down_ptr[i]
        j, u = down_ideal[k], down_unit[k]
        out[i] = out[j]
        for a in range(copy_ptr[u], copy_ptr[u + 1]):
            out[i, copy_groups[a]] += 1
    return out
