"""The wire protocol between parameter-server workers and server shards, on torch.distributed p2p:

    worker -> server  header float64[HEADER]: kind, steps_done, fetched_version, loss_sum, correct, samples
                      then, for PUSH and PUSH_FETCH, the shard's gradient (float32, flat; over gloo only)
    server -> worker  reply  float64[REPLY]: status, version, start_step
                      then, for HELLO and a fetch that is not STOPped, the shard's parameters (over gloo only)

With shared buffers (`shared.SharedBuffers`) the bulk data skips gloo; the header and reply still go
over gloo and order every access.
"""

from __future__ import annotations

from enum import IntEnum

import torch

HEADER = 6
REPLY = 3
CONTINUE, STOP = 0.0, 1.0


class Kind(IntEnum):
    HELLO = 0
    PUSH = 1
    PUSH_FETCH = 2
    FETCH = 3
    BYE = 4



def flat_views(tensors: list[torch.Tensor],
               into: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One flat buffer (`into`, when given) holding `tensors`' values, and views of it shaped like them
    (for one-message I/O)."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors]) if tensors else torch.empty(0)
    if into is not None:
        flat = into.copy_(flat)
    return flat, views_like(flat, tensors)


def views_like(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    views, offset = [], 0
    for t in like:
        views.append(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return views
