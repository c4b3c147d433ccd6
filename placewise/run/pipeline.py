"""Run a pipelined job: one process per stage of a plan, started here or by torchrun.

The pieces, as torch's `distributed/pipelining` splits them: `workload` (the model and its synthetic
batches), `cut` (fx trace and the cut into stage submodules), `job` (what every rank needs), `stage`
(a stage at run time under torch's schedules), `launcher` (the processes). `pipeline_rank` is the
function the launcher runs on every rank; `run_single` is the same job in one process without
cutting: the reference for tests and the baseline for benchmarks.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Any, Sequence

import torch
import torch.distributed as dist

from placewise.errors import PlacewiseError
from placewise.run.cut import output_tensor
from placewise.run.job import PipelineJob, prepare
from placewise.run.launcher import is_torchrun, launch, run_rank
from placewise.run.optim import module_optimizer
from placewise.run.replicas import StageGroup, stage_groups, stage_ranks
from placewise.run.stage import run_replica, run_stage
from placewise.run.workload import loss_fn


def run_single(job: PipelineJob) -> dict[str, Any]:
    """`job` in this process on the uncut model: the same microbatches, losses averaged over them."""
    prepared = prepare(replace(job, mapping={}))
    gm, example_inputs = prepared.gm, prepared.example_inputs
    training = job.training
    output_like = output_tensor(prepared.values, gm)
    gm.train(training)
    optimizer = module_optimizer(gm, job.optimizer, job.lr, job.momentum, job.fuse,
                                 keep_grads="grads" in job.collect) if training else None
    report: dict[str, Any] = {"stage": 0, "losses": [], "step_seconds": [], "cpu_seconds": 0.0}
    for step in range(job.warmup + job.steps):
        inputs, target = job.batch(example_inputs, output_like, step)
        start, start_cpu = time.perf_counter(), time.thread_time()
        if training:
            chunks = zip(*(t.chunk(job.microbatches) for t in inputs), target.chunk(job.microbatches))
            losses = [loss_fn(gm(*c[:-1]), c[-1]) for c in chunks]
            loss = torch.stack(losses).mean()
            loss.backward()
            report["losses"].append(float(loss.detach()))
            if step == 0 and "grads" in job.collect:
                report["grads"] = {k: p.grad.detach().clone() for k, p in gm.named_parameters() if p.grad is not None}
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad()
        else:
            with torch.no_grad():
                out = torch.cat([gm(*chunk) for chunk in zip(*(t.chunk(job.microbatches) for t in inputs))])
            if step == 0 and "outputs" in job.collect:
                report["outputs"] = out
        if step >= job.warmup:
            report["step_seconds"].append(time.perf_counter() - start)
            report["cpu_seconds"] += time.thread_time() - start_cpu
    report.update(samples=job.batch_size * job.steps)
    return report


def pipeline_rank(rank: int, world_size: int, jobs: Sequence[PipelineJob]) -> list[dict[str, Any] | None]:
    """The launcher's rank function: run each job's stage on the first `n_ranks` ranks (others sit it out).

    A job's stages take consecutive ranks, a replicated stage one per replica, its first (the lead) in the
    pipeline (`placewise.run.replicas`). Several jobs share one process group (tests start processes
    once); a job with fewer ranks than processes runs on subgroups of the first ranks."""
    layouts = sorted({job.stage_replicas for job in jobs})
    for replicas in layouts:
        if sum(replicas) > world_size:
            raise PlacewiseError(f"a job needs {sum(replicas)} processes but only {world_size} were started")
    groups = {replicas: stage_groups(replicas, world_size) for replicas in layouts}
    results: list[dict[str, Any] | None] = []
    for job in jobs:
        replicas = job.stage_replicas
        ranks = stage_ranks(replicas)
        where = [(s, k) for s, members in enumerate(ranks) for k, r in enumerate(members) if r == rank]
        if not where:
            results.append(None)
        elif job.n_ranks == 1:
            results.append(run_single(job))
        else:
            pipeline, replica_groups = groups[replicas]
            s, k = where[0]
            own = StageGroup(replica_groups[s], ranks[s]) if replicas[s] > 1 else None
            results.append(run_stage(job, s, pipeline, own) if k == 0 else run_replica(job, s, own))
    return results


def _gathered_rank(rank: int, world_size: int, job: PipelineJob) -> list[dict[str, Any]]:
    """Under torchrun: run this rank's stage, then gather every stage's report (all ranks get them)."""
    reports: list[Any] = [None] * world_size
    dist.all_gather_object(reports, pipeline_rank(rank, world_size, [job])[0])
    return reports


def run_pipeline(job: PipelineJob, *, threads: int = 1, timeout_s: float = 600.0) -> list[dict[str, Any]] | None:
    """Run `job` with one process per stage replica: started here on this machine (gloo over 127.0.0.1, or
    NCCL when there is a GPU per process), or, inside `torchrun`, as this process's rank (several machines:
    `torchrun --nnodes H --nproc-per-node P --rdzv-backend c10d --rdzv-endpoint HOST:PORT
    -m placewise.cli train MODEL --plan PLAN.json`, H x P = the plan's stages' replicas, in stage order).
    Per-stage reports (each stage's lead's); under torchrun only rank 0 gets them (others None)."""
    prepare(job)  # bad input fails here, in one line, before any process starts
    n = job.n_ranks
    leads = [members[0] for members in stage_ranks(job.stage_replicas)]
    if is_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if world != n:
            what = f"{job.n_stages} stages" + (f" with {n} replicas in all" if n != job.n_stages else "")
            raise PlacewiseError(f"torchrun started {world} processes but the plan has {what}; start {n}")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        nccl = torch.cuda.is_available() and local < torch.cuda.device_count()
        if nccl:
            torch.cuda.set_device(local)
        torch.set_num_threads(threads)
        reports = run_rank(_gathered_rank, (job,), backend="nccl" if nccl else "gloo", timeout_s=timeout_s)
        return [reports[r] for r in leads] if int(os.environ["RANK"]) == 0 else None
    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= n else "gloo"
    results, _ = launch(pipeline_rank, n, ([job],), backend=backend, threads=threads, timeout_s=timeout_s)
    return [results[r][0] for r in leads]

