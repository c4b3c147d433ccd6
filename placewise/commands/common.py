"""What the graph commands share: reading the graph and the cluster from the flags, printing or writing a plan."""

from __future__ import annotations


from placewise.console import print_plan
from placewise.errors import PlacewiseError, dump_json


def load_graph_from_args(args):
    from placewise.graph import load_graph
    opts = {}
    if getattr(args, "bandwidth", None) is not None:
        opts["bandwidth"] = args.bandwidth
    return load_graph(args.graph, **opts)


def cluster_from_args(args, graph):
    from placewise.graph import Cluster
    for flag in ("accelerators", "cpus"):
        value = getattr(args, flag, None)
        if value is not None and value < 0:
            raise PlacewiseError(f"--{flag} is {value}; use 0 or more")
    if getattr(args, "memory", None) is not None and args.memory < 0:
        raise PlacewiseError(f"--memory is {args.memory}; use a non-negative number of bytes")
    if getattr(args, "devices", None):
        from placewise.graph.devicefile import load_device_file
        cluster = load_device_file(args.devices)
    else:
        cluster = graph.cluster or Cluster.simple(4, 0, None)
    return cluster.with_overrides(args.accelerators, args.cpus, args.memory)


def check_time_limit(args) -> None:
    if args.time_limit is not None and args.time_limit <= 0:
        raise PlacewiseError(f"--time-limit is {args.time_limit}; use a positive number of seconds")


def emit_plan(plan, args, title: str) -> None:
    if getattr(args, "out", None):
        plan.save(args.out)
    if args.json:
        print(dump_json(plan.to_json()))
    else:
        print_plan(plan, title)
        if getattr(args, "out", None):
            print(f"plan written to {args.out}")
