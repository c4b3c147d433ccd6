"""What a node keeps for the backward pass: the bytes of the activations autograd saves.

The traced graph is run once, node by node, with grad enabled and a saved-tensor hook that
records, per node, the storages autograd keeps while that node runs. Weights (parameters, buffers,
constants) are left out: they are the node's `parameters`. A storage is charged once, to the first
node that saves it (a ReLU's output saved by the ReLU and by the convolution after it is one
tensor), so the sum over any set of nodes counts each storage once; a stage that receives a tensor
another stage also saved keeps its own copy, which this does not charge to it.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch
from torch import fx

from placewise.profile.timing import Clock, GraphRunner
from placewise.profile.trace import attribute


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def saved_activation_bytes(gm: fx.GraphModule, inputs: tuple) -> dict[str, int]:
    """Bytes of activations saved for backward, per call node name, for one forward of `inputs`
    on the graph's own device (one microbatch of that size)."""
    weights = itertools.chain(gm.parameters(), gm.buffers(),
                              (attribute(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"))
    seen = {_storage(t) for t in weights if isinstance(t, torch.Tensor)}
    saved: dict[str, int] = {}
    kept: list[torch.Tensor] = []  # held until the end, so a freed storage's address is not reused
    current: list[str] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage(t)
        if current and key not in seen:
            seen.add(key)
            kept.append(t)
            saved[current[-1]] = saved.get(current[-1], 0) + t.untyped_storage().nbytes()
        return t

    @contextlib.contextmanager
    def watching(node: fx.Node) -> Iterator[None]:
        current.append(node.name)
        try:
            yield
        finally:
            current.pop()

    runner = GraphRunner(gm, Clock(torch.device("cpu"), "wall"))
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        runner.run(inputs, around=watching)
    return saved
