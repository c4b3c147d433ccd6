"""Data-parallel training from start to report: asynchronous workers around a parameter server, its
synchronous twin, and DDP.

A worker computes the gradient of one minibatch per step, pushes the mean of its accumulated
gradients every `n_push` steps and fetches fresh parameters every `n_fetch` steps. A DDP run has W
ranks, each a worker with `DistributedDataParallel` and its own optimizer (the reference synchronous
method; optimizer fusion applies there). Every process is started by `placewise.run.launcher.launch`
over 127.0.0.1 (or by torchrun through `run_rank`).

With a plan (`TrainConfig.mapping`), every worker is a whole pipeline of P stage processes (model
parallelism inside, data parallelism across: Downpour's layout). The servers are then sharded by
stage: each stage's parameters have their own shard(s), and each stage process talks only to those,
pushing its stage's gradients and fetching its stage's parameters; its pipeline step is one batch
through torch's GPipe or 1F1B schedule. The stages of a pipeline agree every step on whether to go
on (any of its stages' servers still running), so a pipeline never stops half-way; a stage whose
servers have stopped computes on without pushing until its siblings' servers stop too.

Worker `i` (0-based among workers) of every mode reads the same deterministic batch stream
(`data.BatchStream` with worker `i`), so sync and DDP compute the same mathematics and a resumed
run repeats the uninterrupted one step for step.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from placewise.errors import PlacewiseError
from placewise.run.choices import DDP, SYNC
from placewise.run.data import BatchStream, Dataset
from placewise.run.dataparallel.checkpoint import checkpoint_path, load_checkpoint
from placewise.run.dataparallel.config import TrainConfig, check_processes
from placewise.run.dataparallel.layout import Layout, parameter_layout
from placewise.run.dataparallel.ranks import rank_main
from placewise.run.dataparallel.recovery import ServerRecovery
from placewise.run.dataparallel.report import TrainReport
from placewise.run.dataparallel.shared import shared_bytes, shared_folder
from placewise.run.launcher import is_torchrun, launch, run_rank
from placewise.profile.profiler import torch_threads
from placewise.run.tasks import accuracy, libraries, make_task

# Imported once by the launcher's fork server: later runs in the same process start in well under a second.
PRELOAD = ("torch", "torch.distributed", "torch.nn.parallel", "torch.distributed.pipelining",
           "placewise.run.dataparallel.ranks")


def _run_under_torchrun(cfg: TrainConfig, data: Dataset) -> tuple[list[dict[str, Any]] | None, list]:
    """This process is one rank that torchrun started; rank 0 (server or DDP rank 0) gets the results.

    torchrun stops every rank when one fails, so surviving a dead worker needs the embedded launcher."""
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if cfg.mapping:
        raise PlacewiseError("--plan with --mode async/sync under torchrun is not supported yet (only the embedded "
                             "launcher collects every stage server's results); run it without torchrun")
    if world != cfg.world_size():
        raise PlacewiseError(f"torchrun started {world} processes; --mode {cfg.mode} with {cfg.workers} worker(s) "
                             f"needs {cfg.world_size()}: set --nproc-per-node (times --nnodes) to that")
    if cfg.server_count() > 1:
        raise PlacewiseError("--servers > 1 under torchrun is not supported yet; use --servers 1 or the embedded "
                             "launcher (run without torchrun)")
    torch.set_num_threads(cfg.threads)
    value = run_rank(rank_main, (cfg, data), timeout_s=cfg.timeout_s)
    return ([value], []) if rank == 0 else (None, [])


def train_data_parallel(cfg: TrainConfig) -> TrainReport | None:
    """Run `cfg` (async, sync or ddp; workers of one process or, with a plan, pipelines) and evaluate its
    snapshots on the test set.

    Starts every rank on this machine over 127.0.0.1, or, under torchrun, is one of the ranks
    (then only rank 0 returns the report; the others return None)."""
    cfg.validate()
    # This process computes (the task, the evaluation) with the ranks' thread count: on a busy machine more
    # threads than cores cost far more than they bring.
    with torch_threads(cfg.threads):
        task = make_task(cfg.model, cfg.dataset, cfg.seed, cfg.input_shape)
    data, model = task.data, task.model
    BatchStream(data.x_train, data.y_train, cfg.batch_size, cfg.seed, 0)  # a batch that fits, checked here once
    params = list(model.parameters())
    layout, _ = parameter_layout(cfg, model, data)
    world_size = cfg.workers * layout.stages if cfg.mode == DDP else layout.world_size
    check_processes(cfg, world_size)
    resumed_at: list[int] = []
    if cfg.resume:
        resumed_at = [load_checkpoint(checkpoint_path(cfg.resume, s, layout.servers),  # DDP's one file counts as one
                                      cfg.fingerprint(data.features, data.classes))["version"]
                      for s in range(layout.servers)]
        # A sync run stopped between two stage servers' saves of the same round; async stage servers save at their
        # own moments and are reconciled on resume (`worker.py`).
        if len(set(resumed_at)) > 1 and cfg.mode == SYNC:
            raise PlacewiseError(f"the checkpoints of {cfg.resume} are at different updates ({sorted(set(resumed_at))}); "
                                 f"resume from files written at the same update")
        if min(resumed_at) >= cfg.total_steps(data.train_size):
            raise PlacewiseError(f"--resume {cfg.resume}: the checkpoint is at update {min(resumed_at)}, where this run "
                                 f"would already end ({cfg.total_steps(data.train_size)} updates); ask for more "
                                 f"--epochs or --steps to train on")
    worker_ranks = [] if cfg.mode == DDP else [layout.worker_ranks(w) for w in range(cfg.workers)]
    recovery = None
    if is_torchrun():
        if cfg.transport == "shared":
            raise PlacewiseError("--transport shared needs every rank started by placewise on this machine; under "
                                 "torchrun use --transport gloo (or auto)")
        results, failures = _run_under_torchrun(cfg, data)
        if results is None:
            return None
    else:
        with shared_folder(cfg, shared_bytes(layout, params)) as shared_dir:
            run_cfg = replace(cfg, shared_dir=shared_dir, recover=ServerRecovery.possible(cfg))
            recovery = ServerRecovery(run_cfg, data, layout)
            results, failures = launch(rank_main, world_size, (run_cfg, data), threads=cfg.threads,
                                       timeout_s=cfg.timeout_s, tolerate=[r for ranks in worker_ranks for r in ranks],
                                       preload=PRELOAD + libraries(cfg.model), cleanup=[shared_dir] if shared_dir else [],
                                       restart=None if cfg.mode == DDP else recovery)
    server_results, history, shards = _server_view(cfg, layout, params, results)
    lost = _lost(cfg, server_results, failures, worker_ranks)
    with torch_threads(cfg.threads):
        curve = _evaluate(model, params, shards, server_results, data)
    version = server_results[0]["version"]
    restarts = recovery.restarts if recovery is not None else []
    # A restarted server resumed from its own checkpoint; the run resumed from --resume, if at all.
    resumed_from = server_results[0]["resumed_from"] if not restarts else (resumed_at or [None])[0]
    new_updates = [u for u in history if resumed_from is None or u["version"] > resumed_from]
    seconds = max(r["seconds"] for r in server_results)
    stage_staleness = _stage_staleness(cfg, layout, results)
    stale = ([v for values in stage_staleness for v in values] if cfg.mapping
             else [u["staleness"] for u in history if u["worker"] >= 0])
    return TrainReport(
        mode=cfg.mode, model=cfg.model, parameters=sum(p.numel() for p in params), workers=cfg.workers,
        servers=cfg.server_count() if not cfg.mapping else layout.servers, updates=version, seconds=seconds,
        updates_per_s=len(new_updates) / seconds if seconds > 0 else 0.0,
        final_loss=sum(u["loss"] for u in history[-20:]) / max(1, len(history[-20:])),
        test_accuracy=curve[-1][2] if curve else float("nan"),
        mean_staleness=sum(stale) / len(stale) if stale else 0.0, max_staleness=max(stale, default=0),
        lost_workers={int(k): v for k, v in sorted(lost.items())}, resumed_from=resumed_from,
        curve=curve, history=history, stages=cfg.stages, worker_ranks=worker_ranks,
        stage_staleness=stage_staleness, dropped=sum(r.get("dropped", 0) for r in server_results),
        final_state={k: v.detach().clone() for k, v in model.state_dict().items()}, server_restarts=restarts)


def _server_view(cfg: TrainConfig, layout: Layout, params: list[nn.Parameter],
                 results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[list[int]]]:
    """The servers' results, the update history and each server's parameter indices. A DDP run's rank 0
    stands for its one "server"; each of its updates gets the loss and accuracy of all ranks' minibatches
    together, as the sync server reports them."""
    if cfg.mode != DDP:
        server_results = results[:layout.servers]
        return server_results, server_results[0]["history"], [list(shard) for shard in layout.shards]
    if cfg.mapping:  # DDP over pipelines: worker 0's stages (those with parameters) and its last stage's history
        return ([results[s] for s in layout.shard_stage], results[layout.stages - 1]["history"],
                [list(shard) for shard in layout.shards])
    lead = results[0]
    history = lead["history"]
    start = len(history) - len(lead["local"])
    for i, per_rank in enumerate(zip(*(r["local"] for r in results))):
        samples = sum(p[2] for p in per_rank)
        history[start + i]["loss"] = sum(p[0] for p in per_rank) / samples
        history[start + i]["accuracy"] = sum(p[1] for p in per_rank) / samples
    return [lead], history, [list(range(len(params)))]


def _lost(cfg: TrainConfig, server_results: list[dict[str, Any]], failures: list,
          worker_ranks: list[list[int]]) -> dict[int, str]:
    """Lost ranks and why; a PlacewiseError when no worker survived to the end."""
    # A rank's own error says why it stopped; a server only saw its connection close.
    lost = {f.rank: f.message for f in failures}
    for r in server_results:
        for rank, message in r["lost"].items():
            lost.setdefault(rank, message)
    # A pipeline is lost with any of its stages (its siblings cannot go on without it).
    lost_workers = [w for w, ranks in enumerate(worker_ranks) if any(r in lost for r in ranks)] if worker_ranks \
        else list(lost)
    if cfg.workers - len(lost_workers) < 1:
        raise PlacewiseError(f"all {cfg.workers} workers died before the run finished: "
                             f"{'; '.join(f'rank {r}: {m}' for r, m in sorted(lost.items()))}")
    return lost


def _stage_staleness(cfg: TrainConfig, layout: Layout, results: list[dict[str, Any]]) -> list[list[int]]:
    """Pipeline workers: the staleness of every push that each stage's (first) server applied."""
    if not cfg.mapping:
        return []
    stage_staleness = []
    for stage in range(layout.stages):
        first = min(layout.stage_shards(stage), default=None)  # a stage without parameters has no server
        stage_staleness.append([] if first is None else
                               [u["staleness"] for u in results[first]["history"] if u["worker"] >= 0])
    return stage_staleness


def _evaluate(model: nn.Module, params: list[nn.Parameter], shards: list[list[int]],
              server_results: list[dict[str, Any]], data: Dataset) -> list[tuple[int, float, float]]:
    """Test accuracy of every snapshot (shards joined by update number)."""
    by_version: dict[int, list[tuple[float, torch.Tensor]]] = {}
    for r in server_results:
        for version, seconds, flat in r["snapshots"]:
            by_version.setdefault(version, []).append((seconds, flat))
    curve = []
    for version in sorted(by_version):
        parts = by_version[version]
        if len(parts) != len(server_results):
            continue  # a shard that stopped earlier has no copy at this update
        with torch.no_grad():
            for shard, (_, flat) in zip(shards, parts):
                offset = 0
                for i in shard:
                    n = params[i].numel()
                    params[i].copy_(flat[offset:offset + n].view_as(params[i]))
                    offset += n
        curve.append((version, max(s for s, _ in parts), accuracy(model, data.x_test, data.y_test)))
    return curve
