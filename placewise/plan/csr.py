"""Compressed sparse rows: how lists of lists reach the numba kernels (`ptr[i]:ptr[i+1]` indexes `flat`)."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def csr(lists: Sequence[Iterable[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Row i holds `lists[i]`, in order."""
    rows = [list(row) for row in lists]
    ptr = np.zeros(len(rows) + 1, dtype=np.int64)
    ptr[1:] = np.cumsum([len(row) for row in rows])
    flat = np.array([x for row in rows for x in row], dtype=np.int64)
    return ptr, flat


def csr_by(keys: np.ndarray, values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row k of n holds the values whose key is k, in their given order."""
    order = np.argsort(keys, kind="stable")
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.add.at(ptr, keys + 1, 1)
    return np.cumsum(ptr), values[order].astype(np.int64)
