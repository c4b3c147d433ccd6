"""Planning: the problem, the one cost model, exact solvers and baselines. Knows graphs, never torch."""

from placewise.plan.cost import DeviceLoad, Evaluation, Violation, complete_by_colocation, evaluate
from placewise.plan.plan import Plan, Stage, load_plan, load_split, plan_from_assignment, read_split
from placewise.plan.solvers import SOLVERS, SolveOptions, get_solver, solve

__all__ = ["DeviceLoad", "Evaluation", "Plan", "SOLVERS", "SolveOptions", "Stage", "Violation", "complete_by_colocation",
           "evaluate", "get_solver", "load_plan", "load_split", "plan_from_assignment", "read_split", "solve"]
