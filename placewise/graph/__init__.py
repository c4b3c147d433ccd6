"""The operator graph: nodes with times and memory, edges with transfer costs, and its formats.

Knows nothing of solvers or PyTorch.
"""

from placewise.graph.devices import ACCELERATOR, CPU, Cluster, Device, DeviceKind
from placewise.graph.formats import load_graph, parse_graph, read_paper, read_pipedream, save_graph, write_paper, write_placewise
from placewise.graph.model import Edge, Node, OpGraph

__all__ = ["ACCELERATOR", "CPU", "Cluster", "Device", "DeviceKind", "Edge", "Node", "OpGraph", "load_graph",
           "parse_graph", "read_paper", "read_pipedream", "save_graph", "write_paper", "write_placewise"]
