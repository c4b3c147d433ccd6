"""Profile a user's module (once per structure, input shapes and device) and plan it for a cluster."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, OpGraph, load_graph, save_graph
from placewise.plan import Plan, SolveOptions, get_entry, solve
from placewise.plan.allreduce import RING, AllReduce

# Profiles of this process, by `profile_key`.
_PROFILES: dict[str, OpGraph] = {}


def as_cluster(cluster: Cluster | int | str | Path) -> Cluster:
    """A Cluster, a device file's path, or n (n identical accelerators, one pipeline stage or stage replica each)."""
    if isinstance(cluster, Cluster):
        return cluster
    if isinstance(cluster, int) and not isinstance(cluster, bool):
        if cluster < 1:
            raise PlacewiseError(f"cluster={cluster}: give at least 1 device")
        return Cluster.simple(cluster)
    if isinstance(cluster, (str, Path)):
        from placewise.graph.devicefile import load_device_file
        return load_device_file(cluster)
    raise PlacewiseError(f"cluster={cluster!r}: give a Cluster, a device file's path or a number of devices")


def profile_key(module: nn.Module, example_inputs: Sequence[torch.Tensor], device: str) -> str:
    """What a profile depends on: the module's structure (its repr: classes, sizes, hyper-parameters), its
    parameters' and buffers' shapes and types, the inputs' shapes and types, and the profiling device."""
    parts: list[Any] = [type(module).__qualname__, repr(module), device]
    parts += [(k, tuple(v.shape), str(v.dtype)) for k, v in module.state_dict().items()]
    parts += [(tuple(t.shape), str(t.dtype)) for t in example_inputs]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]


def profile(module: nn.Module, example_inputs: Sequence[torch.Tensor], cluster: Cluster, *, device: str = "cpu",
            cache_dir: str | Path | None = None, repeats: int = 3) -> OpGraph:
    """The training profile of `module`, from this process's cache, then `cache_dir`, else measured."""
    key = profile_key(module, example_inputs, device)
    path = Path(cache_dir) / f"profile-{key}.json" if cache_dir else None
    if key not in _PROFILES and path is not None and path.exists():
        _PROFILES[key] = load_graph(path)
    if key not in _PROFILES:
        from placewise.profile import profile_model
        _PROFILES[key] = profile_model(module, tuple(example_inputs), name=type(module).__name__, training=True,
                                       device=device, cluster=cluster, repeats=repeats)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_graph(_PROFILES[key], path)
    return _PROFILES[key]


def replica_options(solver: str, max_replicas: int) -> SolveOptions | None:
    """The solver's options when a stage may have up to `max_replicas` replicas (None: the defaults)."""
    if isinstance(max_replicas, bool) or not isinstance(max_replicas, int) or max_replicas < 1:
        raise PlacewiseError(f"max_replicas={max_replicas!r}: use a whole number of at least 1")
    if max_replicas == 1:
        return None
    if solver != "dp":
        raise PlacewiseError(f"max_replicas={max_replicas} with solver={solver!r}: only solver='dp' chooses "
                             "replicated stages")
    # A step trains on the example batch, the batch profiled: the all-reduce is paid once per profiled batch.
    return get_entry("dp").options(max_replicas=max_replicas, allreduce=AllReduce(RING, 1.0))


def plan_module(module: nn.Module, example_inputs: Sequence[torch.Tensor], cluster: Cluster, *, solver: str = "dp",
                device: str = "cpu", cache_dir: str | Path | None = None, max_replicas: int = 1) -> Plan:
    """The solver's plan for training `module` on `cluster`, a stage on up to `max_replicas` devices
    (PlacewiseError when none fits)."""
    options = replica_options(solver, max_replicas)  # bad input fails before the profile
    plan = solve(profile(module, example_inputs, cluster, device=device, cache_dir=cache_dir), cluster, solver,
                 options)
    if not plan.feasible:
        raise PlacewiseError(f"no plan of {type(module).__name__} fits the cluster ({'; '.join(plan.violations[:2])}); "
                             "give more or larger devices")
    return plan
