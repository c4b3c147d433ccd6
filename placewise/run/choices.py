"""The names `run/` accepts, defined once and torch-free: the CLI derives its `choices` from them
before anything imports torch. (Schedules live in `placewise.plan.schedule`: the planner needs them too.)
"""

from __future__ import annotations

# Optimizers every trainer builds the same way (`placewise.run.optim`).
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw", "adagrad")
# The trainers' default SGD momentum (`--momentum`).
DEFAULT_MOMENTUM = 0.9
# The optimizers a profile may assume (`placewise profile --optimizer`), each with the state tensors it
# keeps per parameter (momentum; Adam's two moments; Adagrad's sum). Each is the trainers' optimizer of
# that name, "sgd" without momentum, but for MOMENTUM: the trainers' "sgd" with DEFAULT_MOMENTUM.
MOMENTUM = "momentum"
OPTIMIZER_STATES: dict[str, int] = {"sgd": 0, MOMENTUM: 1, "adagrad": 1, "adam": 2, "adamw": 2}
# Optimizer fusion (`placewise.fuse`): each update inside backward (backward-overlap: on a worker
# thread) or just before the next forward.
FUSE_MODES: tuple[str, ...] = ("none", "backward", "backward-overlap", "forward")
# Data-parallel modes: workers around a parameter server (async, sync) or DDP.
ASYNC, SYNC, DDP = "async", "sync", "ddp"
DATA_PARALLEL_MODES: tuple[str, ...] = (ASYNC, SYNC, DDP)
# The modes a parameter server runs in.
SERVER_MODES: tuple[str, ...] = (ASYNC, SYNC)
# `placewise train --mode`: one pipeline (from a plan), or data parallelism.
PIPELINE = "pipeline"
TRAIN_MODES: tuple[str, ...] = (PIPELINE, *DATA_PARALLEL_MODES)
# How gradients and parameters travel between workers and servers.
TRANSPORTS: tuple[str, ...] = ("auto", "shared", "gloo")
# Staleness policies of asynchronous pushes; BOUND takes its bound S as "bound:S".
# DC_ASGD and GAP_AWARE compensate each push for its staleness (`placewise.run.compensation`).
BOUND, DC_ASGD, GAP_AWARE = "bound", "dc-asgd", "gap-aware"
STALENESS_POLICIES: tuple[str, ...] = ("none", "lr", BOUND, DC_ASGD, GAP_AWARE)
STALENESS_HELP = ", ".join(f"{p}:S" if p == BOUND else p for p in STALENESS_POLICIES)
# Data sets of data-parallel training (`placewise.run.data`).
DATASETS: tuple[str, ...] = ("digits", "synthetic")
