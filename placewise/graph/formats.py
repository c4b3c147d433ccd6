"""Reading and writing operator graphs: the NeurIPS 2020 paper's JSON, PipeDream's `graph.txt`,
and placewise's own JSON. `load_graph` detects the format from the content.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from placewise.errors import PlacewiseError, read_text
from placewise.graph.devices import Cluster
from placewise.graph.model import MEMORY_PARTS, Edge, Node, OpGraph

PLACEWISE_FORMAT = "placewise-graph"
# Version 2 added the node memory split (MEMORY_PARTS); version 1 files (and files without a
# version) still load, with the split unknown.
PLACEWISE_VERSION = 2
# PipeDream profiles have no CPU times; CPU cores are taken this much slower than an accelerator
# (about the ratio in the paper's own inputs).
DEFAULT_CPU_SLOWDOWN = 10.0
# Link bandwidth used to turn PipeDream's activation bytes into transfer milliseconds.
DEFAULT_BANDWIDTH = 10e9


# ---- field readers with one-line errors ----------------------------------------------------------
class _Fields:
    def __init__(self, source: str, obj: Any, path: str) -> None:
        if not isinstance(obj, dict):
            raise PlacewiseError(f"{source}: {path}: expected an object, got {type(obj).__name__}; write it as {{...}}")
        self.source, self.obj, self.path = source, obj, path

    def _fail(self, key: str, what: str, value: Any) -> PlacewiseError:
        shown = repr(value)
        if len(shown) > 40:
            shown = shown[:37] + "..."
        return PlacewiseError(f"{self.source}: {self.path}.{key}: expected {what}, got {shown}; fix the value")

    def has(self, key: str) -> bool:
        return key in self.obj

    def number(self, key: str, default: float | None = None, *, optional: bool = False) -> float | None:
        if key not in self.obj:
            if optional or default is not None:
                return default
            raise PlacewiseError(f"{self.source}: {self.path}.{key}: missing; add it (a non-negative number)")
        value = self.obj[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise self._fail(key, "a finite non-negative number", value)
        return float(value)

    def integer(self, key: str, *, optional: bool = False, minimum: int | None = None) -> int | None:
        if key not in self.obj:
            if optional:
                return None
            raise PlacewiseError(f"{self.source}: {self.path}.{key}: missing; add it (an integer)")
        value = self.obj[key]
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
            raise self._fail(key, "an integer" + (f" >= {minimum}" if minimum is not None else ""), value)
        return value

    def flag(self, key: str, default: bool | None = None) -> bool:
        if key not in self.obj:
            if default is not None:
                return default
            raise PlacewiseError(f"{self.source}: {self.path}.{key}: missing; add it (true/false or 1/0)")
        value = self.obj[key]
        if value in (0, 1) and not isinstance(value, float) or isinstance(value, bool):
            return bool(value)
        raise self._fail(key, "true/false or 1/0", value)

    def text(self, key: str, *, optional: bool = True) -> str | None:
        if key not in self.obj:
            if optional:
                return None
            raise PlacewiseError(f"{self.source}: {self.path}.{key}: missing; add it (a string)")
        value = self.obj[key]
        if not isinstance(value, str):
            raise self._fail(key, "a string", value)
        return value

    def array(self, key: str) -> list:
        if key not in self.obj:
            raise PlacewiseError(f"{self.source}: {self.path}.{key}: missing; add it (a list)")
        value = self.obj[key]
        if not isinstance(value, list):
            raise self._fail(key, "a list", value)
        return value


def _prefix(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# ---- the paper's JSON -----------------------------------------------------------------------------
def read_paper(data: Any, source: str, name: str = "") -> OpGraph:
    """The paper's `size` is a node's memory as one figure; the format has no split, so the
    memory parts stay unknown (None)."""
    top = _Fields(source, data, "graph")
    top.path = ""
    memory = top.number("maxSizePerFPGA")
    k = top.integer("maxFPGAs", minimum=0)
    l = top.integer("maxCPUs", minimum=0)
    nodes = []
    for i, raw in enumerate(top.array("nodes")):
        f = _Fields(source, raw, f"nodes[{i}]")
        nodes.append(Node(
            id=f.integer("id"), name=f.text("name"),
            acc_time=f.number("fpgaLatency"), cpu_time=f.number("cpuLatency"),
            memory=f.number("size", 0.0), on_accelerator=f.flag("supportedOnFpga"),
            backward=f.flag("isBackwardNode"), colocate=f.integer("colorClass", optional=True),
            layer=f.integer("layerId", optional=True)))
    edges = []
    for j, raw in enumerate(top.array("edges")):
        f = _Fields(source, raw, f"edges[{j}]")
        edges.append(Edge(f.integer("sourceId"), f.integer("destId"), f.number("cost"),
                          f.number("size", optional=True)))
    cluster = Cluster.simple(k, l, memory)
    # Remember which optional node fields were present, so writing gives back the same JSON.
    present = sorted({key for raw in data["nodes"] for key in raw if key in ("name", "size", "colorClass", "layerId")})
    edge_size = any("size" in raw for raw in data["edges"])
    return OpGraph.build(nodes, edges, cluster=cluster, name=name, source=source,
                         meta={"format": "paper", "node_fields": ",".join(present), "edge_size": str(edge_size)})


def write_paper(graph: OpGraph, cluster: Cluster | None = None) -> dict:
    cluster = cluster or graph.cluster or Cluster.simple(1, 0, None)
    fields = graph.meta_dict.get("node_fields", "name,size,colorClass,layerId").split(",")
    acc = [k for k in cluster.kinds if k.accelerator]
    if len(acc) > 1 or any(k.speed != 1.0 for k in cluster.kinds):
        raise PlacewiseError("the paper's JSON holds only k identical accelerators and l CPU cores; "
                             "export with a two-kind cluster (--accelerators/--cpus/--memory)")
    memory = acc[0].memory if acc else None
    out: dict[str, Any] = {
        "maxSizePerFPGA": float(memory) if memory is not None else 1e30,
        "maxFPGAs": cluster.accelerators, "maxCPUs": cluster.cpus, "nodes": [], "edges": []}
    for n in graph.nodes:
        d: dict[str, Any] = {}
        if "name" in fields and n.name is not None:
            d["name"] = n.name
        d.update(id=n.id, supportedOnFpga=int(n.on_accelerator), cpuLatency=n.cpu_time,
                 fpgaLatency=n.acc_time, isBackwardNode=int(n.backward))
        if n.colocate is not None:
            d["colorClass"] = n.colocate
        if "size" in fields or n.memory:
            d["size"] = n.memory
        if n.layer is not None:
            d["layerId"] = n.layer
        out["nodes"].append(d)
    for e in graph.edges:
        d = {"sourceId": e.src, "destId": e.dst, "cost": e.transfer_cost}
        if e.bytes is not None:
            d["size"] = e.bytes
        out["edges"].append(d)
    return out


# ---- PipeDream's graph.txt ------------------------------------------------------------------------
_PD_NODE = re.compile(
    r"^(?P<id>node\d+) -- (?P<desc>.*?) -- forward_compute_time=(?P<f>[^,]+), backward_compute_time=(?P<b>[^,]+), "
    r"activation_size=(?P<a>\[[^\]]*\]|[^,]+), parameter_size=(?P<p>[^\s,]+)(?: -- stage_id=(?P<s>\d+))?\s*$")
_PD_EDGE = re.compile(r"^\s+(?P<u>node\d+) -- (?P<v>node\d+)\s*$")


def read_pipedream(text: str, source: str, name: str = "", *, bandwidth: float = DEFAULT_BANDWIDTH,
                   cpu_slowdown: float = DEFAULT_CPU_SLOWDOWN) -> OpGraph:
    """Forward and backward times become a forward and a backward node in one colocation class;
    activation plus parameter bytes become the forward node's memory (split: `parameters` is the
    parameter bytes, `output` and `activations` the activation bytes, which PipeDream's own planner
    stashes per microbatch in flight; gradients and optimizer state are not in the file, so unknown);
    a backward node holds nothing and outputs its gradients. An edge's cost is its source's
    activation bytes over `bandwidth` (bytes/s), in milliseconds like the profile's times. As in
    PipeDream's own planner, `Input` nodes are free: they always sit in the first stage.
    """
    if not bandwidth > 0:
        raise PlacewiseError(f"{source}: --bandwidth is {bandwidth}; use a positive number of bytes per second")
    fwd: dict[int, dict] = {}
    order: list[int] = []
    raw_edges: list[tuple[int, int, int]] = []
    stages: dict[int, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _PD_NODE.match(line)
        if m:
            nid = int(m["id"][4:])
            try:
                act_text = m["a"].strip()
                act = sum(float(x) for x in act_text.strip("[]").split(";")) if act_text.startswith("[") else float(act_text)
                vals = [float(m["f"]), float(m["b"]), act, float(m["p"])]
            except ValueError:
                raise PlacewiseError(f"{source}: line {lineno}: a time or size is not a number; fix the value") from None
            if any(not math.isfinite(v) or v < 0 for v in vals):
                raise PlacewiseError(f"{source}: line {lineno}: negative or non-finite time or size; use non-negative numbers")
            if nid in fwd:
                raise PlacewiseError(f"{source}: line {lineno}: duplicate node id node{nid}; give every node its own id")
            desc = m["desc"]
            if desc.startswith("Input"):
                vals = [0.0, 0.0, 0.0, 0.0]
            fwd[nid] = dict(desc=desc, f=vals[0], b=vals[1], act=vals[2], param=vals[3])
            order.append(nid)
            if m["s"] is not None:
                stages[nid] = int(m["s"])
            continue
        m = _PD_EDGE.match(line)
        if m:
            raw_edges.append((int(m["u"][4:]), int(m["v"][4:]), lineno))
            continue
        raise PlacewiseError(f"{source}: line {lineno}: not a PipeDream node or edge line; expected "
                             "'nodeN -- Module -- forward_compute_time=..., ...' or a tab and 'nodeI -- nodeJ'")
    if not fwd:
        raise PlacewiseError(f"{source}: no nodes; a PipeDream graph.txt lists 'nodeN -- ...' lines")
    for u, v, lineno in raw_edges:
        for x in (u, v):
            if x not in fwd:
                raise PlacewiseError(f"{source}: line {lineno}: edge names unknown node node{x}; declare it first")
    offset = max(fwd)
    ms_per_byte = 1000.0 / bandwidth
    preds: dict[int, list[int]] = {nid: [] for nid in fwd}
    for u, v, _ in raw_edges:
        preds[v].append(u)
    # A backward node outputs the gradients of all of its forward node's inputs.
    grad_bytes = {nid: sum(fwd[p]["act"] for p in preds[nid]) for nid in order}
    nodes = []
    for nid in order:
        d = fwd[nid]
        nodes.append(Node(nid, f"node{nid}", d["f"], d["f"] * cpu_slowdown, d["act"] + d["param"], True,
                          False, nid, None, d["desc"], parameters=d["param"], activations=d["act"], output=d["act"]))
    for nid in order:
        d = fwd[nid]
        nodes.append(Node(nid + offset, f"node{nid}.backward", d["b"], d["b"] * cpu_slowdown, 0.0, True,
                          True, nid, None, d["desc"], parameters=0.0, activations=0.0,
                          output=grad_bytes[nid]))
    edges = [Edge(u, v, fwd[u]["act"] * ms_per_byte, fwd[u]["act"]) for u, v, _ in raw_edges]
    for u, v, _ in raw_edges:
        edges.append(Edge(v + offset, u + offset, grad_bytes[v] * ms_per_byte, grad_bytes[v]))
    split = [(nid, s) for nid, s in stages.items()] if stages else None
    if split:
        split += [(nid + offset, s) for nid, s in stages.items()]
    return OpGraph.build(nodes, edges, cluster=None, name=name, split=split, source=source,
                         meta={"format": "pipedream", "bandwidth": repr(bandwidth), "cpu_slowdown": repr(cpu_slowdown),
                               "time_unit": "ms"})


# ---- placewise's own JSON -------------------------------------------------------------------------
def write_placewise(graph: OpGraph) -> dict:
    return {
        "format": PLACEWISE_FORMAT, "version": PLACEWISE_VERSION, "name": graph.name,
        "cluster": graph.cluster.to_json() if graph.cluster else None,
        "nodes": [{"id": n.id, "name": n.name, "acc_time": n.acc_time, "cpu_time": n.cpu_time, "memory": n.memory,
                   "on_accelerator": n.on_accelerator, "backward": n.backward, "colocate": n.colocate,
                   "layer": n.layer, "module": n.module, **{part: getattr(n, part) for part in MEMORY_PARTS}}
                  for n in graph.nodes],
        "edges": [{"src": e.src, "dst": e.dst, "transfer_cost": e.transfer_cost, "bytes": e.bytes} for e in graph.edges],
        "split": [list(p) for p in graph.split] if graph.split is not None else None,
        "meta": graph.meta_dict,
    }


def read_placewise(data: Any, source: str) -> OpGraph:
    top = _Fields(source, data, "graph")
    top.path = ""
    version = data.get("version", 1)
    if version not in range(1, PLACEWISE_VERSION + 1) or isinstance(version, bool):
        raise PlacewiseError(f"{source}: version: {version!r} is not supported; this placewise reads versions 1 to "
                             f"{PLACEWISE_VERSION} (write the file again with this placewise)")
    nodes = []
    for i, raw in enumerate(top.array("nodes")):
        f = _Fields(source, raw, f"nodes[{i}]")
        # Version 1 has no memory split, so every part reads as unknown (None), as does a null one.
        parts = {part: f.number(part, optional=True) if raw.get(part) is not None else None for part in MEMORY_PARTS}
        nodes.append(Node(f.integer("id"), f.text("name") if raw.get("name") is not None else None,
                          f.number("acc_time"), f.number("cpu_time"), f.number("memory", 0.0),
                          f.flag("on_accelerator", True), f.flag("backward", False),
                          f.integer("colocate", optional=True) if raw.get("colocate") is not None else None,
                          f.integer("layer", optional=True) if raw.get("layer") is not None else None,
                          f.text("module") if raw.get("module") is not None else None,
                          **parts))
    edges = []
    for j, raw in enumerate(top.array("edges")):
        f = _Fields(source, raw, f"edges[{j}]")
        edges.append(Edge(f.integer("src"), f.integer("dst"), f.number("transfer_cost", 0.0),
                          f.number("bytes", optional=True) if raw.get("bytes") is not None else None))
    cluster = Cluster.from_json(data["cluster"], source) if data.get("cluster") else None
    split = data.get("split")
    if split is not None and not (isinstance(split, list) and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) for x in p) for p in split)):
        raise PlacewiseError(f"{source}: split: expected a list of [node id, stage] pairs; fix or remove it")
    meta = data.get("meta") or {}
    if not isinstance(meta, dict):
        raise PlacewiseError(f"{source}: meta: expected an object; fix or remove it")
    name = data.get("name") if isinstance(data.get("name"), str) else ""
    return OpGraph.build(nodes, edges, cluster=cluster, name=name, split=split, meta=meta, source=source)


# ---- entry points ---------------------------------------------------------------------------------
def parse_graph(text: str, source: str, *, bandwidth: float = DEFAULT_BANDWIDTH,
                cpu_slowdown: float = DEFAULT_CPU_SLOWDOWN) -> OpGraph:
    """Detect the format from the content and read it."""
    name = Path(source).stem if source else ""
    if name == "graph":  # PipeDream keeps one graph.txt per model folder
        name = Path(source).parent.name
    stripped = text.lstrip()
    if stripped.startswith("node") and " -- " in stripped.splitlines()[0]:
        return read_pipedream(text, source, name, bandwidth=bandwidth, cpu_slowdown=cpu_slowdown)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PlacewiseError(f"{source}: not JSON ({e.msg} at line {e.lineno} column {e.colno}) and not a PipeDream "
                             "graph.txt; give a paper JSON, a placewise JSON or a PipeDream profile") from None
    if not isinstance(data, dict):
        raise PlacewiseError(f"{source}: top level is a {type(data).__name__}; a graph file is a JSON object with nodes and edges")
    if data.get("format") == PLACEWISE_FORMAT:
        return read_placewise(data, source)
    if "maxFPGAs" in data or "maxSizePerFPGA" in data or (
            isinstance(data.get("nodes"), list) and data["nodes"] and isinstance(data["nodes"][0], dict)
            and "fpgaLatency" in data["nodes"][0]):
        return read_paper(data, source, name)
    if "fpgas" in data or "cpus" in data:
        raise PlacewiseError(f"{source}: this is a split (fpgas/cpus), not a graph; pass it as the SPLIT argument")
    raise PlacewiseError(f"{source}: unknown graph format; expected the paper's JSON (maxFPGAs, nodes, edges), "
                         f"placewise JSON (\"format\": \"{PLACEWISE_FORMAT}\") or a PipeDream graph.txt")


def load_graph(path: str | Path, **options: float) -> OpGraph:
    text = read_text(path, "graph file (JSON, or a PipeDream graph.txt)")
    return parse_graph(text, str(path), **options)


def save_graph(graph: OpGraph, path: str | Path, fmt: str = "placewise") -> None:
    data = write_placewise(graph) if fmt == "placewise" else write_paper(graph)
    Path(path).write_text(json.dumps(data, indent=1) + "\n")
