"""`FusedOptimizer`: a standard torch optimizer whose per-bucket updates run inside backward or the next forward.

* ``mode="backward"``: a bucket is updated inside backward, as soon as the last of its gradients is
  final (``Tensor.register_post_accumulate_grad_hook``). ``step()`` only marks the step boundary
  and updates buckets whose gradients never all arrived (unused or re-frozen parameters). With
  ``release_grads`` each bucket's gradients are freed right after its update, so backward holds
  only the gradients of buckets not yet complete, never all of them (with overlap, also those of at
  most two buckets the worker has not finished: `placewise.fuse.worker.RELEASE_QUEUE`).
* ``mode="forward"``: ``step()`` records the update; each bucket is applied in a forward pre-hook
  right before the module that uses it runs next (`placewise.fuse.forward`).

Backward mode can overlap (``overlap=True``): a complete bucket's update is handed to ONE worker
thread (`placewise.fuse.worker`), so the update of layer L runs while backward computes the layers
before it. The update only reads the bucket's gradients and writes its parameters and optimizer
state, which the rest of that backward never touches: autograd runs a parameter's post-accumulate
hook only after every node that takes the parameter as an input has run. Each backward ends by
waiting for its queued updates (an autograd final callback), so ``backward()`` returns, or raises
the worker's exception, with every update applied; a new forward of the model, ``step()``,
``zero_grad()``, ``flush()``, ``state_dict()``, ``accumulate()`` and ``close()`` wait as well,
should a backward have failed half-way. On CUDA the worker issues each update on the stream the
autograd thread was using.

The mathematics is untouched: every bucket update is a call to ``step()`` of the requested class,
on a twin of the instance whose ``state`` it shares and whose ``param_groups`` is that bucket alone
(with its group's hyper-parameters), so the same for-loop, foreach or fused kernel runs; these
are elementwise per parameter, so the result is bitwise that of the unfused optimizer, and
``state_dict()`` is the inner optimizer's. docs/fusion.md lists the rules that follow from updating
early (accumulation, clipping, higher-order gradients, retained graphs, aliases).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from placewise.errors import PlacewiseError
from placewise.fuse.buckets import WHOLE_GROUP, Bucket, build_layout
from placewise.fuse.clipping import NormPass, clip_coefficient
from placewise.fuse.forward import ForwardSchedule
from placewise.fuse.sizing import BucketChoice, StepTimer
from placewise.fuse.worker import RELEASE_QUEUE, UNBOUNDED_QUEUE, Worker

Mode = Literal["backward", "forward"]
MODES: tuple[str, ...] = ("backward", "forward")


class FusedOptimizer(torch.optim.Optimizer):
    """A torch optimizer whose per-bucket updates run inside backward or the next forward.

    Built by `fuse_optimizer`. Used like the optimizer it wraps: ``step()`` is the step boundary,
    ``zero_grad()``, ``state_dict()``/``load_state_dict()`` (the wrapped class's format),
    ``param_groups``/``state``/``defaults`` (the wrapped instance's, so LR schedulers work), plus
    ``flush()``, ``accumulate()``, ``clipped_backward()``, ``clip_grad_norm_()`` and ``close()``.
    """

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        mode: Mode,
        module: nn.Module | None,
        choice: BucketChoice,
        overlap: bool = False,
        release_grads: bool = False,
    ) -> None:
        # Optimizer.__init__ is not called: the groups and the state live in `inner`, shared.
        self._inner = inner
        self.bucket_choice = choice
        # "auto": the first steps are timed, then the buckets re-sized for that step (`_resize`).
        self._timer = StepTimer(choice.cost, compare_unfused=not release_grads) if choice.cost is not None else None
        # The class's step without torch's profiling/hook wrapper (pure per-call overhead here);
        # the inner instance is private, so no user hook on it can be skipped.
        step = type(inner).step
        self._inner_step: Callable[[torch.optim.Optimizer], Any] = (
            step.__wrapped__ if getattr(step, "hooked", False) and hasattr(step, "__wrapped__") else step
        )
        # A twin of the inner instance that runs each bucket's step (see `_update`).
        self._stepper: torch.optim.Optimizer = object.__new__(type(inner))
        self.mode: Mode = mode
        self.release_grads = release_grads
        self._module = module
        self._lock = threading.Lock()  # held for each update: autograd may call hooks from its device threads
        self._count_lock = threading.Lock()  # bucket completion counts (never held while updating)
        # With release, backward waits while an update is queued behind the running one: a worker
        # slower than backward then holds two buckets' gradients, not every bucket it lags behind.
        self._worker: Worker | None = Worker(RELEASE_QUEUE if release_grads else UNBOUNDED_QUEUE) if overlap else None
        self._accumulating = False
        self._fired: set[int] = set()  # id of each parameter whose gradient is final this step
        self._waiting_task: int | None = None  # the last backward (graph task id) that queued a wait at its end
        self._norm_pass: NormPass | None = None  # clipped_backward's first pass is running
        self._clip_coef: Tensor | None = None  # this step's gradients are scaled by it before their update
        self._forward: ForwardSchedule | None = None
        self._handles: list[Any] = []
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        # state_dict() and load_state_dict() are the wrapped optimizer's, so hooks registered here must
        # land in its tables to run (they receive the wrapped optimizer).
        self._optimizer_state_dict_pre_hooks = inner._optimizer_state_dict_pre_hooks
        self._optimizer_state_dict_post_hooks = inner._optimizer_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks = inner._optimizer_load_state_dict_pre_hooks
        self._optimizer_load_state_dict_post_hooks = inner._optimizer_load_state_dict_post_hooks
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

    @property
    def unfused(self) -> bool:
        """Whether the bucket choice fell back to torch's own step: one optimizer call in ``step()``."""
        return self.bucket_choice.min_bucket_numel is None

    def __repr__(self) -> str:
        extra = (", overlap=True" if self._worker is not None else "") + (", release_grads=True" if self.release_grads else "")
        return f"FusedOptimizer(mode={self.mode!r}{extra}, {self.bucketing()}, {self._inner!r})"

    def bucketing(self) -> str:
        """Which bucketing is in use and why, in words (for logs and benchmark reports)."""
        if self.unfused:
            return f"unfused: one optimizer call in step() ({self.bucket_choice.reason})"
        return f"{len(self._buckets)} buckets of >= {self.bucket_choice.min_bucket_numel} elements ({self.bucket_choice.reason})"

    # ---- buckets and hooks -----------------------------------------------------------------------
    def _build(self) -> None:
        """Split the groups into buckets and install the gradient or forward hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        floor = self.bucket_choice.min_bucket_numel
        layout = build_layout(self.param_groups, self._module, WHOLE_GROUP if floor is None else floor)
        self._buckets: list[Bucket] = layout.buckets
        self._bucket_of = layout.bucket_of
        if self.unfused:
            return  # step() runs the wrapped optimizer's own step: no hook to install
        if self.mode == "backward":
            for bucket in self._buckets:
                for p in bucket.params:
                    if p.requires_grad:
                        self._handles.append(p.register_post_accumulate_grad_hook(_weak_hook(self, "_on_grad_final")))
            if self._worker is not None and self._module is not None:
                # Normally backward waits for its updates; this covers a backward that raised half-way.
                self._handles.append(self._module.register_forward_pre_hook(_weak_hook(self, "_wait")))
            return
        assert self._module is not None  # fuse_optimizer requires the module for forward mode
        if self._forward is None:
            self._forward = ForwardSchedule(layout)
        else:
            self._forward.relayout(layout)
        for mod in self._module.modules():
            self._handles.append(mod.register_forward_pre_hook(_weak_hook(self, "_on_forward")))

    def _update(self, bucket: Bucket, hyper: dict[str, Any]) -> None:
        """Run the wrapped optimizer's step on this bucket alone, with `hyper`'s hyper-parameters.

        In backward mode the step's clip coefficient is applied to the gradients first, and with
        ``release_grads`` they are freed once the update is applied.
        """
        view = bucket.view[0]
        for key, value in hyper.items():
            if key != "params":
                view[key] = value
        stepper = self._stepper
        with self._lock:
            if self._clip_coef is not None:
                self._scale_grads(bucket.params, self._clip_coef)
            # The twin takes the inner instance's current attributes (a loaded state dict replaces
            # `state`), then only this bucket as its groups; the inner instance is never narrowed,
            # so schedulers and other threads always see the true groups.
            stepper.__dict__.update(self._inner.__dict__)
            stepper.param_groups = bucket.view
            try:
                self._inner_step(stepper)
            finally:
                stepper.param_groups = []
            if self.release_grads:
                for p in bucket.params:
                    p.grad = None

    @staticmethod
    def _scale_grads(params: list[Tensor], coef: Tensor) -> None:
        """Multiply the gradients by the clip coefficient, as torch's clip_grad_norm_ does (elementwise)."""
        on_device: dict[torch.device, Tensor] = {}
        for p in params:
            if p.grad is not None:
                device = p.grad.device
                if device not in on_device:
                    on_device[device] = coef.to(device)
                p.grad.mul_(on_device[device])

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
        if self._norm_pass is not None:
            self._norm_pass.on_grad(param)
            return
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
        # Backward returns (or raises the worker's error) only once its updates are applied: one wait at
        # its end, queued by its first bucket (autograd's graph task id tells the backwards apart).
        task = torch._C._current_graph_task_id()
        with self._count_lock:
            first, self._waiting_task = self._waiting_task != task, task
        if first:
            torch.autograd.Variable._execution_engine.queue_callback(self._wait)  # type: ignore[attr-defined]

    def _update_on(self, bucket: Bucket, hyper: dict[str, Any], stream: Any) -> None:
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

    def _on_forward(self, module: nn.Module, args: Any) -> None:
        """Forward mode: apply the pending updates this module is about to use."""
        assert self._forward is not None
        self._forward.on_forward(module, self._update, torch.is_grad_enabled())

    def _params_with_grads(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

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
        if self.unfused:
            self._step_unfused()
        elif self.mode == "backward":
            self._wait()
            groups = self.param_groups
            for bucket in self._buckets:
                if not bucket.done and any(p.grad is not None for p in bucket.params):
                    self._update(bucket, groups[bucket.group])
                bucket.done = False
                bucket.fired = 0
            self._fired.clear()
        else:
            assert self._forward is not None
            self.flush()
            self._forward.schedule(self.param_groups, self._update)
        self._clip_coef = None
        if self._timer is not None:
            self._resize(self._timer)
        return loss

    def _resize(self, timer: StepTimer) -> None:
        """A step boundary of "auto" sizing: once the step is timed, re-bucket for it (nothing is in flight)."""
        assert self.bucket_choice.cost is not None
        choice = timer.tick(self.bucket_choice.cost.overhead(self.bucket_choice, len(self._buckets)))
        if choice is None:
            return
        if timer.done:
            self._timer = None
        self.flush()  # forward mode: no pending bucket across a new layout
        self.bucket_choice = choice
        self._build()

    def _step_unfused(self) -> None:
        """The wrapped optimizer's own step over every group (one kernel call); gradients released as when fused."""
        self._inner_step(self._inner)
        if self.release_grads:
            self._inner.zero_grad(set_to_none=True)

    def flush(self) -> None:
        """Apply every pending update now: forward mode's deferred ones, or the worker's queued ones."""
        self._wait()
        if self._forward is not None:
            self._forward.flush(self._update)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients; in forward mode a pending bucket's are cleared right after it is applied."""
        self._wait()  # the worker reads gradients
        if self._forward is None or not self._forward.zero_grad(self.param_groups, set_to_none):
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

    def clipped_backward(
        self, loss: Tensor, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False, foreach: bool | None = None
    ) -> Tensor:
        """``loss.backward()`` with exact global-norm gradient clipping; returns the total norm.

        The same numbers as ``loss.backward(); torch.nn.utils.clip_grad_norm_(params, max_norm, ...)``
        before the unfused step, ``params`` in group order. In backward mode this costs one extra
        backward: a first pass over a retained graph only measures each gradient's norm and frees it
        at once, then the second pass applies the clipped updates. With ``error_if_nonfinite``
        a non-finite norm raises before any parameter was updated (the step can be skipped).
        """
        if self._accumulating:
            raise PlacewiseError("fuse: clipped_backward() is the final micro-step's backward; call it outside accumulate()")
        if self.mode == "forward" or self.unfused:  # every gradient exists before any update: clip as torch does
            loss.backward()
            return self.clip_grad_norm_(max_norm, norm_type, error_if_nonfinite, foreach)
        self._wait()
        params = [p for g in self.param_groups for p in g["params"]]
        norms = self._norm_pass = NormPass(params, norm_type, foreach)
        try:
            loss.backward(retain_graph=True)
            total = norms.total(error_if_nonfinite)
        finally:
            self._norm_pass = None
            norms.restore()
        self._clip_coef = clip_coefficient(max_norm, total)
        loss.backward()
        return total

    def clip_grad_norm_(
        self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False, foreach: bool | None = None
    ) -> Tensor:
        """Global-norm clipping of every gradient in the groups, between backward and ``step()``.

        Exact in forward mode and when the bucketing fell back to unfused; in backward mode the
        updates already happened during backward, so it raises: use `clipped_backward` there.
        """
        if self.mode == "backward" and not self.unfused:
            raise PlacewiseError(
                "fuse: global-norm gradient clipping after backward comes too late in backward-fusion mode "
                "(the updates happened during backward); call fused.clipped_backward(loss, max_norm) instead "
                "of loss.backward() (exact, one extra backward pass), or use mode='forward'"
            )
        self.flush()
        return torch.nn.utils.clip_grad_norm_(self._params_with_grads(), max_norm, norm_type, error_if_nonfinite, foreach)

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
            # No hook is left to apply buckets (forward mode) or to fire them (backward mode).
            self.bucket_choice = replace(self.bucket_choice, min_bucket_numel=None, reason="hooks removed", cost=None)
            self._timer = None

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
