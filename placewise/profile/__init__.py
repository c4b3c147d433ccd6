"""From a PyTorch model to an operator graph: build models by name, trace them, time them.

Imports torch; the planning layers (`graph/`, `plan/`) never import this package.
"""

from placewise.profile.models import build_model, model_names
from placewise.profile.profiler import OPTIMIZER_STATES, export_paper, paper_graph, profile_model
from placewise.profile.trace import GRANULARITIES, trace_model

__all__ = ["GRANULARITIES", "OPTIMIZER_STATES", "build_model", "export_paper", "model_names", "paper_graph",
           "profile_model", "trace_model"]
