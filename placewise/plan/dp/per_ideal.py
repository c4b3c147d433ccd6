"""The DP's compiled preparation: what it needs per ideal, built along one down edge per ideal
(ideal i = sub-ideal j + unit u) and reused across the bounds of a search (`run.prepare`)."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def has(bits, ideal, u):
    """Whether unit u is in the ideal (a row of membership bits)."""
    return (bits[ideal, u >> 6] >> np.uint64(u & 63)) & np.uint64(1) != 0


@njit(cache=True)
def find_split_ports(bits, down_ptr, down_ideal, down_unit, ports):
    """For every ideal, the ports it splits (some of the port's units inside, some outside). Only such
    ports can be paid by a difference of two ideals: an unsplit port is wholly in or out of the set.
    Built along one down edge per ideal (i = j + unit u): only ports that involve u can change."""
    port_owner, target_ptr, targets = ports.owner, ports.target_ptr, ports.targets
    own_ptr, own_ports, tgt_ptr, tgt_ports = ports.own_ptr, ports.own_ports, ports.tgt_ptr, ports.tgt_ports
    n = bits.shape[0]
    ptr = np.zeros(n + 1, dtype=np.int64)
    touched = np.full(port_owner.shape[0], -1, dtype=np.int64)
    cap = 16 * n + 16
    flat = np.zeros(cap, dtype=np.int64)
    m = 0
    for i in range(1, n):
        k = down_ptr[i]
        j, u = down_ideal[k], down_unit[k]
        for a in range(own_ptr[u], own_ptr[u + 1]):
            touched[own_ports[a]] = i
        for a in range(tgt_ptr[u], tgt_ptr[u + 1]):
            touched[tgt_ports[a]] = i
        # Room for the parent's list plus every port of u.
        need = m + (ptr[j + 1] - ptr[j]) + (own_ptr[u + 1] - own_ptr[u]) + (tgt_ptr[u + 1] - tgt_ptr[u])
        if need > cap:
            cap = max(2 * cap, need)
            grown = np.zeros(cap, dtype=np.int64)
            grown[:m] = flat[:m]
            flat = grown
        for a in range(ptr[j], ptr[j + 1]):
            if touched[flat[a]] != i:
                flat[m] = flat[a]
                m += 1
        for side in range(2):
            lo, hi = (own_ptr[u], own_ptr[u + 1]) if side == 0 else (tgt_ptr[u], tgt_ptr[u + 1])
            for a in range(lo, hi):
                p = own_ports[a] if side == 0 else tgt_ports[a]
                if touched[p] != i:
                    continue  # already decided for this ideal
                touched[p] = -2
                inside = has(bits, i, port_owner[p])
                for b in range(target_ptr[p], target_ptr[p + 1]):
                    if has(bits, i, targets[b]) != inside:
                        flat[m] = p
                        m += 1
                        break
        ptr[i + 1] = m
    return ptr, flat[:m]


@njit(cache=True)
def prefix_sums(down_ptr, down_ideal, down_unit, time_, memory, unsupported, least):
    """Per ideal: compute time per kind, memory, unsupported count and least work, along one down edge."""
    n = down_ptr.shape[0] - 1
    comp = np.zeros((n, time_.shape[0]))
    mem = np.zeros(n)
    unsup = np.zeros(n)
    work = np.zeros(n)
    for i in range(1, n):
        k = down_ptr[i]
        j, u = down_ideal[k], down_unit[k]
        for t in range(time_.shape[0]):
            comp[i, t] = comp[j, t] + time_[t, u]
        mem[i] = mem[j] + memory[u]
        unsup[i] = unsup[j] + unsupported[u]
        work[i] = work[j] + least[u]
    return comp, mem, unsup, work
