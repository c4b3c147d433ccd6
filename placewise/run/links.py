"""Measure the link between two processes on this machine: latency and bandwidth of send/receive.

Two processes started by the launcher (gloo over 127.0.0.1, or NCCL between two GPUs where there
are two) play ping-pong with tensors of growing size, as a pipeline's neighbouring stages exchange
activations and gradients. A one-way time is half a round trip (median of the repeats); a straight
line fitted to one-way time against bytes gives the latency (its intercept) and the bandwidth (one
over its slope). `placewise devices --measure` writes the result into the device file so plans for
this machine pay measured transfers.

`measure_stage_overhead` times the other part of a pipeline step that is not compute: the runtime's
own work per microbatch on each stage (posting and completing sends and receives, torch's schedule
bookkeeping around each chunk, the loss), as the thread CPU time per microbatch of a two-stage
pipeline whose chunks compute next to nothing. CPU time, not wall time, so that other processes on
shared cores do not inflate it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np

from placewise.errors import PlacewiseError

# Message sizes timed (bytes): from a latency-bound 4 KB to a bandwidth-bound 16 MB.
SIZES = (4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20)
REPEATS = 15
WARMUP = 2


@dataclass(frozen=True)
class LinkMeasurement:
    backend: str  # gloo or nccl
    latency: float  # seconds, one way
    bandwidth: float  # bytes per second
    sizes: tuple[int, ...]
    one_way: tuple[float, ...]  # median seconds per size, one way

    def transfer_seconds(self, nbytes: float) -> float:
        """Predicted one-way time for a message of `nbytes`."""
        return self.latency + nbytes / self.bandwidth

    def to_json(self) -> dict:
        return {"backend": self.backend, "latency": self.latency, "bandwidth": self.bandwidth,
                "sizes": list(self.sizes), "one_way_seconds": list(self.one_way)}


def _ping_pong(rank: int, world_size: int, sizes: tuple[int, ...], repeats: int, warmup: int) -> list[float] | None:
    """Rank 0 sends and waits for the echo; rank 1 echoes. Rank 0's median round trip per size."""
    import torch
    import torch.distributed as dist
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", rank) if nccl else torch.device("cpu")
    peer = 1 - rank
    medians = []
    for size in sizes:
        buf = torch.ones(max(1, size // 4), dtype=torch.float32, device=device)
        trips = []
        for i in range(warmup + repeats):
            if nccl:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            if rank == 0:
                dist.send(buf, peer)
                dist.recv(buf, peer)
            else:
                dist.recv(buf, peer)
                dist.send(buf, peer)
            if nccl:
                torch.cuda.synchronize(device)
            if i >= warmup:
                trips.append(time.perf_counter() - start)
        medians.append(statistics.median(trips))
    return medians if rank == 0 else None


def fit(sizes: tuple[int, ...], one_way: tuple[float, ...], backend: str) -> LinkMeasurement:
    """Latency and bandwidth from one-way times: least squares t = latency + bytes / bandwidth, each
    time weighted by its inverse (relative error), so small messages set the latency and large ones
    the bandwidth instead of the largest message's noise deciding both."""
    x, y = np.asarray(sizes, float), np.asarray(one_way, float)
    slope, intercept = np.polyfit(x, y, 1, w=1.0 / y)
    if not slope > 0:
        raise PlacewiseError(f"link measurement: times do not grow with message size ({list(one_way)}); "
                             "the machine may be too loaded, measure again")
    # A negative intercept is noise on a fast link: the smallest message's time bounds the latency.
    latency = float(intercept) if intercept > 0 else float(min(one_way))
    return LinkMeasurement(backend, latency, float(1.0 / slope), tuple(sizes), tuple(one_way))


def measure_link(*, gpu: bool | None = None, sizes: tuple[int, ...] = SIZES, repeats: int = REPEATS,
                 timeout_s: float = 120.0) -> LinkMeasurement:
    """Time send/receive between two fresh processes here. `gpu`: NCCL between GPUs 0 and 1 (None:
    when this machine has two GPUs), else gloo between CPU processes over 127.0.0.1."""
    from placewise.run.launcher import launch
    if gpu is None:
        import torch
        gpu = torch.cuda.is_available() and torch.cuda.device_count() >= 2
    backend = "nccl" if gpu else "gloo"
    results, _ = launch(_ping_pong, 2, (tuple(sizes), repeats, WARMUP), backend=backend, threads=1,
                        timeout_s=timeout_s)
    return fit(tuple(sizes), tuple(t / 2 for t in results[0]), backend)


# The sender's chunk when timing late receives (seconds): long beside a link's latency and a scheduler tick.
LATE_CHUNK = 0.024

# The null pipeline: microbatches per step, timed steps and the steps run before timing.
OVERHEAD_MICROBATCHES, OVERHEAD_STEPS, OVERHEAD_WARMUP = 8, 6, 2


def null_model(batch_size: int = OVERHEAD_MICROBATCHES):
    """Two tiny linear layers (one per stage): chunks that cost next to nothing."""
    import torch
    from torch import nn
    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), (torch.randn(batch_size, 4),)


def measure_stage_overhead(*, timeout_s: float = 120.0) -> tuple[float, float]:
    """Seconds of thread CPU time per microbatch that a stage of a two-stage pipeline spends beyond
    computing and its optimizer update, for the first stage and the last (which also takes the loss):
    the median over GPipe and 1F1B of a null pipeline here (`null_model`)."""
    from placewise.plan.schedule import SCHEDULES
    from placewise.run.job import PipelineJob
    from placewise.run.launcher import launch
    from placewise.run.pipeline import pipeline_rank
    m = OVERHEAD_MICROBATCHES
    jobs = [PipelineJob(model=f"{__name__}:null_model", batch_size=m, mapping={"_0": 0, "_1": 1}, schedule=kind,
                        microbatches=m, steps=OVERHEAD_STEPS, warmup=OVERHEAD_WARMUP) for kind in SCHEDULES]
    results, _ = launch(pipeline_rank, 2, (jobs,), threads=1, timeout_s=timeout_s, preload=["torch"])
    per_stage = []
    for rank in range(2):
        per_stage.append(statistics.median(
            (r["step_cpu_seconds"] - r["outside_cpu_seconds"]["update"]) / (m * OVERHEAD_STEPS) for r in results[rank]))
    return per_stage[0], per_stage[1]


def _late_receives(rank: int, world_size: int, chunk: float, count: int) -> list[float] | None:
    """Rank 0 posts all its sends, then computes `count` chunks of `chunk` seconds (thread CPU time)
    back to back, as a stage computes its next microbatches; rank 1 computes half a chunk, then posts
    a receive and times it. Rank 1's waits."""
    import torch
    import torch.distributed as dist
    a, b = torch.randn(128, 128), torch.randn(128, 128)

    def compute(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            a @ b

    buffers = [torch.ones(4096) for _ in range(count)]
    dist.barrier()
    if rank == 0:
        sends = [dist.isend(buf, 1) for buf in buffers]
        for _ in range(count):
            compute(chunk)
        for work in sends:
            work.wait()
        return None
    waits = []
    for buf in buffers:
        compute(chunk / 2)
        start = time.perf_counter()
        dist.recv(buf, 0)
        waits.append(time.perf_counter() - start)
    return waits


def late_receive_waits(chunk: float = LATE_CHUNK, count: int = 10, *, timeout_s: float = 120.0) -> list[float]:
    """Seconds a receive waits when posted after its send, halfway through a chunk the sending process
    computes (`_late_receives`): about half a chunk when the transfer is answered only once the
    sender's chunk ends, a link's latency when it is answered at once."""
    from placewise.run.launcher import launch
    results, _ = launch(_late_receives, 2, (chunk, count), threads=1, timeout_s=timeout_s)
    return results[1][1:]  # the first receive also waits for both ranks to start computing


def measure_late_answer(chunk: float = LATE_CHUNK) -> float:
    """`Cluster.late_answer`: the median late receive's wait (`late_receive_waits`) as a share of the
    half chunk it waits at most, clipped to 0..1."""
    return min(1.0, max(0.0, statistics.median(late_receive_waits(chunk)) / (chunk / 2)))


def measure_here() -> dict:
    """What `placewise devices --measure` records of this machine (`profile.machine.machine_cluster`
    reads it): the link between two processes, the runtime's overhead per microbatch (the mean of
    a first and a last stage's) and how late a receive posted after its send is answered."""
    first, last = measure_stage_overhead()
    return {**measure_link().to_json(), "overhead": (first + last) / 2, "late_answer": measure_late_answer()}
