"""Optimizer fusion: apply a standard torch optimizer's update while the parameter is hot.

A normal training step is forward, backward, then one more pass over every parameter for the
optimizer. `FusedOptimizer` moves the update of each *bucket* (the parameters one module holds
within one param group; adjacent small layers are merged up to ``min_bucket_numel`` elements,
because each bucket update costs one Python-level optimizer call) next to the computation that
touches them anyway:

* ``mode="backward"``: a bucket is updated inside backward, as soon as the last of its gradients is
  final (``Tensor.register_post_accumulate_grad_hook``). ``step()`` only marks the step boundary
  and updates buckets whose gradients never all arrived (unused or re-frozen parameters).
* ``mode="forward"``: ``step()`` records the update; each bucket is applied in a forward pre-hook
  right before the module that uses it runs next. ``flush()`` applies whatever is still pending
  (call it before evaluation or saving the model; ``state_dict()`` flushes by itself).

Backward mode can also overlap (``overlap=True``): a complete bucket's update is handed to ONE
worker thread instead of running in the autograd thread, so the update of layer L runs while
backward computes the layers before it (torch's kernels release the GIL). The update only reads
the bucket's gradients and writes its parameters and optimizer state, which the rest of that
backward never touches: autograd runs a parameter's post-accumulate hook only after every node
that takes the parameter as an input has run (all uses of a shared parameter, and the recomputed
forward of a checkpointed segment, included). Each backward pass
ends by waiting for its queued updates (an autograd final callback), so ``backward()`` returns,
or raises the worker's exception, with every update applied, exactly as without overlap; a new
forward of the model, ``step()``, ``zero_grad()``, ``flush()``, ``state_dict()``, ``accumulate()``
and ``close()`` wait as well, should a backward have failed half-way. On CUDA the worker issues
each update on the stream the autograd thread was using, so stream order stays the same.

The mathematics is untouched: every bucket update is a call to ``step()`` of the requested
optimizer class, built with the same arguments, on a twin of the instance whose ``state`` it
shares and whose ``param_groups`` is that bucket alone (with the hyper-parameters of the bucket's
group); the instance that holds the groups is never narrowed. So the update uses the
same for-loop, foreach or fused kernel as the unfused optimizer, with the bucket's tensors batched
into one foreach/fused call. These kernels are elementwise per parameter, so the result is bitwise
equal to the unfused optimizer; ``state_dict()`` is the inner optimizer's, so states load both ways.

Rules that follow from updating early (each one is checked or documented):

* Gradient accumulation: in backward mode run the non-final micro-steps' backward passes inside
  ``with fused.accumulate():``; a parameter that receives a second gradient in one step outside it
  raises `PlacewiseError` instead of silently updating twice. In forward mode nothing is updated
  before ``step()``, so accumulation needs nothing (``accumulate()`` is accepted as a no-op).
* Global-norm gradient clipping needs every gradient before any update. Forward mode: exact; clip
  between backward and ``step()`` as usual (``fused.clip_grad_norm_`` or torch's own). Backward
  mode: ``fused.clip_grad_norm_`` raises `PlacewiseError`; clipping with torch's function after
  backward would act on gradients that were already applied, so do not.
* ``backward(create_graph=True)`` outside ``accumulate()`` raises `PlacewiseError` in backward
  mode: the gradients are meant to be differentiated again, through the parameters the update
  would already have changed. Inside ``accumulate()`` it is fine (nothing is updated there).
* A retained graph (``retain_graph=True``) cannot be run backward again before ``step()``: it saved
  parameters that were since updated (torch's in-place check raises), or it would deliver a second
  gradient (`PlacewiseError`). Run the earlier passes inside ``accumulate()``.
* A graph that reads a parameter through an alias autograd does not track (``p.detach()`` or
  ``p.data`` saved by an op whose gradient flows elsewhere) may read it after its update: torch
  raises its in-place error for ``detach()`` aliases, ``.data`` aliases are not caught, and with
  overlap such a read may also race with the update. Use the parameter itself.
* Skipping a step after backward (e.g. on a non-finite loss) is impossible in backward mode: the
  update already happened. Use forward mode for that.
* Learning-rate schedulers work on ``param_groups`` as usual. Forward mode snapshots the groups'
  hyper-parameters at ``step()`` so a scheduler stepping before the deferred update cannot leak in.
* Forward mode applies a bucket at the pre-hook of the module holding it, or, for a module whose
  own forward never runs (MultiheadAttention's ``out_proj``), of its nearest ancestor seen running.
  A forward run with gradients disabled (evaluation, where inference fast paths read children's
  weights) applies everything pending at its first module. Other uses of a parameter outside
  those forwards (e.g. reading ``model.state_dict()``) need ``flush()`` first.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import sys
import threading
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

from placewise.errors import PlacewiseError

Mode = Literal["backward", "forward"]
MODES: tuple[str, ...] = ("backward", "forward")

# Optimizers whose update of one parameter depends on other parameters cannot be split per bucket.
_WHOLE_MODEL_OPTIMIZERS: tuple[type, ...] = (torch.optim.LBFGS,)


class _Bucket:
    """Parameters of one param group held by one layer (or a few adjacent small ones), updated by one kernel call."""

    __slots__ = ("index", "group", "params", "holders", "hooked", "fired", "done", "view")

    def __init__(self, index: int, group: int, params: list[Tensor], holders: list[nn.Module]) -> None:
        self.index = index
        self.group = group
        self.params = params
        self.holders = holders
        # Parameters whose gradient hook must fire before the bucket counts as complete.
        self.hooked = sum(1 for p in params if p.requires_grad)
        self.fired = 0  # how many of them did fire this step
        self.done = False
        # The one-group list swapped into the inner optimizer to update only this bucket.
        self.view: list[dict[str, Any]] = [{"params": params}]


class _Worker:
    """One daemon thread running the submitted updates in order (torch's kernels release the GIL).

    `wait()` blocks until every submitted job ran and re-raises the first exception one raised
    (the jobs after a failed one are skipped: the step is broken anyway). `stop()` ends the thread.
    The thread holds the worker, never the optimizer, except through a job while it is queued.
    """

    def __init__(self, maxsize: int = 1024) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize)
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=_work, args=(self._jobs, self), name="placewise-fuse-overlap", daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def wait(self, raise_error: bool = True) -> None:
        if self._thread is None or self._thread is threading.current_thread():
            return
        self._jobs.join()
        if raise_error and self.error is not None:
            error, self.error = self.error, None
            raise error

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._jobs.put(None)
        # __del__ may run on the worker itself, or at interpreter exit, when daemon threads no longer run.
        if thread is not threading.current_thread() and not sys.is_finalizing():
            thread.join()


def _work(jobs: queue.Queue[Callable[[], None] | None], worker: _Worker) -> None:
    """The worker thread's loop: run jobs until the None sentinel."""
    while True:
        job = jobs.get()
        try:
            if job is None:
                return
            if worker.error is None:
                try:
                    job()
                except BaseException as exc:  # handed to the thread that waits
                    worker.error = exc
        finally:
            job = None  # a job holds the optimizer: drop it before blocking on the next one
            jobs.task_done()


def _hyper_snapshot(group: dict[str, Any]) -> dict[str, Any]:
    """A group's hyper-parameters frozen at this moment (schedulers fill_ tensor-valued lr in place)."""
    return {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in group.items() if k != "params"}


def _zero_grads(params: Iterable[Tensor], set_to_none: bool) -> None:
    """Clear gradients the way `torch.optim.Optimizer.zero_grad` does."""
    for p in params:
        if p.grad is None:
            continue
        if set_to_none:
            p.grad = None
        else:
            if p.grad.grad_fn is not None:
                p.grad.detach_()
            else:
                p.grad.requires_grad_(False)
            p.grad.zero_()


class FusedOptimizer(torch.optim.Optimizer):
    """A torch optimizer whose per-bucket updates run inside backward or the next forward.

    Built by `fuse_optimizer`. Used like the optimizer it wraps: ``step()`` is the step boundary,
    ``zero_grad()``, ``state_dict()``/``load_state_dict()`` (the wrapped class's format),
    ``param_groups``/``state``/``defaults`` (the wrapped instance's, so LR schedulers work), plus
    ``flush()``, ``accumulate()``, ``clip_grad_norm_()`` and ``close()``.
    """

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        mode: Mode,
        module: nn.Module | None,
        min_bucket_numel: int = 0,
        overlap: bool = False,
    ) -> None:
        # Optimizer.__init__ is not called: the groups and the state live in `inner`, shared.
        self._inner = inner
        self._min_bucket_numel = min_bucket_numel
        # The class's step without torch's profiling/hook wrapper (pure per-call overhead here);
        # the inner instance is private, so no user hook on it can be skipped.
        step = type(inner).step
        self._inner_step: Callable[[torch.optim.Optimizer], Any] = (
            step.__wrapped__ if getattr(step, "hooked", False) and hasattr(step, "__wrapped__") else step
        )
        # A twin of the inner instance that runs each bucket's step (see `_update`).
        self._stepper: torch.optim.Optimizer = object.__new__(type(inner))
        self.mode: Mode = mode
        self._module = module
        self._lock = threading.Lock()  # held for each update: autograd may call hooks from its device threads
        self._count_lock = threading.Lock()  # bucket completion counts (never held while updating)
        self._worker: _Worker | None = _Worker() if overlap else None
        self._accumulating = False
        self._fired: set[int] = set()  # id of each parameter whose gradient is final this step
        self._pending: dict[int, _Bucket] = {}  # forward mode: bucket index -> bucket to apply
        self._snapshots: list[dict[str, Any]] = []  # forward mode: hyper-parameters at step()
        self._zero_after_apply: bool | None = None  # forward mode: deferred zero_grad(set_to_none)
        self._ran: set[int] = set()  # ids of modules whose forward was seen running
        self._ran_at_last_triggers = -1
        self._applies_at: dict[int, list[_Bucket]] = {}  # module id -> buckets its pre-hook applies
        self._handles: list[Any] = []
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._zero_grad_profile_name = "Optimizer.zero_grad#FusedOptimizer.zero_grad"
        self._build()

    # ---- what schedulers and checkpoints see: the wrapped optimizer's own objects -----------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self._inner.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self._inner.param_groups = groups

    @property
    def state(self) -> defaultdict[Tensor, Any]:  # type: ignore[override]
        return self._inner.state

    @state.setter
    def state(self, state: defaultdict[Tensor, Any]) -> None:
        self._inner.state = state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self._inner.defaults

    @defaults.setter
    def defaults(self, defaults: dict[str, Any]) -> None:
        self._inner.defaults = defaults

    @property
    def inner(self) -> torch.optim.Optimizer:
        """The wrapped optimizer instance (holds the groups and the state)."""
        return self._inner

    @property
    def overlap(self) -> bool:
        """Whether backward-mode updates run on the worker thread, overlapping the rest of backward."""
        return self._worker is not None

    def __repr__(self) -> str:
        extra = ", overlap=True" if self._worker is not None else ""
        return f"FusedOptimizer(mode={self.mode!r}{extra}, {self._inner!r})"

    # ---- buckets and hooks -----------------------------------------------------------------------
    def _build(self) -> None:
        """Split the groups into buckets and install the gradient or forward hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        group_of: dict[int, int] = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                group_of[id(p)] = gi
        holders: dict[int, list[nn.Module]] = defaultdict(list)
        owner: dict[int, int] = {}  # parameter id -> id of the first module holding it
        self._parent: dict[int, nn.Module] = {}
        if self._module is not None:
            for mod in self._module.modules():
                for child in mod.children():
                    self._parent.setdefault(id(child), mod)
                for p in mod.parameters(recurse=False):
                    if id(p) in group_of:
                        holders[id(p)].append(mod)
                        owner.setdefault(id(p), id(mod))
        # Key: (holding module or the parameter itself when no module is known, group, hookable).
        # Frozen parameters go to their own bucket so they never hold back a bucket's completion.
        grouped: dict[tuple[int, int, bool], list[Tensor]] = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                key = (owner.get(id(p), id(p)), gi, p.requires_grad)
                grouped.setdefault(key, []).append(p)
        # Adjacent small layers of one group share a bucket: each bucket update costs a Python-level
        # optimizer step (tens of microseconds), more than a tiny layer's update itself.
        merged: list[tuple[tuple[int, bool], list[Tensor]]] = []
        for (_, gi, hookable), params in grouped.items():
            if merged and merged[-1][0] == (gi, hookable) and sum(p.numel() for p in merged[-1][1]) < self._min_bucket_numel:
                merged[-1][1].extend(params)
            else:
                merged.append(((gi, hookable), list(params)))
        self._buckets: list[_Bucket] = []
        self._bucket_of: dict[int, _Bucket] = {}
        for (gi, _), params in merged:
            mods: list[nn.Module] = []
            for p in params:
                mods.extend(m for m in holders.get(id(p), []) if all(m is not n for n in mods))
            bucket = _Bucket(len(self._buckets), gi, params, mods)
            self._buckets.append(bucket)
            for p in params:
                self._bucket_of[id(p)] = bucket
        if self.mode == "backward":
            for bucket in self._buckets:
                for p in bucket.params:
                    if p.requires_grad:
                        self._handles.append(p.register_post_accumulate_grad_hook(_weak_hook(self, "_on_grad_final")))
            if self._worker is not None and self._module is not None:
                # Normally backward waits for its updates; this covers a backward that raised half-way.
                self._handles.append(self._module.register_forward_pre_hook(_weak_hook(self, "_wait")))
        elif self._module is not None:
            self._held_by: dict[int, list[_Bucket]] = defaultdict(list)
            for bucket in self._buckets:
                for mod in bucket.holders:
                    self._held_by[id(mod)].append(bucket)
            for mod in self._module.modules():
                self._handles.append(mod.register_forward_pre_hook(_weak_hook(self, "_on_forward")))
            self._ran_at_last_triggers = -1

    def _update(self, bucket: _Bucket, hyper: dict[str, Any]) -> None:
        """Run the wrapped optimizer's step on this bucket alone, with `hyper`'s hyper-parameters."""
        view = bucket.view[0]
        for key, value in hyper.items():
            if key != "params":
                view[key] = value
        stepper = self._stepper
        with self._lock:
            # The twin takes the inner instance's current attributes (a loaded state dict replaces
            # `state`), then only this bucket as its groups; the inner instance is never narrowed,
            # so schedulers and other threads always see the true groups.
            stepper.__dict__.update(self._inner.__dict__)
            stepper.param_groups = bucket.view
            try:
                self._inner_step(stepper)
            finally:
                stepper.param_groups = []

    def _on_grad_final(self, param: Tensor) -> None:
        """Backward mode: count the parameter's gradient as final; update its bucket when complete."""
        if self._accumulating:
            return
        if torch.is_grad_enabled():  # autograd runs hooks in grad mode exactly when create_graph=True
            self._refuse(
                "fuse: backward(create_graph=True) in backward-fusion mode would update parameters that the "
                "gradients' own graph still reads; run that backward inside `with fused.accumulate():` "
                "(the final backward without create_graph), or use mode='forward'"
            )
        bucket = self._bucket_of[id(param)]
        second = complete = False
        with self._count_lock:
            if bucket.done or id(param) in self._fired:
                second = True
            else:
                self._fired.add(id(param))
                bucket.fired += 1
                complete = bucket.done = bucket.fired == bucket.hooked
        if second:
            self._refuse(
                f"fuse: a parameter of shape {tuple(param.shape)} got a second gradient before step() "
                "in backward-fusion mode (a second backward, or a retained graph run again); run the "
                "non-final micro-steps' backward inside `with fused.accumulate():` or call step() after each backward"
            )
        if not complete:
            return
        worker = self._worker
        if worker is None:
            self._update(bucket, self.param_groups[bucket.group])
            return
        stream = torch.cuda.current_stream(param.device) if param.is_cuda else None
        worker.submit(functools.partial(self._update_on, bucket, self.param_groups[bucket.group], stream))
        # Backward returns (or raises the worker's error) only once its updates are applied.
        torch.autograd.Variable._execution_engine.queue_callback(self._wait)  # type: ignore[attr-defined]

    def _update_on(self, bucket: _Bucket, hyper: dict[str, Any], stream: Any) -> None:
        """Worker thread: `_update` on the CUDA stream the autograd thread was on (none on CPU)."""
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            self._update(bucket, hyper)

    def _refuse(self, message: str) -> None:
        """Raise `PlacewiseError` from a hook, with no update of this backward still running."""
        if self._worker is not None:
            self._worker.wait(raise_error=False)  # a worker error stays for the next wait
        raise PlacewiseError(message)

    def _wait(self, *_: Any) -> None:
        """Wait for the worker's queued updates; re-raise an exception one of them raised."""
        if self._worker is not None:
            self._worker.wait()

    def _refresh_triggers(self) -> None:
        """Forward mode: map each module seen running to the pending buckets its pre-hook applies."""
        if self._ran_at_last_triggers == len(self._ran):
            return
        applies_at: dict[int, list[_Bucket]] = defaultdict(list)
        for bucket in self._buckets:
            for mod in bucket.holders:
                # The holder itself if it runs, else the nearest ancestor that does: its pre-hook
                # fires before any use of the parameter inside it.
                node: nn.Module | None = mod
                while node is not None and id(node) not in self._ran:
                    node = self._parent.get(id(node))
                if node is not None and all(b is not bucket for b in applies_at[id(node)]):
                    applies_at[id(node)].append(bucket)
        self._applies_at = dict(applies_at)
        self._triggered = {b.index for buckets in applies_at.values() for b in buckets}
        self._ran_at_last_triggers = len(self._ran)

    def _on_forward(self, module: nn.Module, args: Any) -> None:
        """Forward mode: apply the pending updates this module is about to use."""
        mid = id(module)
        if mid not in self._ran:
            self._ran.add(mid)
        if not self._pending:
            return
        if not torch.is_grad_enabled():
            # Evaluation: inference fast paths may read any weight from any module; apply all.
            self.flush()
            return
        for buckets in (self._applies_at.get(mid, ()), self._held_by.get(mid, ())):
            for bucket in buckets:
                if bucket.index in self._pending:
                    self._apply_pending(bucket)

    def _apply_pending(self, bucket: _Bucket) -> None:
        del self._pending[bucket.index]
        self._update(bucket, self._snapshots[bucket.group])
        if self._zero_after_apply is not None:
            _zero_grads(bucket.params, self._zero_after_apply)
        if not self._pending:
            self._zero_after_apply = None

    # ---- the optimizer interface -----------------------------------------------------------------
    @torch.optim.Optimizer.profile_hook_step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """The step boundary: finish (backward) or schedule (forward) this step's updates."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._accumulating:
            raise PlacewiseError("fuse: step() called inside accumulate(); leave the block for the final micro-step")
        if self.mode == "backward":
            self._wait()
            groups = self.param_groups
            for bucket in self._buckets:
                if not bucket.done and any(p.grad is not None for p in bucket.params):
                    self._update(bucket, groups[bucket.group])
                bucket.done = False
                bucket.fired = 0
            self._fired.clear()
            return loss
        self.flush()
        self._snapshots = [_hyper_snapshot(g) for g in self.param_groups]
        if self._module is not None:
            self._refresh_triggers()
        for bucket in self._buckets:
            if any(p.grad is not None for p in bucket.params):
                if self._module is not None and bucket.index in self._triggered:
                    self._pending[bucket.index] = bucket
                else:  # no forward is known to use it: update now, like the unfused optimizer
                    self._update(bucket, self._snapshots[bucket.group])
        return loss

    def flush(self) -> None:
        """Apply every pending update now: forward mode's deferred ones, or the worker's queued ones."""
        self._wait()
        for bucket in list(self._pending.values()):
            self._apply_pending(bucket)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients; in forward mode a pending bucket's are cleared right after it is applied."""
        self._wait()  # the worker reads gradients
        if self._pending:
            self._zero_after_apply = set_to_none
            params = (p for g in self.param_groups for p in g["params"] if self._bucket_of[id(p)].index not in self._pending)
            _zero_grads(params, set_to_none)
        else:
            self._inner.zero_grad(set_to_none)

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        """Backward passes inside accumulate gradients without updating (non-final micro-steps)."""
        self._wait()  # accumulating adds into gradients the worker may still be reading
        previous = self._accumulating
        self._accumulating = True
        try:
            yield
        finally:
            self._accumulating = previous

    def clip_grad_norm_(
        self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False, foreach: bool | None = None
    ) -> Tensor:
        """Global-norm clipping of every gradient in the groups (exact, forward mode only)."""
        if self.mode == "backward":
            raise PlacewiseError(
                "fuse: global-norm gradient clipping needs every gradient before any update, but "
                "backward-fusion updates during backward; use mode='forward' (exact) for clipping"
            )
        self.flush()
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, foreach)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict (pending updates applied first)."""
        self.flush()
        return self._inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by this or by the unfused optimizer of the same class."""
        self.flush()
        self._inner.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer and re-bucket."""
        self.flush()
        self._inner.add_param_group(param_group)
        self._build()

    def remove_hooks(self) -> None:
        """Detach from the model (pending updates applied first) and stop the worker thread.

        The object then stops fusing: ``step()`` updates whatever has gradients, like the unfused optimizer.
        """
        try:
            self.flush()
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []
            if self._worker is not None:
                self._worker.stop()

    def close(self) -> None:
        """Same as `remove_hooks`: apply what is pending, detach from the model, end the worker thread."""
        self.remove_hooks()

    def __del__(self) -> None:
        # The hooks hold the optimizer weakly; drop them with it so a discarded fused optimizer
        # never updates the model again (pending forward updates are lost, as unapplied steps).
        # Queued overlap jobs hold the optimizer, so none is left here: the worker just ends.
        for handle in getattr(self, "_handles", ()):
            handle.remove()
        worker = getattr(self, "_worker", None)
        if worker is not None:
            worker.stop()


def _weak_hook(optimizer: FusedOptimizer, method: str) -> Callable[..., None]:
    """A hook calling `optimizer.method` while the optimizer is alive, and doing nothing after."""
    ref = weakref.ref(optimizer)

    def hook(*args: Any) -> None:
        target = ref()
        if target is not None:
            getattr(target, method)(*args)

    return hook


def fuse_optimizer(
    model_or_params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
    optimizer_cls: type[torch.optim.Optimizer],
    mode: Mode = "backward",
    *,
    module: nn.Module | None = None,
    min_bucket_numel: int = 1 << 18,
    overlap: bool = False,
    **optimizer_kwargs: Any,
) -> FusedOptimizer:
    """Build `optimizer_cls(params, **optimizer_kwargs)` with its update fused into backward or forward.

    `model_or_params` is an `nn.Module` (all its parameters, one group) or what torch optimizers
    take (parameters or param-group dicts). With param groups, pass `module=` (the model) to get
    per-layer buckets; forward mode requires it. Without a module, backward mode updates each
    parameter on its own as its gradient becomes final. Adjacent layers of one group are merged
    into one bucket until it holds `min_bucket_numel` elements (0: exactly one bucket per layer).
    `overlap=True` (backward mode) runs each bucket's update on a worker thread while backward goes
    on with the earlier layers; ``close()`` (or dropping the optimizer) ends that thread.
    """
    if mode not in MODES:
        raise PlacewiseError(f"fuse: mode {mode!r} is not one of {', '.join(MODES)}; pick one")
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise PlacewiseError(f"fuse: optimizer_cls {optimizer_cls!r} is not a torch.optim.Optimizer subclass; pass e.g. torch.optim.AdamW")
    if issubclass(optimizer_cls, FusedOptimizer) or issubclass(optimizer_cls, _WHOLE_MODEL_OPTIMIZERS):
        raise PlacewiseError(f"fuse: {optimizer_cls.__name__} updates all parameters jointly and cannot be fused per layer; use SGD, Adam, AdamW, Adagrad or another per-parameter optimizer")
    if isinstance(model_or_params, nn.Module):
        if module is not None and module is not model_or_params:
            raise PlacewiseError("fuse: both a model and a different module= were given; pass one")
        module = model_or_params
        params: Any = list(model_or_params.parameters())
    else:
        params = list(model_or_params)
    if not isinstance(overlap, bool):
        raise PlacewiseError(f"fuse: overlap={overlap!r} must be True or False")
    if overlap and mode != "backward":
        raise PlacewiseError("fuse: overlap=True runs updates beside the rest of backward; forward mode applies each update right before its layer needs it, so use mode='backward' or drop overlap")
    if mode == "forward" and module is None:
        raise PlacewiseError("fuse: forward-fusion applies updates in the owning module's forward pre-hook; pass the model (or module=model with param groups)")
    if optimizer_kwargs.get("differentiable"):
        raise PlacewiseError("fuse: differentiable=True optimizers cannot be fused (updates happen inside hooks); drop it")
    try:
        inner = optimizer_cls(params, **optimizer_kwargs)
    except (TypeError, ValueError) as exc:
        raise PlacewiseError(f"fuse: {optimizer_cls.__name__}({', '.join(optimizer_kwargs)}) rejected its arguments: {exc}") from exc
    if not isinstance(min_bucket_numel, int) or min_bucket_numel < 0:
        raise PlacewiseError(f"fuse: min_bucket_numel={min_bucket_numel!r} must be an integer >= 0")
    return FusedOptimizer(inner, mode, module, min_bucket_numel, overlap)
