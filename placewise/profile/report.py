"""A profiled graph's summary: the totals, the forward-sum check, and the costliest nodes."""

from __future__ import annotations

import sys
from typing import Any

from placewise.graph import OpGraph
from placewise.plan.cost import memory_breakdown


def _float(meta: dict[str, str], key: str) -> float | None:
    try:
        return float(meta[key])
    except (KeyError, ValueError):
        return None


def summary(graph: OpGraph, top: int = 8) -> dict[str, Any]:
    meta = graph.meta_dict
    forward = [n for n in graph.nodes if not n.backward]
    out: dict[str, Any] = {key: meta.get(key) for key in ("model", "tracer", "granularity", "mode", "device", "clock",
                                                           "threads", "inputs")}
    out.update(
        forward_nodes=len(forward), backward_nodes=len(graph.nodes) - len(forward), edges=len(graph.edges),
        whole_forward_ms=_float(meta, "whole_forward_ms"), node_forward_sum_ms=_float(meta, "node_forward_sum_ms"),
        forward_ratio=_float(meta, "forward_ratio"), whole_backward_ms=_float(meta, "whole_backward_ms"),
        node_backward_sum_ms=_float(meta, "node_backward_sum_ms"), backward_ratio=_float(meta, "backward_ratio"),
        memory_bytes=float(graph.memory.sum()), memory_parts=memory_breakdown(graph, (n.id for n in graph.nodes)).to_json(),
        transfer_bytes=float(sum(e.bytes or 0 for e in graph.edges)),
        profile_seconds=_float(meta, "profile_seconds"),
        slowest=[{"module": n.module, "acc_time": n.acc_time, "cpu_time": n.cpu_time, "memory": n.memory}
                 for n in sorted(forward, key=lambda n: -n.acc_time)[:top]])
    return out


def print_summary(graph: OpGraph, written: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table
    s = summary(graph)
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(f"[bold]{s['model']}[/bold]: {s['forward_nodes']} nodes ({s['granularity']}, {s['tracer']}, {s['mode']}), "
                  f"{s['backward_nodes']} backward nodes, {s['edges']} edges; inputs {s['inputs']}; "
                  f"{s['device']} ({s['clock']} clock, {s['threads']} thread(s)); profiled in {s['profile_seconds']:.1f} s")
    console.print(f"forward: per-node sum {s['node_forward_sum_ms']:.4g} ms, whole model {s['whole_forward_ms']:.4g} ms, "
                  f"ratio [bold]{s['forward_ratio']:.3f}[/bold]")
    if s["backward_ratio"] is not None:
        console.print(f"backward: per-node sum {s['node_backward_sum_ms']:.4g} ms, whole model {s['whole_backward_ms']:.4g} ms, "
                      f"ratio [bold]{s['backward_ratio']:.3f}[/bold]")
    parts = ", ".join(f"{part} {value / 1e6:.4g}" for part, value in s["memory_parts"].items() if value is not None)
    if parts:
        console.print(f"memory (MB): {parts} (activations saved for backward, per batch)")
    table = Table(title="slowest nodes (forward)")
    for col in ("fx node", "acc ms", "cpu ms", "memory MB"):
        table.add_column(col, justify="left" if col == "fx node" else "right")
    for row in s["slowest"]:
        table.add_row(row["module"], f"{row['acc_time']:.4g}", f"{row['cpu_time']:.4g}", f"{row['memory'] / 1e6:.3g}")
    console.print(table)
    for line in written:
        console.print(line)
