"""Integer programs on HiGHS (`milp`: the model builder and one HiGHS run; `model`: rows both
objectives share; `throughput`, `latency`: the models; `search`: minimise, then certify): least max-load (contiguous or not) and least single-sample latency.

The models follow the paper (Tarnawski et al., NeurIPS 2020) and score exactly what
`plan/cost.py` scores, so a solver's objective and the cost model's value of its plan agree:

* Operators that must share a device (a colocation class) are one *unit* with one set of
  assignment variables.
* An accelerator pays, per node whose output crosses its boundary, that node's transfer cost once
  per direction (`into[s, d] >= y[v, d] - y[s, d]` and `out[s, d] >= y[s, d] - y[v, d]` over edges
  s -> v); CPUs pay none.
* Throughput, non-contiguous: units go to devices (`y[unit, device]`), the max-load is minimised.
* Throughput, contiguous: the cost model calls a split contiguous when the devices can be put in
  a pipeline order with every forward edge going forward, i.e. the prefixes of that order are
  ideals (predecessor-closed sets). The paper's IP only asks each device's set to be convex, which
  admits splits whose devices depend on each other in a cycle; so here units go to *pipeline
  positions* (`y[unit, position, kind]`), `Z[unit, t]` (is the unit in the first t+1 positions)
  must be an ideal for every t, and each used position takes one device of some kind.
* Replication (`plan.replicable`, on unless `SolveOptions.replicate` is off): the throughput
  programs place the graph less its replicable nodes; each slot pays a copy's time and memory
  when a unit needing it is there, and nothing is sent for it (`copies.py`). The latency program
  places every node once, and its plans are scored that way.
* Replicated stages (`IPOptions.max_replicas` R > 1, throughput only): a position is held by r <= R
  devices of one kind (without contiguity, positions are the stages in no particular order); the assignment columns are split per r, each carrying that r's load
  ((compute + transfer) / r plus the all-reduce share), so the load rows stay exact and linear
  (`throughput.py`). Plans are scored by `plan.replicas.evaluate_replicated`.
* Latency (the paper's model, as `cost.latency` computes it): CPU nodes run as soon as their
  inputs are done on unboundedly many cores (`maxCPUs` is ignored, as in the paper's code); each
  accelerator runs its set as one block once every input of the block has arrived, paying its
  transfers inside the block. Big-M constraints use the warm start's latency as M, which is sound
  because only splits at least as good as the warm start are searched.

Warm starts come in `IPOptions.warm_starts` (by default the exact DP's plan for throughput, or the
latency greedy's: `plan/warm_start.py`, run by the caller); HiGHS gets them through `setSolution`, so a time limit always returns a plan, and
the plan carries HiGHS's dual bound and the gap it proves.
"""

from placewise.plan.ip.search import solve

__all__ = ["solve"]
