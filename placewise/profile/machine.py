"""What this machine has (CPU cores, memory, CUDA devices), and a device file describing it."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from placewise.graph.devicefile import device_file_text
from placewise.graph.devices import ACCELERATOR, CPU, Cluster, DeviceKind
from placewise.graph.formats import DEFAULT_BANDWIDTH


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def describe_machine() -> dict[str, Any]:
    """CPU model, logical cores (all, and those this process may use), memory, torch threads and
    CUDA devices (name, memory, compute capability). Works without torch, then lists no GPUs."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {"cpu": {"model": _cpu_model(), "cores": os.cpu_count(), "usable_cores": usable},
                            "memory": _memory_bytes(), "torch": None, "cuda": []}
    try:
        import torch
    except ImportError:
        return info
    info["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["cuda"].append({"index": i, "name": p.name, "memory": int(p.total_memory),
                                 "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count})
    return info


def machine_cluster(info: dict[str, Any]) -> Cluster:
    """This machine as a cluster: its CUDA devices as accelerators (the smallest memory, speed 1:
    relative to a graph profiled with --device cuda) and its usable cores as CPUs (speed 1: relative
    to a graph profiled on one core, the default). placewise runs each stage as its own process, so
    the cores do not share memory: a CPU stage pays its transfers over the link, `info["link"]`
    where measured."""
    gpus = info["cuda"]
    kinds = (DeviceKind(ACCELERATOR, len(gpus), True, float(min(g["memory"] for g in gpus)) if gpus else None, 1.0),
             DeviceKind(CPU, int(info["cpu"]["usable_cores"] or 1), False, None, 1.0, shared_memory=False))
    link = info.get("link")
    if link:
        return Cluster(kinds, link["bandwidth"], link["latency"], link.get("overhead"), link.get("late_answer"))
    return Cluster(kinds, DEFAULT_BANDWIDTH)


def machine_device_file(info: dict[str, Any]) -> str:
    header = (f"Device file for this machine: {info['cpu']['model']}, {info['cpu']['usable_cores']} usable core(s)"
              + (f", {len(info['cuda'])} x {info['cuda'][0]['name']}" if info["cuda"] else ", no CUDA device") + ".\n"
              "Speeds are relative to the device a graph was profiled on: the CPU kind to one core "
              "(`placewise profile`),\nthe accelerator kind to a CUDA device (`placewise profile --device cuda`). "
              "If the graph was profiled\non a CPU, set the accelerator speed to how many times faster it is than one core.\n"
              "The cores run stages as separate processes, so they pay transfers over the link (shared_memory: false;\n"
              "true is the paper's rule: cores in one process, no transfers).\n"
              + (f"The link was measured here between two processes ({info['link']['backend']}, median of ping-pongs),\n"
                 "the overhead on a two-stage pipeline that computes next to nothing (CPU time per microbatch),\n"
                 "late_answer as the share of a sender's chunk that a receive posted late waits (run/links.py)."
                 if info.get("link") else
                 "The bandwidth is a placeholder; measure the link with `placewise devices --measure --out FILE`."))
    return device_file_text(machine_cluster(info), header)
