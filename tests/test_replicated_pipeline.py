"""A plan with replicated nodes runs: a small Llama profiled, planned onto 3 stages with its size and
rotary and mask nodes replicated, trains like one process (losses and gradients to 1e-5)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from placewise.graph import Cluster  # noqa: E402
from placewise.plan import solve  # noqa: E402
from placewise.profile import build_model, profile_model  # noqa: E402
from placewise.run.cut import mapping_from_plan  # noqa: E402
from placewise.run.job import PipelineJob  # noqa: E402
from placewise.run.launcher import launch  # noqa: E402
from placewise.run.pipeline import pipeline_rank, run_single  # noqa: E402

pytestmark = pytest.mark.torch
# Llama has no dropout, so one process and the pipeline draw no random numbers that could differ.
MODEL, BATCH, SEQ = "llama-tiny", 8, (16,)


@pytest.fixture(scope="module")
def planned():
    model, inputs = build_model(MODEL, BATCH, SEQ)
    graph = profile_model(model, inputs, name=MODEL, training=True, repeats=1, warmup=0)
    plan = solve(graph, Cluster.simple(3, 0, None), "dp")
    return graph, plan


def test_the_plan_replicates_sizes_and_masks(planned):
    graph, plan = planned
    assert plan.notes["replicated_nodes"] > 0
    assert len(plan.stages) == 3


def test_pipelined_training_with_replicated_nodes_matches_one_process(planned):
    _, plan = planned
    job = PipelineJob(model=MODEL, batch_size=BATCH, input_shape=SEQ, mapping=mapping_from_plan(plan),
                      microbatches=4, steps=2, seed=3, collect=("grads",))
    results, failures = launch(pipeline_rank, 3, ([job],), timeout_s=280, preload=("torch",))
    assert not failures
    ranks = [r[0] for r in results]
    reference = run_single(PipelineJob(model=MODEL, batch_size=BATCH, input_shape=SEQ, steps=2, seed=3,
                                       microbatches=4, collect=("grads",)))
    assert ranks[2]["losses"] == pytest.approx(reference["losses"], abs=1e-5)
    grads = {}
    for rank in ranks:
        grads.update(rank["grads"])
    assert grads.keys() == reference["grads"].keys()
    for key, grad in reference["grads"].items():
        torch.testing.assert_close(grads[key], grad, atol=1e-5, rtol=1e-4, msg=f"gradient of {key}")


@pytest.mark.parametrize("name,shape,granularity", [("gpt2-tiny", (32,), "operator"), ("vit-tiny", (3, 32, 32), "layer"),
                                                    ("bert-tiny", (32,), "operator")])
def test_small_transformers_are_planned_exactly(name, shape, granularity):
    """Small versions of the models the issue names: profiled, then planned exactly on 4 and 8."""
    model, inputs = build_model(name, 2, shape)
    graph = profile_model(model, inputs, name=name, training=True, repeats=1, warmup=0, granularity=granularity)
    for k in (4, 8):
        plan = solve(graph, Cluster.simple(k, 0, None), "dp")
        assert plan.feasible and plan.notes["exact"] and plan.gap <= 1e-6, (k, plan.notes)
