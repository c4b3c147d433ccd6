"""The exact throughput planner: a DP over the ideals of the forward graph (the paper's algorithm).

Modules: `problem` (the encoding), `kernels` (the compiled fill), `per_ideal` (its compiled
preparation per ideal), `copies` (shared copies of replicable nodes), `run` (one DP run at a bound),
`bound_search`, `pendants` (the side-branch restriction), `infeasible` (what it says when no split
exists), `solve` (the entry point), and beyond the ideal limit `beyond` with its lower bounds
(`cut_bound`, tightened by `exact_cuts`) and upper bounds (`ideal_chains`).

A contiguous split is a chain of ideals ∅ = I_0 ⊆ I_1 ⊆ ... ⊆ I_d = all units; device j runs
I_j \\ I_{j-1} (with the backward operators of its units). For every ideal I and every vector s of
how many devices of each kind are still free, `dp[I, s]` is the least max-load of a split of I onto
those devices:

    dp[I, s] = min( dp[I, s - e_t],                                     (leave a device of kind t empty)
                    min over sub-ideals J ⊊ I of max(dp[J, s - e_t], load_t(I \\ J)) )

What makes it fast while staying exact:
- an upper bound U from the same DP restricted to the segments of a few topological orders (exact
  on a chain, cheap: units² pairs); no set of an optimal split has load above U;
- only states that can still finish are kept: with w the least work of a unit (its least time on
  any kind) and each device holding at most ratio_t * U of it, ideal I with s devices needs
  w(I) <= cap(s) and w(rest) <= cap(all - s); a side whose devices all pay transfers
  (`DeviceKind.pays_transfers`) also pays every port the cut splits. So each ideal has few live states, and its useful sub-ideals J lie in a band of work;
- those J are found by scanning the band (ideals sorted by work; a per-ideal bitmask of finite dp
  states rejects most at once, then a subset test), with the set's compute, memory and support from
  per-ideal prefix sums and its transfer from the ports the two ideals split (no other port can be
  paid by I \\ J); or, where shorter, by walking down from I one maximal unit at a time while the
  set could still fit a device (compute, memory and support only grow), its load kept incrementally;
- everything runs compiled (numba, cached on disk).
A time limit stops the DP and returns the chain split with its gap (marked not exact).
Every plan is re-scored by the cost model, which must agree with the DP's value.
"""

from placewise.plan.dp.problem import make_problem
from placewise.plan.dp.run import prepare, run_dp
from placewise.plan.dp.bound_search import CERTIFY_GAP, search
from placewise.plan.dp.pendants import merged_pendants
from placewise.plan.dp.solve import solve

__all__ = ["CERTIFY_GAP", "make_problem", "merged_pendants", "prepare", "run_dp", "search", "solve"]
