"""Peak memory of one steady-state training step, for benchmarks/fusion.py's ``--memory``.

Two measures, taken in a fresh process per (model, optimizer, variant) after `WARM_STEPS` steps
(the first creates the optimizer state, and "auto" bucket sizing settles after the fifth), so the
measured step is a steady-state one, the same step for every variant:

* **RSS**: the peak resident set (VmHWM) of that one step, the peak reset right before it
  (``/proc/self/clear_refs``). The parent runs every child with the same glibc tunables
  (`GLIBC_NEUTRAL`: each block of 64 KiB or more mapped on its own, so a freed tensor goes back
  to the system at once and the peak follows the live tensors, not where the heap put them).
  On a GPU: ``torch.cuda.max_memory_allocated`` of that step.
* **live tensor bytes**: the allocator-free count. torch's profiler reports every allocation and
  free of the CPU (or CUDA) allocator with its address and the op that made it; summing them over
  the next step gives the live bytes at each moment, and at the peak, which tensors are alive:
  gradients (the tensors that become a parameter's ``.grad``: a marker is recorded from a
  post-accumulate-grad hook run before the optimizer's), other buffers made in backward (a tied
  parameter's gradient parts summed before they reach ``.grad``, grad outputs), tensors made in
  forward (activations saved for backward), optimizer temporaries. Parameters, optimizer state and
  inputs exist before the step and are counted directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

WARM_STEPS = 5
# glibc: blocks of 64 KiB or more get their own mapping (freed: returned at once); fixing the
# threshold also stops glibc from raising it after a large free, which made the default-malloc
# figures depend on the order of frees.
GLIBC_NEUTRAL = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_TOP_PAD_": "0"}
# glibc as a caching allocator (as CUDA's): no block mapped alone, the heap never trimmed, so a
# freed tensor's pages are reused and no step takes fresh pages from the kernel. For step times:
# with the default, whether a freed gradient's pages go back depends on the order of frees.
GLIBC_CACHING = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
MALLOC = {"default": {}, "neutral": GLIBC_NEUTRAL, "caching": GLIBC_CACHING}
PHASES = ("zero_grad", "forward", "backward", "step")
_GRAD_MARK = "pw:grad "


@contextmanager
def phase(name: str) -> Iterator[None]:
    """A profiler range naming a phase of the training step (free when no profiler runs)."""
    with record_function("pw:" + name):
        yield


def mark_gradients(model: nn.Module) -> None:
    """Record each gradient's address as it becomes final; install BEFORE the optimizer's hooks, so it runs first."""

    def hook(p: torch.Tensor) -> None:
        if p.grad is not None:
            with record_function(_GRAD_MARK + str(p.grad.untyped_storage().data_ptr())):
                pass

    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(hook)


def vm(field: str) -> int:
    """A /proc/self/status memory figure (VmHWM: peak resident set) in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (memory figures need Linux)")


def step_peak(step: Callable[[], None], device: str) -> tuple[int, int]:
    """(memory at the start, peak) of one call of `step`: RSS on a CPU, allocated bytes on a GPU."""
    if device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return start, torch.cuda.max_memory_allocated()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
    start = vm("VmRSS")
    step()
    return start, vm("VmHWM")


def persistent_bytes(model: nn.Module, optimizer: Any, inputs: tuple[torch.Tensor, ...]) -> int:
    """Bytes of the tensors that outlive a step: parameters, optimizer state, inputs (each storage once)."""
    seen: dict[int, int] = {}
    tensors = list(model.parameters()) + list(inputs)
    if optimizer is not None:
        tensors += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def live_peak(step: Callable[[], None], device: str) -> dict[str, Any]:
    """Profile two steps; the live-bytes peak of the second, above its start, and what is alive at it (bytes).

    The first profiled step makes every block the second frees known to the profiler.
    """
    kind = "cuda" if device.startswith("cuda") else "cpu"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if kind == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        step()
        with record_function("pw:measured"):
            step()
    events = list(_walk(prof.profiler.kineto_results.experimental_event_tree()))
    window = next(e for e in events if e.name == "pw:measured")
    phases = [(e.start_time_ns, e.end_time_ns, e.name[3:]) for e in events if e.name[3:] in PHASES and _inside(e, window)]
    marks = [(int(e.name[len(_GRAD_MARK):]), e.start_time_ns) for e in events if e.name.startswith(_GRAD_MARK) and _inside(e, window)]
    allocs = sorted((e for e in events if str(e.tag).endswith("Allocation") and e.typed[1].device.type == kind),
                    key=lambda e: e.start_time_ns)
    live: dict[int, tuple[int, int, str, Any]] = {}  # address -> (bytes, made at, phase, event)
    level = floor = best = 0
    best_live: dict[int, tuple[int, int, str, Any]] = {}
    best_event: Any = None
    for e in allocs:
        f = e.typed[1]
        t = e.start_time_ns
        if f.alloc_size > 0:
            live[f.ptr] = (f.alloc_size, t, _phase_at(t, phases, window), e)
        elif f.ptr in live:
            del live[f.ptr]
        else:
            continue  # a block made before profiling (its size unknown to the profiler)
        level += f.alloc_size
        if window.start_time_ns <= t <= window.end_time_ns:
            if best_event is None:
                floor = best = level - f.alloc_size
            if level > best:
                best, best_live, best_event = level, dict(live), e
    held = {name: 0 for name in ("gradients", "backward buffers", "forward tensors", "optimizer temporaries", "before the step")}
    for ptr, (size, made, ph, _) in best_live.items():
        lives_on = any(p == ptr and m >= made for p, m in marks)
        if lives_on and ph in ("backward", "step"):
            held["gradients"] += size
        elif ph == "backward":
            held["backward buffers"] += size
        elif ph == "forward":
            held["forward tensors"] += size
        elif ph == "step":
            held["optimizer temporaries"] += size
        else:
            held["before the step"] += size
    return {"above_start": best - floor, "held": held, "at": _where(best_event), "phase": _phase_at(best_event.start_time_ns, phases, window) if best_event else ""}


def _walk(nodes: list[Any]) -> Iterator[Any]:
    for node in nodes:
        yield node
        yield from _walk(node.children)


def _inside(e: Any, window: Any) -> bool:
    return window.start_time_ns <= e.start_time_ns <= window.end_time_ns


def _phase_at(t: int, phases: list[tuple[int, int, str]], window: Any) -> str:
    if not window.start_time_ns <= t <= window.end_time_ns:
        return "earlier"
    return next((name for a, b, name in phases if a <= t <= b), "between")


def _where(event: Any) -> str:
    """The op that made the peak's last allocation, and the backward node running it."""
    names = []
    node = event.parent if event is not None else None
    while node is not None:
        names.append(node.name)
        node = node.parent
    engine = next((n.split(": ", 1)[1] for n in names if n.startswith("autograd::engine::evaluate_function")), "")
    return " in ".join(x for x in (names[0] if names else "", engine) if x)
