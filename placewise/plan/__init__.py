"""Planning: the problem, the one cost model, exact solvers and baselines. Knows graphs, never torch."""

from placewise.plan.cost import DeviceLoad, Evaluation, Violation, complete_by_colocation, evaluate
from placewise.plan.plan import Plan, Stage, load_plan, load_split, plan_from_assignment, read_split
from placewise.plan.options import (DPOptions, ExpertOptions, IPOptions, LocalSearchOptions, PipeDreamOptions, SolveOptions,
                                    options_for)
from placewise.plan.solvers import SOLVERS, Solver, SolverEntry, get_entry, get_solver, solve

__all__ = ["DPOptions", "DeviceLoad", "Evaluation", "ExpertOptions", "IPOptions", "LocalSearchOptions", "PipeDreamOptions",
           "Plan", "SOLVERS", "SolveOptions", "Solver", "SolverEntry", "Stage", "Violation", "complete_by_colocation",
           "evaluate", "get_entry", "get_solver", "load_plan", "load_split", "options_for", "plan_from_assignment",
           "read_split", "solve"]
