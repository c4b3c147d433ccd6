"""What the planner places onto: kinds of devices, how many of each, their memory and speed.

The paper's case is two kinds, `accelerator` (its "FPGAs") and `cpu` (cores sharing host memory,
so they pay no transfer cost). A device file may describe more kinds, each with its own speed.

Whether a kind pays transfers is its own flag, `shared_memory`: the paper's CPU cores run in one
process and hand values over in memory (the default for a CPU kind), but placewise's runtime runs
every stage as its own process, so CPU stages there send and receive over a link as accelerators do
(`shared_memory: false`, what `placewise devices --out` writes for this machine's cores). An
accelerator always pays its transfers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

from placewise.errors import PlacewiseError

ACCELERATOR = "accelerator"
CPU = "cpu"
# Devices in one cluster, all kinds together. Counts are checked against it before any list of
# devices is built (a count of 10**30 would otherwise fill memory); the exact planner's state
# limit is lower still, and no graph has enough nodes to keep more devices busy.
MAX_DEVICES = 4096


class Device(NamedTuple):
    """One device of a cluster: its kind's name and its index within that kind."""

    kind: str
    index: int

    def __str__(self) -> str:
        return f"{self.kind}:{self.index}"


@dataclass(frozen=True)
class DeviceKind:
    name: str
    count: int
    accelerator: bool
    # Bytes per device; None means unlimited (the paper's CPU cores).
    memory: float | None = None
    # Relative speed: a node's time on this kind is its profiled time divided by `speed`.
    speed: float = 1.0
    # Devices of the kind share host memory, so they pay no transfers (the paper's CPU cores in one
    # process). None: the default, True for a CPU kind and False for an accelerator.
    shared_memory: bool | None = None

    def __post_init__(self) -> None:
        if self.shared_memory is None:
            object.__setattr__(self, "shared_memory", not self.accelerator)
        elif self.shared_memory and self.accelerator:
            raise PlacewiseError(f"device kind {self.name!r}: an accelerator cannot share host memory; drop "
                                 "shared_memory or make the kind a CPU")
        if self.count < 0:
            raise PlacewiseError(f"device kind {self.name!r}: count is {self.count}; use 0 or more")
        if self.count > MAX_DEVICES:
            raise PlacewiseError(f"device kind {self.name!r}: count is {self.count}, more than the {MAX_DEVICES} devices "
                                 "placewise plans for; give a smaller count")
        if self.memory is not None and not (self.memory >= 0 and math.isfinite(self.memory)):
            raise PlacewiseError(f"device kind {self.name!r}: memory is {self.memory}; use a finite, non-negative "
                                 "number of bytes (or none for unlimited)")
        if not (self.speed > 0 and math.isfinite(self.speed)):
            raise PlacewiseError(f"device kind {self.name!r}: speed is {self.speed}; use a positive number")

    @property
    def pays_transfers(self) -> bool:
        """Whether a device of the kind pays for every value crossing its boundary (the cost model's
        transfer term): accelerators and CPU cores in separate processes do, shared-memory cores not."""
        return not self.shared_memory


@dataclass(frozen=True)
class Cluster:
    kinds: tuple[DeviceKind, ...]
    # Link bandwidth in bytes per second, used to turn tensor bytes into transfer time.
    bandwidth: float | None = None
    # One-way latency of a message between devices, seconds (measured by `placewise devices --measure`);
    # the pipeline simulation adds it to every transfer. None: not known (taken as 0).
    latency: float | None = None
    # Seconds per microbatch a pipeline stage's runtime spends beyond computing (posting and completing
    # transfers, schedule bookkeeping), on one core; measured by `placewise devices --measure` on a
    # null pipeline. None: not known (taken as 0).
    overhead: float | None = None
    # The share (0 to 1) of the rest of a chunk that a receive posted after its send waits while the
    # sending CPU process computes that chunk: the transfer is answered only when the process's busy
    # core frees (0.02 to 1 from run to run on the 2-core VM this project is built on, whose scheduler
    # keeps a process's threads on its busy core). Measured by `placewise devices --measure`. None: not
    # known (taken as 0).
    late_answer: float | None = None

    def __post_init__(self) -> None:
        total = sum(k.count for k in self.kinds)
        if total > MAX_DEVICES:
            raise PlacewiseError(f"the cluster has {total} devices, more than the {MAX_DEVICES} placewise plans for; "
                                 "give fewer")
        if self.bandwidth is not None and not (self.bandwidth > 0 and math.isfinite(self.bandwidth)):
            raise PlacewiseError(f"the cluster's bandwidth is {self.bandwidth}; use a finite, positive number of "
                                 "bytes per second")
        if self.latency is not None and not (self.latency >= 0 and math.isfinite(self.latency)):
            raise PlacewiseError(f"the cluster's latency is {self.latency}; use a finite number of seconds, 0 or more")
        if self.overhead is not None and not (self.overhead >= 0 and math.isfinite(self.overhead)):
            raise PlacewiseError(f"the cluster's overhead is {self.overhead}; use a finite number of seconds, 0 or more")
        if self.late_answer is not None and not 0 <= self.late_answer <= 1:
            raise PlacewiseError(f"the cluster's late_answer is {self.late_answer}; use a share from 0 to 1")

    @classmethod
    def simple(cls, accelerators: int, cpus: int = 0, memory: float | None = None) -> "Cluster":
        """The paper's cluster: k identical accelerators and l CPU cores."""
        return cls((DeviceKind(ACCELERATOR, accelerators, True, memory), DeviceKind(CPU, cpus, False, None)))

    def kind(self, name: str) -> DeviceKind:
        for k in self.kinds:
            if k.name == name:
                return k
        raise PlacewiseError(f"unknown device kind {name!r}; the cluster has {', '.join(k.name for k in self.kinds)}")

    def has(self, device: Device) -> bool:
        return any(k.name == device.kind and 0 <= device.index < k.count for k in self.kinds)

    def devices(self) -> list[Device]:
        return [Device(k.name, i) for k in self.kinds for i in range(k.count)]

    @property
    def accelerators(self) -> int:
        return sum(k.count for k in self.kinds if k.accelerator)

    @property
    def cpus(self) -> int:
        return sum(k.count for k in self.kinds if not k.accelerator)

    def with_overrides(self, accelerators: int | None = None, cpus: int | None = None,
                       memory: float | None = None) -> "Cluster":
        """Apply the CLI's --accelerators/--cpus/--memory to the paper's two kinds; the result must have a device."""
        kinds = list(self.kinds)
        names = [k.name for k in kinds]
        for name, accel in ((ACCELERATOR, True), (CPU, False)):
            if name not in names:
                kinds.append(DeviceKind(name, 0, accel, None))
                names.append(name)
        out = []
        for k in kinds:
            if k.name == ACCELERATOR:
                k = replace(k, count=k.count if accelerators is None else accelerators,
                            memory=k.memory if memory is None else memory)
            elif k.name == CPU and cpus is not None:
                k = replace(k, count=cpus)
            out.append(k)
        cluster = replace(self, kinds=tuple(out))
        # Checked here, for every command that takes these flags, before any of them starts work
        # (scoring a split on no devices would otherwise fail inside the cost model).
        if not cluster.accelerators + cluster.cpus:
            raise PlacewiseError("the cluster has no devices; give --accelerators and/or --cpus of at least 1")
        return cluster

    def to_json(self) -> dict:
        return {
            "kinds": [{"name": k.name, "count": k.count, "accelerator": k.accelerator,
                       "memory": k.memory, "speed": k.speed, "shared_memory": k.shared_memory} for k in self.kinds],
            "bandwidth": self.bandwidth,
            "latency": self.latency,
            "overhead": self.overhead,
            "late_answer": self.late_answer,
        }

    @classmethod
    def from_json(cls, data: dict, source: str = "cluster") -> "Cluster":
        try:
            kinds = tuple(
                DeviceKind(str(k["name"]), int(k["count"]), bool(k.get("accelerator", True)),
                           None if k.get("memory") is None else float(k["memory"]), float(k.get("speed", 1.0)),
                           None if k.get("shared_memory") is None else bool(k["shared_memory"]))
                for k in data["kinds"])
            bandwidth, latency, overhead = data.get("bandwidth"), data.get("latency"), data.get("overhead")
            late = data.get("late_answer")
            return cls(kinds, None if bandwidth is None else float(bandwidth), None if latency is None else float(latency),
                       None if overhead is None else float(overhead), None if late is None else float(late))
        except PlacewiseError as e:
            raise PlacewiseError(f"{source}: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PlacewiseError(
                f"{source}: cluster: malformed ({type(e).__name__}: {e}); give kinds as a list of "
                "{name, count, accelerator, memory, speed, shared_memory}") from None
