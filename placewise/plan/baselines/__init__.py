"""Baselines: the usual ways to split a model, each scored by the one cost model.

Every baseline is a solver `fn(graph, cluster, options) -> Plan`, deterministic for a given
`options.seed`, registered in `placewise.plan.solvers.SOLVERS` with a loader that imports its module (`block`, `greedy`,
`local_search`, `metis`, `pipedream`, `simple`) so that `plan --solver` and `compare` load only
the one they run.
"""

from placewise.plan.baselines.simple import expert, one_accelerator

__all__ = ["expert", "one_accelerator"]
