"""The replication rule: which nodes are replicable, what other nodes need of them, and how much
smaller the ideal lattice gets without them."""

from __future__ import annotations

import numpy as np
import pytest

from placewise.graph import Cluster, Edge, Node, OpGraph
from placewise.plan.ideals import enumerate_ideals
from placewise.plan.units import simplify
from placewise.plan.replicable import ReplicationRule, find_replicable, report


def _node(*args, parameters: float = 0.0, **kwargs) -> Node:
    """A node that says what it holds (replication needs to know it holds no parameters)."""
    return Node(*args, parameters=parameters, **kwargs)


def _chain_with_sizes(n_layers: int, n_sizes: int, training: bool = False) -> OpGraph:
    """A chain of heavy layers (10 ms, 1 MB outputs) and `n_sizes` cheap roots (0.001 ms, 8 bytes)
    read by layers far along: the shape of a transformer's size, mask and constant nodes."""
    nodes = [_node(i, f"layer{i}", 10.0, 20.0, 1e6, True, False, i if training else None) for i in range(n_layers)]
    edges = [Edge(i, i + 1, 1.0, 1e6) for i in range(n_layers - 1)]
    for k in range(n_sizes):
        r = n_layers + k
        nodes.append(_node(r, f"size{k}", 0.001, 0.001, 8.0, True, False, r if training else None))
        for reader in range(n_layers - 1 - k, n_layers):
            edges.append(Edge(r, reader, 1e-5, 8.0))
    if training:
        for n in list(nodes):
            nodes.append(_node(1000 + n.id, f"{n.name}.backward", 1.0 if n.id < n_layers else 0.0, 1.0, 0.0, True, True,
                              n.id))
        edges += [Edge(1000 + i + 1, 1000 + i, 1.0, 1e6) for i in range(n_layers - 1)]
    return OpGraph.build(nodes, edges, name="sizes")


def _ideals(graph: OpGraph, drop: np.ndarray | None = None) -> tuple[int, int]:
    if drop is not None:
        keep = [n for i, n in enumerate(graph.nodes) if not drop[i]]
        ids = {n.id for n in keep}
        graph = OpGraph.build(keep, [e for e in graph.edges if e.src in ids and e.dst in ids])
    units = simplify(graph, Cluster.simple(4, 0, None))
    return units.count, enumerate_ideals(units.pred_units).count


@pytest.mark.parametrize("training", [False, True])
def test_cheap_roots_read_far_along_are_replicated_and_the_lattice_shrinks(training):
    graph = _chain_with_sizes(12, 5, training)
    rep = find_replicable(graph)
    names = sorted(graph.nodes[i].name for i, m in enumerate(rep.mates) if m)
    assert names == [f"size{k}" for k in range(5)]
    if training:  # each size node's edgeless backward mate goes with it
        assert all(len(m) == 2 for m in rep.mates if m)
    units_before, ideals_before = _ideals(graph)
    units_after, ideals_after = _ideals(graph, rep.replicable)
    assert units_after == units_before - 5
    assert ideals_after == 13 < ideals_before
    rep_report = report(graph, rep, units_before, units_after, ideals_before, ideals_after, 10**6)
    notes = rep_report.to_notes()
    assert notes["replicated_nodes"] == 5 and notes["ideals_after_replication"] == 13
    assert rep_report.replicated_time == pytest.approx(5 * 0.001 + (0.0 if not training else 0.0))


def test_needs_are_the_closure_through_replicable_nodes():
    # r0 -> r1 -> heavy2; r0 -> heavy3 ; heavy0 -> heavy1 -> heavy2 -> heavy3
    nodes = [_node(i, f"h{i}", 10.0, 10.0, 100.0, True) for i in range(4)]
    nodes += [_node(10, "r0", 0.0, 0.0, 1.0, True), _node(11, "r1", 0.0, 0.0, 1.0, True)]
    edges = [Edge(i, i + 1, 1.0, 100.0) for i in range(3)]
    edges += [Edge(10, 11, 0.0, 1.0), Edge(11, 2, 0.0, 1.0), Edge(10, 3, 0.0, 1.0)]
    graph = OpGraph.build(nodes, edges)
    rep = find_replicable(graph)
    ix = graph.index
    assert rep.needs[ix[2]] == (ix[10], ix[11])
    assert rep.needs[ix[3]] == (ix[10],)
    assert rep.needs[ix[0]] == ()
    assert rep.closure([ix[2], ix[3]]) == {ix[10], ix[11]}
    assert rep.copies([ix[3]]) == [ix[10]]


def test_what_is_not_replicable():
    nodes = [_node(i, f"h{i}", 10.0, 10.0, 100.0, True) for i in range(4)]
    nodes += [
        _node(10, "reads_heavy", 0.0, 0.0, 1.0, True),  # depends on a heavy node: a stage cannot recompute it
        _node(11, "params", 0.0, 0.0, 50.0, True, parameters=50.0),  # holds parameters
        _node(12, "big", 0.0, 0.0, 100.0, True),  # output as large as an activation
        _node(13, "slow", 1.0, 1.0, 1.0, True),  # over 0.1% of the graph's time
        _node(14, "unsupported", 0.0, 0.0, 1.0, False),
        _node(15, "dead_end", 0.0, 0.0, 1.0, True),  # read by nothing
    ]
    edges = [Edge(i, i + 1, 1.0, 100.0) for i in range(3)]
    edges += [Edge(0, 10, 1.0, 100.0), Edge(10, 3, 0.0, 1.0), Edge(11, 3, 0.0, 1.0), Edge(12, 3, 1.0, 100.0),
              Edge(13, 3, 0.0, 1.0), Edge(14, 3, 0.0, 1.0)]
    graph = OpGraph.build(nodes, edges)
    rep = find_replicable(graph)
    assert not rep.any
    assert rep.count == 0
    assert set(rep.reasons) >= {"holds parameters, or the graph does not say", "reads a node that is not replicable"}


def test_switched_off_and_thresholds_are_relative():
    graph = _chain_with_sizes(6, 2)
    assert not find_replicable(graph, ReplicationRule(enabled=False)).any
    # Tightening the time share below the size nodes' share keeps them in the lattice.
    assert not find_replicable(graph, ReplicationRule(time_fraction=1e-6)).any
    # Scaling every time and cost by the same factor changes nothing: the rule is relative.
    scaled = OpGraph.build([_node(n.id, n.name, n.acc_time * 1e3, n.cpu_time * 1e3, n.memory, True) for n in graph.nodes],
                           [Edge(e.src, e.dst, e.transfer_cost * 1e3, e.bytes) for e in graph.edges])
    assert np.array_equal(find_replicable(scaled).replicable, find_replicable(graph).replicable)


def test_a_replicable_node_with_a_gradient_stays():
    graph = _chain_with_sizes(6, 1, training=True)
    nodes = list(graph.nodes)
    # Give the size node's backward mate an edge: a gradient flows through it.
    edges = list(graph.edges) + [Edge(1000 + 6, 1000 + 5, 0.0, 8.0)]
    rep = find_replicable(OpGraph.build(nodes, edges))
    assert not rep.any


def test_dead_end_checks_run_with_what_they_check():
    """Shape asserts hanging off each layer (dim -> eq -> assert, read by nothing) multiply the
    ideals; they are put with the node they read, and a check reading only replicable sizes goes
    with the first node outside R."""
    from placewise.plan.replicable import attach_dead_ends
    nodes = [_node(i, f"h{i}", 10.0, 10.0, 100.0, True) for i in range(6)]
    edges = [Edge(i, i + 1, 1.0, 100.0) for i in range(5)]
    for i in range(6):
        nodes += [_node(100 + i, f"dim{i}", 1e-3, 1e-3, 0.0, True), _node(200 + i, f"assert{i}", 1e-3, 1e-3, 0.0, True)]
        edges += [Edge(i, 100 + i, 1.0, 100.0), Edge(100 + i, 200 + i, 0.0, 0.0)]
    nodes += [_node(300, "size", 0.0, 0.0, 0.0, True), _node(301, "size_check", 0.0, 0.0, 0.0, True)]
    edges += [Edge(300, 3, 0.0, 0.0), Edge(300, 301, 0.0, 0.0)]
    graph = OpGraph.build(nodes, edges)
    rep = find_replicable(graph)
    ix = graph.index
    anchors = {graph.nodes[v].name: graph.nodes[a].name for v, a in rep.attached}
    assert anchors == {**{f"dim{i}": f"h{i}" for i in range(6)}, **{f"assert{i}": f"h{i}" for i in range(6)},
                       "size_check": "h0"}
    attached = attach_dead_ends(graph, rep)
    assert attached.node(200 + 4).colocate == attached.node(4).colocate is not None
    assert attached.node(5).colocate != attached.node(4).colocate
    assert rep.replicable[ix[300]]
    assert _ideals(graph)[1] > _ideals(attached, rep.replicable)[1] == 7


def test_a_graph_that_does_not_say_what_nodes_hold_replicates_nothing():
    graph = _chain_with_sizes(8, 3)
    silent = OpGraph.build([Node(n.id, n.name, n.acc_time, n.cpu_time, n.memory, n.on_accelerator) for n in graph.nodes],
                           graph.edges)
    assert find_replicable(graph).count == 3
    assert not find_replicable(silent).any and not find_replicable(silent).attached
