"""The DP over chains of a given family of ideals: an upper bound beyond the ideal limit.

Beyond the limit the lattice cannot be listed, but a contiguous split only needs its k - 1 inner
boundaries, and the good boundaries are ideals whose cut is cheap for their weight. The cut bound
(`dp.cut_bound`) finds exactly such ideals as by-products of its minimum cuts (one per weight
interval and multiplier), and the best split found so far adds its own boundaries. This DP takes
the best chain ∅ ⊆ I_1 ⊆ ... ⊆ V of those ideals: for every ideal J of the family and device-count
state s, `f[s, J] = min over I ⊊ J in the family, kind t of max(f[s - e_t, I], load_t(J \\ I))`,
with the load from the units' times and ports exactly as the main DP computes it (a port is paid
by J \\ I when J \\ I meets its units without holding all of them), memory and support checked.

On NASNet-A Mobile (919 units, 8 accelerators) the coarsened graph's DP gave 135.97; this DP over
the cut bound's 1,044 ideals gives 100.69 in about 1 s (4 accelerators: 193.67 to 169.36). With
the family all ideals of a DAG it is the exact DP, which the tests check against a brute force.
Replicated copies are left to the cost model's re-score, as everything offered beyond the limit is.
"""

from __future__ import annotations

import math
import time

import numpy as np
from numba import njit

from placewise.plan.dp.problem import INF, SLACK, Problem, least_work
from placewise.plan.units import Units

# Candidate ideals kept (the least cut ones come first from the caller); their port counts take
# candidates x ports int16.
MAX_IDEALS = 3000
# Target ideals per compiled call, so the deadline is checked between calls.
CHUNK = 128


def best_chain(units: Units, problem: Problem, ideals: np.ndarray, bound: float = INF,
               deadline: float | None = None) -> tuple[float, list[tuple[int, np.ndarray]]] | None:
    """(max-load, sets as (kind index, units) in pipeline order) of the best split whose boundaries
    are among `ideals` (bool, ideals x units; ∅ and all units are added), counting only splits
    below `bound`; None when none is, or `deadline` passes first."""
    n = units.count
    family = np.unique(np.vstack([np.zeros((1, n), bool), ideals[:MAX_IDEALS].astype(bool), np.ones((1, n), bool)]),
                       axis=0)
    least = least_work(units, problem)[0]
    weight = family.astype(float) @ least
    # Sorted by least work, then size: a strict sub-ideal comes first (equal work: fewer units).
    order = np.lexsort((family.sum(axis=1), weight))
    family, weight = family[order], weight[order]
    members = [np.concatenate([[units.port_owner[p]], units.port_targets[units.port_target_ptr[p]:units.port_target_ptr[p + 1]]])
               for p in range(len(units.port_cost))]
    size = np.array([len(np.unique(m)) for m in members], dtype=np.int64)
    counts = np.zeros((len(family), len(members)), dtype=np.int16)
    for p, m in enumerate(members):
        counts[:, p] = family[:, np.unique(m)].sum(axis=1)
    time_ = family.astype(float) @ problem.time.T  # (ideals, kinds)
    memory = family.astype(float) @ units.memory
    unsupported = family.astype(float) @ (~units.supported).astype(float)
    bits = np.packbits(family, axis=1, bitorder="little")
    n_states = problem.prev.shape[0]
    f = np.full((n_states, len(family)), INF)
    f[:, 0] = 0.0
    arg = np.full((2, n_states, len(family)), -1, dtype=np.int64)
    limit = bound * (1 + SLACK) if math.isfinite(bound) else INF
    for lo in range(1, len(family), CHUNK):
        if deadline is not None and time.perf_counter() > deadline:
            return None
        _fill(lo, min(lo + CHUNK, len(family)), bits, weight, time_, memory, unsupported, counts, size,
              units.port_cost, problem.pays_transfers, problem.accelerator, problem.memory_limit, problem.prev,
              limit, f, arg)
    last = len(family) - 1
    state = int(np.argmin(f[:, last]))
    value = float(f[state, last])
    if not math.isfinite(value):
        return None
    sets: list[tuple[int, np.ndarray]] = []
    j = last
    while j != 0:
        i, t = int(arg[0, state, j]), int(arg[1, state, j])
        sets.append((t, np.flatnonzero(family[j] & ~family[i])))
        state, j = int(problem.prev[state, t]), i
    sets.reverse()
    return value, sets


@njit(cache=True)
def _fill(lo, hi, bits, weight, time_, memory, unsupported, counts, size, cost, pays, accelerator, memory_limit,
          prev, limit, f, arg):  # pragma: no cover - compiled
    """f and its arguments for target ideals lo..hi-1, from every earlier ideal they contain."""
    n_kinds = len(pays)
    n_states = prev.shape[0]
    for j in range(lo, hi):
        for i in range(j - 1, -1, -1):
            if weight[j] - weight[i] > limit:
                break  # sorted by work: every earlier ideal leaves more
            inside = True
            for word in range(bits.shape[1]):
                if bits[i, word] & ~bits[j, word]:
                    inside = False
                    break
            if not inside:
                continue
            transfer = 0.0
            for p in range(len(cost)):
                a, b = counts[i, p], counts[j, p]
                if b > a and not (a == 0 and b == size[p]):
                    transfer += cost[p]
            for t in range(n_kinds):
                if memory[j] - memory[i] > memory_limit[t] or (accelerator[t] and unsupported[j] - unsupported[i] > 0.5):
                    continue
                load = time_[j, t] - time_[i, t] + (transfer if pays[t] else 0.0)
                if load > limit:
                    continue
                for s in range(n_states):
                    r = prev[s, t]
                    if r < 0:
                        continue
                    value = max(f[r, i], load)
                    if value < f[s, j]:
                        f[s, j] = value
                        arg[0, s, j] = i
                        arg[1, s, j] = t
