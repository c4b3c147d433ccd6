"""Optimizer fusion is exact: the same parameters and optimizer state as the unfused optimizer.

Evidence is independent of the fusion code: each fused run is compared with the plain torch
optimizer of the same class and kernel (for-loop, foreach or fused) on an identical model and
data, bitwise, with accumulation, with and without global-norm clipping, a scheduler changing the
lr every step, and a state_dict hand-over mid-run in both directions (fused -> unfused and unfused
-> fused). Backward mode runs inline and with its updates overlapped on a worker thread
("backward+overlap"), each with and without releasing the gradients after their update ("+release").
"""

from __future__ import annotations

import copy
import gc
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from placewise.errors import PlacewiseError
from placewise.fuse import BucketChoice, FusedOptimizer, fuse_optimizer

STEPS = 5
SWITCH_AT = 2  # the optimizer is handed over through state_dict after this many steps
ACCUMULATE = 2  # micro-steps per step
CLIP = 0.05  # small enough that clipping is active on every step

OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.1}),
    "sgd-momentum": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    "adam": (torch.optim.Adam, {"lr": 0.01, "amsgrad": True}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
    "adagrad": (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.01}),
}
KERNELS: dict[str, dict[str, bool]] = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
# Test mode -> fuse_optimizer arguments.
FUSE_MODES: dict[str, dict[str, Any]] = {
    "backward": {"mode": "backward"},
    "backward+overlap": {"mode": "backward", "overlap": True},
    "backward+release": {"mode": "backward", "release_grads": True},
    "backward+overlap+release": {"mode": "backward", "overlap": True, "release_grads": True},
    "forward": {"mode": "forward"},
}


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(x)).mean(dim=1))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, bias=False),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (mlp, (6,)),
    "cnn": (cnn, (3, 8, 8)),
    "transformer": (TinyTransformer, (5, 6)),
}


def batches(shape: tuple[int, ...], n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(4, *shape, generator=gen), torch.randint(0, 3, (4,), generator=gen)) for _ in range(n)]


class Trainer:
    """A training loop that treats plain and fused optimizers alike, as a user would."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, clip: bool) -> None:
        self.model, self.optimizer, self.clip = model, optimizer, clip
        self.scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)

    def train_step(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.optimizer.zero_grad()
        fused = isinstance(self.optimizer, FusedOptimizer)
        for i, (x, y) in enumerate(micro):
            final = i == len(micro) - 1
            loss = nn.functional.cross_entropy(self.model(x), y)
            if fused and final and self.clip:
                self.optimizer.clipped_backward(loss, CLIP)  # type: ignore[attr-defined]
                continue
            with self.optimizer.accumulate() if fused and not final else _nothing():  # type: ignore[attr-defined]
                loss.backward()
        if self.clip and not fused:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.optimizer.step()
        self.scheduler.step()

    def hand_over(self, make_optimizer: Callable[[], torch.optim.Optimizer]) -> None:
        """Continue with a new optimizer loaded from this one's state_dict (a checkpoint resume)."""
        saved, sched = self.optimizer.state_dict(), self.scheduler.state_dict()
        if isinstance(self.optimizer, FusedOptimizer):
            self.optimizer.remove_hooks()
        self.optimizer = make_optimizer()
        self.optimizer.load_state_dict(saved)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=0.7)
        self.scheduler.load_state_dict(sched)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def assert_same(a: Trainer, b: Trainer) -> None:
    """Bitwise-equal parameters, and optimizer states equal entry by entry."""
    for opt in (a.optimizer, b.optimizer):
        if isinstance(opt, FusedOptimizer):
            opt.flush()
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), f"parameter {name} differs by {(p - q).abs().max().item():.3g}"
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for index, entry in sa["state"].items():
        assert entry.keys() == sb["state"][index].keys()
        for key, value in entry.items():
            other = sb["state"][index][key]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), f"state[{index}][{key!r}] differs"
            else:
                assert value == other


def scenario(model_name: str, opt_name: str, kernel: str, mode: str, clip: bool) -> None:
    make_model, shape = MODELS[model_name]
    cls, kwargs = OPTIMIZERS[opt_name]
    kwargs = {**kwargs, **KERNELS[kernel]}
    torch.manual_seed(0)
    base = make_model()
    data = batches(shape, STEPS * ACCUMULATE)

    def plain(model: nn.Module) -> Callable[[], torch.optim.Optimizer]:
        return lambda: cls(model.parameters(), **kwargs)

    def fused(model: nn.Module) -> Callable[[], torch.optim.Optimizer]:
        return lambda: fuse_optimizer(model, cls, **{"min_bucket_numel": 0, **FUSE_MODES[mode]}, **kwargs)

    trainers = {}
    for name, first, second in (("reference", plain, plain), ("fused-then-plain", fused, plain), ("plain-then-fused", plain, fused)):
        model = copy.deepcopy(base)
        trainer = Trainer(model, first(model)(), clip)
        for step in range(STEPS):
            if step == SWITCH_AT:
                trainer.hand_over(second(model))
            trainer.train_step(data[step * ACCUMULATE:(step + 1) * ACCUMULATE])
        trainers[name] = trainer
    assert_same(trainers["reference"], trainers["fused-then-plain"])
    assert_same(trainers["reference"], trainers["plain-then-fused"])


@pytest.mark.parametrize("clip", [False, True], ids=["", "clip"])
@pytest.mark.parametrize("mode", list(FUSE_MODES))
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_fused_matches_unfused_bitwise(model_name: str, opt_name: str, kernel: str, mode: str, clip: bool) -> None:
    scenario(model_name, opt_name, kernel, mode, clip)


def step_once(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def test_updates_really_move_into_backward_and_forward() -> None:
    """Backward mode updates during backward; forward mode only once the next forward starts."""
    torch.manual_seed(0)
    x, y = batches((6,), 1)[0]
    model = mlp()
    opt = fuse_optimizer(model, torch.optim.SGD, "backward", min_bucket_numel=0, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters())), "not updated in backward"
    opt.step()

    model = mlp()
    opt = fuse_optimizer(model, torch.optim.SGD, "forward", lr=0.1, min_bucket_numel=0)
    before = [p.detach().clone() for p in model.parameters()]
    step_once(model, opt, x, y)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())), "forward mode updated before the next forward"
    first = model[0].weight.detach().clone()
    model[0](x)  # only the first layer runs: only its bucket is applied
    assert not torch.equal(first, model[0].weight)
    assert torch.equal(before[-1], model[-1].bias) and len(opt._forward.pending) == 2
    opt.flush()
    assert not opt._forward.pending and not torch.equal(before[-1], model[-1].bias)


class Tied(nn.Module):
    """Shared weight (tied between two layers), a frozen layer and an unused branch."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 6)
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)
        self.out = nn.Linear(6, 6)
        self.out.weight = self.inp.weight
        self.unused = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.frozen(torch.relu(self.inp(x)))))


@pytest.mark.parametrize("min_bucket_numel", [0, 1 << 18])
@pytest.mark.parametrize("mode", list(FUSE_MODES))
def test_mixed_groups_shared_frozen_and_unused_parameters(mode: str, min_bucket_numel: int) -> None:
    torch.manual_seed(0)
    base = Tied()
    data = batches((6,), 4)

    def groups(model: Tied) -> list[dict[str, Any]]:
        weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
        biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
        return [{"params": weights, "weight_decay": 0.1}, {"params": biases, "lr": 0.05, "betas": (0.8, 0.9)}]

    ref_model, fused_model = copy.deepcopy(base), copy.deepcopy(base)
    ref = torch.optim.AdamW(groups(ref_model), lr=0.01, foreach=True)
    fused = fuse_optimizer(
        groups(fused_model), torch.optim.AdamW, module=fused_model, min_bucket_numel=min_bucket_numel, lr=0.01, foreach=True,
        **FUSE_MODES[mode],
    )
    for x, y in data:
        step_once(ref_model, ref, x, y)
        step_once(fused_model, fused, x, y)
    fused.flush()
    assert fused_model.out.weight is fused_model.inp.weight
    for (name, p), q in zip(ref_model.named_parameters(), fused_model.parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(fused_model.frozen.weight, base.frozen.weight)
    assert fused.state_dict()["param_groups"] == ref.state_dict()["param_groups"]


def test_backward_mode_refuses_what_it_cannot_do_exactly() -> None:
    model = mlp()
    x, y = batches((6,), 1)[0]
    opt = fuse_optimizer(model, torch.optim.Adam, "backward", min_bucket_numel=0, lr=0.01)
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(PlacewiseError, match="clipping"):
        opt.clip_grad_norm_(1.0)
    with pytest.raises(PlacewiseError, match="second gradient"):
        nn.functional.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((torch.optim.SGD, "sideways"), {"lr": 0.1}, "mode"),
        ((torch.optim.LBFGS, "backward"), {}, "jointly"),
        ((dict, "backward"), {}, "not a torch.optim.Optimizer"),
        ((torch.optim.SGD, "backward"), {"lr": -1.0}, "rejected its arguments"),
        ((torch.optim.SGD, "forward"), {"lr": 0.1, "overlap": True}, "overlap"),
        ((torch.optim.SGD, "backward"), {"lr": 0.1, "overlap": 1}, "overlap"),
        ((torch.optim.SGD, "forward"), {"lr": 0.1, "release_grads": True}, "release_grads"),
        ((torch.optim.SGD, "backward"), {"lr": 0.1, "release_grads": "yes"}, "release_grads"),
        ((torch.optim.SGD, "backward"), {"lr": 0.1, "min_bucket_numel": "big"}, "min_bucket_numel"),
    ],
)
def test_bad_input_is_a_placewise_error(args: tuple[Any, str], kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(PlacewiseError, match=match):
        fuse_optimizer(mlp(), *args, **kwargs)


def test_forward_mode_needs_the_module_for_param_groups() -> None:
    with pytest.raises(PlacewiseError, match="module=model"):
        fuse_optimizer(mlp().parameters(), torch.optim.SGD, "forward", lr=0.1)


def test_discarded_fused_optimizer_stops_updating() -> None:
    model = mlp()
    x, y = batches((6,), 1)[0]
    fuse_optimizer(model, torch.optim.SGD, "backward", min_bucket_numel=0, lr=0.1)  # dropped at once
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """Tiny models: one intra-op thread is faster, and immune to a loaded machine's oversubscription."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class FastPath(nn.Module):
    """Like torch's inference fast paths: without grad, the parent reads its children's weights."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.second = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.second(torch.relu(self.first(x)))
        hidden = torch.relu(nn.functional.linear(x, self.first.weight, self.first.bias))
        return nn.functional.linear(hidden, self.second.weight, self.second.bias)


def test_forward_mode_evaluation_sees_every_update() -> None:
    """A forward under no_grad applies every pending update first, whoever reads the weights."""
    torch.manual_seed(0)
    data = batches((6,), 2)
    ref_model = FastPath()
    fused_model = copy.deepcopy(ref_model)
    ref = torch.optim.Adam(ref_model.parameters(), lr=0.01)
    fused = fuse_optimizer(fused_model, torch.optim.Adam, "forward", lr=0.01, min_bucket_numel=0)
    for model, opt in ((ref_model, ref), (fused_model, fused)):
        step_once(model, opt, *data[0])
    with torch.no_grad():
        assert torch.equal(ref_model(data[1][0]), fused_model(data[1][0]))
    assert not fused._forward.pending


# ---- backward fusion with overlap: the worker thread -------------------------------------------

def overlap_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "placewise-fuse-overlap"]


def test_overlap_updates_run_beside_the_rest_of_backward() -> None:
    """The last layer's update waits on the worker until backward reaches the first layer: inline it would hang."""
    torch.manual_seed(0)
    model = mlp()
    opt = fuse_optimizer(model, torch.optim.SGD, "backward", overlap=True, min_bucket_numel=0, lr=0.1)
    reached_first_layer = threading.Event()
    waited: list[tuple[bool, int]] = []
    update = opt._update

    def update_last_layer_late(bucket: Any, hyper: dict[str, Any]) -> None:
        if any(p is model[4].weight for p in bucket.params):
            waited.append((reached_first_layer.wait(timeout=10), threading.get_ident()))
        update(bucket, hyper)

    opt._update = update_last_layer_late  # type: ignore[method-assign]
    x, y = batches((6,), 1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    hidden = model[0](x)
    hidden.register_hook(lambda grad: reached_first_layer.set())  # runs after layers 4 and 2's backward
    nn.functional.cross_entropy(model[1:](hidden), y).backward()
    assert waited == [(True, waited[0][1])] and waited[0][1] != threading.get_ident()
    # backward returned with every update applied
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert opt._worker is not None and opt._worker.in_flight == 0
    opt.step()
    opt.close()


def test_overlap_worker_error_surfaces_in_backward_and_threads_end() -> None:
    torch.manual_seed(0)
    x, y = batches((6,), 1)[0]
    model = mlp()
    opt = fuse_optimizer(model, torch.optim.SGD, "backward", overlap=True, min_bucket_numel=0, lr=0.1)

    def broken(bucket: Any, hyper: dict[str, Any]) -> None:
        raise ValueError("worker update failed")

    opt._update = broken  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="worker update failed"):
        nn.functional.cross_entropy(model(x), y).backward()
    assert len(overlap_threads()) == 1
    del opt._update  # the real update again
    opt.step()  # closes the broken step; the next one is fine
    before = [p.detach().clone() for p in model.parameters()]
    step_once(model, opt, x, y)
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    opt.close()
    assert overlap_threads() == []
    opt.close()  # idempotent

    before = [p.detach().clone() for p in model.parameters()]
    opt = fuse_optimizer(model, torch.optim.SGD, "backward", overlap=True, min_bucket_numel=0, lr=0.1)
    step_once(model, opt, x, y)
    assert len(overlap_threads()) == 1
    del opt  # dropped: hooks and thread go with it
    gc.collect()
    assert overlap_threads() == []
    after = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(torch.equal(a, p) for a, p in zip(after, model.parameters())) and not all(
        torch.equal(a, p) for a, p in zip(before, after)
    )


def test_overlap_forward_waits_for_a_backward_that_failed_half_way() -> None:
    """An error elsewhere in backward skips its final wait; the model's next forward waits instead."""
    torch.manual_seed(0)
    x, y = batches((6,), 1)[0]
    model = mlp()
    opt = fuse_optimizer(model, torch.optim.SGD, "backward", overlap=True, min_bucket_numel=0, lr=0.1)
    update = opt._update

    def slow(bucket: Any, hyper: dict[str, Any]) -> None:
        time.sleep(0.05)
        update(bucket, hyper)

    opt._update = slow  # type: ignore[method-assign]

    def fail(param: torch.Tensor) -> None:
        raise KeyError("user hook")

    model[0].weight.register_post_accumulate_grad_hook(fail)  # runs after the fusion's hook
    with pytest.raises(KeyError):
        nn.functional.cross_entropy(model(x), y).backward()
    in_flight: list[int] = []
    model[0].register_forward_pre_hook(lambda mod, args: in_flight.append(opt._worker.in_flight))  # type: ignore[union-attr]
    model(x)
    assert in_flight == [0]
    opt.close()


def test_overlap_backward_queues_one_wait_however_many_buckets() -> None:
    """Each backward waits for its updates once, at its end (queued by its first bucket), not once per bucket."""
    torch.manual_seed(0)
    model = mlp()
    opt = fuse_optimizer(model, torch.optim.SGD, "backward", overlap=True, min_bucket_numel=0, lr=0.1)
    assert len(opt._buckets) > 1
    waits: list[int] = []
    wait = opt._wait

    def counted(*args: Any) -> None:
        waits.append(opt._worker.in_flight)  # type: ignore[union-attr]
        wait(*args)

    opt._wait = counted  # type: ignore[method-assign]
    for x, y in batches((6,), 3):
        loss = nn.functional.cross_entropy(model(x), y)
        waits.clear()
        loss.backward()
        assert len(waits) == 1 and opt._worker.in_flight == 0  # type: ignore[union-attr]
        opt.step()
        opt.zero_grad()
    opt.close()


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("overlap", [False, True])
def test_backward_mode_refuses_create_graph_outside_accumulate(overlap: bool) -> None:
    """Higher-order gradients go through accumulate() and then match the unfused optimizer bitwise."""
    torch.manual_seed(0)
    x, y = batches((6,), 1)[0]
    ref_model = mlp()
    model = copy.deepcopy(ref_model)
    opt = fuse_optimizer(model, torch.optim.Adam, "backward", overlap=overlap, min_bucket_numel=0, lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(PlacewiseError, match="create_graph"):
        nn.functional.cross_entropy(model(x), y).backward(create_graph=True)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())), "updated before refusing"

    def penalised_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad()
        fused = isinstance(optimizer, FusedOptimizer)
        with optimizer.accumulate() if fused else _nothing():  # type: ignore[attr-defined]
            nn.functional.cross_entropy(model(x), y).backward(create_graph=True)
        penalty = sum((p.grad ** 2).sum() for p in model.parameters())  # type: ignore[operator]
        penalty.backward()  # the final gradients: fused updates happen here
        optimizer.step()
        optimizer.zero_grad()  # breaks the parameter <-> gradient-graph cycle

    ref = torch.optim.Adam(ref_model.parameters(), lr=0.01)
    for _ in range(2):
        penalised_step(ref_model, ref)
        penalised_step(model, opt)
    for p, q in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(p, q)
    opt.close()


@pytest.mark.parametrize("overlap", [False, True])
def test_retained_graph_runs_again_only_inside_accumulate(overlap: bool) -> None:
    torch.manual_seed(0)
    x, y = batches((6,), 1)[0]
    ref_model = mlp()
    model = copy.deepcopy(ref_model)
    opt = fuse_optimizer(model, torch.optim.AdamW, "backward", overlap=overlap, min_bucket_numel=0, lr=0.01)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=0.01)
    for m, o in ((ref_model, ref), (model, opt)):
        loss = nn.functional.cross_entropy(m(x), y)
        with o.accumulate() if o is opt else _nothing():  # type: ignore[attr-defined]
            loss.backward(retain_graph=True)
        loss.backward()
        o.step()
    for p, q in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(p, q)
    # A final backward that retains its graph updated the parameters that graph saved: running it
    # again before step() is refused (torch's in-place check, or the second-gradient check).
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward(retain_graph=True)
    with pytest.raises((RuntimeError, PlacewiseError), match="inplace|second gradient"):
        loss.backward()
    opt.close()


class Checkpointed(nn.Module):
    """Segments recomputed during backward: the recomputation reads parameters not yet updated."""

    def __init__(self, use_reentrant: bool) -> None:
        super().__init__()
        self.use_reentrant = use_reentrant
        self.first = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
        self.second = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        if not self.use_reentrant:  # reentrant checkpointing needs an input that requires grad
            x = checkpoint(self.first, x, use_reentrant=False)
        else:
            x = self.first(x)
        return self.head(checkpoint(self.second, x, use_reentrant=self.use_reentrant))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_overlap_with_activation_checkpointing_matches_unfused(use_reentrant: bool) -> None:
    torch.manual_seed(0)
    ref_model = Checkpointed(use_reentrant)
    model = copy.deepcopy(ref_model)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=0.01)
    opt = fuse_optimizer(model, torch.optim.AdamW, "backward", overlap=True, min_bucket_numel=0, lr=0.01)
    for x, y in batches((6,), 3):
        step_once(ref_model, ref, x, y)
        step_once(model, opt, x, y)
    for p, q in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(p, q)
    opt.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_overlap_on_cuda_matches_unfused(kernel: str) -> None:
    torch.manual_seed(0)
    ref_model = TinyTransformer().cuda()
    model = copy.deepcopy(ref_model)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=0.01, **KERNELS[kernel])
    opt = fuse_optimizer(model, torch.optim.AdamW, "backward", overlap=True, min_bucket_numel=0, lr=0.01, **KERNELS[kernel])
    for x, y in batches((5, 6), 4):
        step_once(ref_model, ref, x.cuda(), y.cuda())
        step_once(model, opt, x.cuda(), y.cuda())
    for p, q in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(p, q)
    opt.close()


# ---- releasing gradients, clipping in backward mode, bucket sizing --------------------------------

def live_grads_at_each_hook(model: nn.Module, run: Callable[[], None]) -> list[int]:
    """How many parameters hold a gradient each time one of them becomes final (after fusion's own hook)."""
    counts: list[int] = []
    handles = [
        p.register_post_accumulate_grad_hook(lambda _: counts.append(sum(q.grad is not None for q in model.parameters())))
        for p in model.parameters()
    ]
    run()
    for handle in handles:
        handle.remove()
    return counts


@pytest.mark.parametrize("overlap", [False, True])
def test_release_grads_frees_each_bucket_after_its_update(overlap: bool) -> None:
    """Backward holds the gradients of the layer in flight only; without release, all of them by the end."""
    torch.manual_seed(0)
    x, y = batches((6,), 1)[0]
    model = mlp()
    n = len(list(model.parameters()))
    for release in (False, True):
        opt = fuse_optimizer(model, torch.optim.AdamW, "backward", overlap=overlap, release_grads=release, min_bucket_numel=0, lr=0.01)
        opt.zero_grad()
        counts = live_grads_at_each_hook(model, lambda: nn.functional.cross_entropy(model(x), y).backward())
        if not release:
            assert counts[-1] == n
        elif not overlap:  # each layer's weight and bias: the bucket's update runs inside the last hook
            assert max(counts) <= 2 and all(p.grad is None for p in model.parameters())
        else:  # the worker frees them beside backward; all are gone once backward returns
            assert all(p.grad is None for p in model.parameters())
        opt.step()
        opt.close()


class SlowSGD(torch.optim.SGD):
    """SGD whose every step takes 20 ms longer: an overlap worker far behind backward."""

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        time.sleep(0.02)
        return super().step(closure)


def test_overlap_release_bounds_the_gradients_a_slow_worker_holds() -> None:
    """With release, backward waits for a lagging worker: at most the running and one queued bucket, plus the one filling."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(8, 8) for _ in range(10)))
    x = torch.randn(4, 8)
    for release in (True, False):
        opt = fuse_optimizer(model, SlowSGD, "backward", overlap=True, release_grads=release, min_bucket_numel=0, lr=0.1)
        opt.zero_grad()
        counts = live_grads_at_each_hook(model, lambda: model(x).sum().backward())
        if release:
            assert max(counts) <= 3 * 2  # three layers' weight and bias
        else:
            assert max(counts) == 20  # every gradient is kept anyway
        opt.step()
        opt.close()


def test_release_grads_keeps_accumulated_gradients_until_the_final_update() -> None:
    torch.manual_seed(0)
    (x, y), (x2, y2) = batches((6,), 2)
    model = mlp()
    opt = fuse_optimizer(model, torch.optim.SGD, "backward", release_grads=True, min_bucket_numel=0, lr=0.1)
    with opt.accumulate():
        nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())
    nn.functional.cross_entropy(model(x2), y2).backward()
    assert all(p.grad is None for p in model.parameters())
    opt.step()


@pytest.mark.parametrize("overlap", [False, True])
def test_clipped_backward_refuses_a_nonfinite_norm_before_updating(overlap: bool) -> None:
    """The norm is known before any update, so a non-finite one can skip the step (unlike torchtune's)."""
    torch.manual_seed(0)
    x, y = batches((6,), 1)[0]
    model = mlp()
    opt = fuse_optimizer(model, torch.optim.Adam, "backward", overlap=overlap, release_grads=True, min_bucket_numel=0, lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    loss = nn.functional.cross_entropy(model(x), y) * float("inf")
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.clipped_backward(loss, 1.0, error_if_nonfinite=True)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    opt.zero_grad()
    opt.step()
    step_once(model, opt, x, y)  # the next step is an ordinary one
    assert not any(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    opt.close()


def test_clipped_backward_norm_pass_holds_one_gradient_at_a_time() -> None:
    torch.manual_seed(0)
    x, y = batches((6,), 1)[0]
    model = mlp()
    opt = fuse_optimizer(model, torch.optim.SGD, "backward", release_grads=True, min_bucket_numel=0, lr=0.1)
    counts = live_grads_at_each_hook(model, lambda: opt.clipped_backward(nn.functional.cross_entropy(model(x), y), 0.01))
    n = len(list(model.parameters()))
    assert len(counts) == 2 * n and max(counts) <= 2  # two passes; never more than a layer's gradients


@pytest.mark.parametrize("opt_name", ["sgd-momentum", "adamw"])
@pytest.mark.parametrize("mode", ["backward+release", "backward+overlap+release"])
def test_unfused_fallback_matches_unfused_bitwise(monkeypatch: pytest.MonkeyPatch, opt_name: str, mode: str) -> None:
    """Where sizing finds fusion too costly, the optimizer runs torch's own step, with release and clipping."""
    import placewise.fuse.api

    monkeypatch.setattr(placewise.fuse.api, "choose_buckets", lambda inner: BucketChoice(None, "forced by the test"))
    monkeypatch.setitem(FUSE_MODES, mode, {**FUSE_MODES[mode], "min_bucket_numel": "auto"})
    scenario("cnn", opt_name, "fused", mode, clip=True)
    model = mlp()
    opt = fuse_optimizer(model, torch.optim.SGD, **FUSE_MODES[mode], lr=0.1)
    assert opt.unfused and "unfused" in opt.bucketing() and not opt._handles
    step_once(model, opt, *batches((6,), 1)[0])
    assert all(p.grad is None for p in model.parameters())


def test_bucket_choice_fits_the_fixed_costs_in_one_percent_of_the_step() -> None:
    from placewise.fuse.sizing import HOOK_SECONDS, CallCost

    cost = CallCost(per_call=100e-6, numel=100_000, tensors=10)
    # 1% of a 1 s step is 10 ms; the hooks take 10 x 5 us, leaving room for 99 calls of 100 us.
    assert HOOK_SECONDS == 5e-6 and cost.choose(1.0).min_bucket_numel == 1011
    assert cost.choose(0.02).min_bucket_numel is None  # 200 us: the hooks and one call only


@pytest.mark.parametrize(
    ("release", "fused_seconds", "unfused_seconds", "buckets"),
    [
        (True, 1.0, None, 3),  # a slow step affords one bucket per layer
        (True, 1e-3, None, 0),  # a fast one cannot carry two calls and the hooks: unfused
        (False, 1.0, 0.9, 0),  # fusion measured slower than the unfused step: unfused
        (False, 1.0, 1.0, 3),  # as fast: kept, one bucket per layer
    ],
)
def test_auto_sizing_decides_from_timed_steps_and_stays_exact(
    monkeypatch: pytest.MonkeyPatch, release: bool, fused_seconds: float, unfused_seconds: float | None, buckets: int
) -> None:
    """The numbers never change, whatever the bucketing and whenever it changes."""
    import placewise.fuse.sizing as sizing

    monkeypatch.setattr(sizing, "_time_step", lambda inner, numel, like: 100e-6)
    torch.manual_seed(0)
    ref_model = mlp()
    model = copy.deepcopy(ref_model)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=0.01)
    opt = fuse_optimizer(model, torch.optim.AdamW, "backward", release_grads=release, lr=0.01)
    now = [0.0]

    def clock() -> float:  # read at the end of a step: that step ran with the layout still in place
        now[0] += unfused_seconds if opt.unfused and unfused_seconds is not None else fused_seconds
        return now[0]

    monkeypatch.setattr(sizing.time, "process_time", clock)  # a CPU model: the process's CPU time
    assert "provisional" in opt.bucketing() and len(opt._buckets) == 1
    layouts = []
    for x, y in batches((6,), 2 * sizing.TIMED_STEPS + 3):
        step_once(ref_model, ref, x, y)
        step_once(model, opt, x, y)
        layouts.append(opt.unfused)
    assert opt._timer is None and opt.unfused == (buckets == 0) and bool(opt._handles) == (buckets > 0), opt.bucketing()
    assert buckets == 0 or len(opt._buckets) == buckets
    assert (True in layouts) == (not release or buckets == 0)  # the unfused trial ran without release only
    for p, q in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(p, q)


class NeedsArgument(torch.optim.SGD):
    """An optimizer class that cannot be built from a parameter list alone."""

    def __init__(self, params: Any, scale: float, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)


def test_auto_sizing_keeps_default_buckets_when_it_cannot_time_the_class() -> None:
    opt = fuse_optimizer(mlp(), NeedsArgument, "backward", scale=2.0, lr=0.1)
    assert not opt.unfused and "could not be timed" in opt.bucketing() and opt._timer is None


@pytest.mark.parametrize("mode", ["forward", "backward"])
def test_closed_optimizer_trains_like_the_unfused_one(mode: str) -> None:
    """After close() no hook is left, so step() updates what has gradients, as torch's optimizer does
    (forward mode used to keep scheduling updates that no forward hook would apply)."""
    torch.manual_seed(0)
    ref_model = mlp()
    model = copy.deepcopy(ref_model)
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    opt = fuse_optimizer(model, torch.optim.SGD, mode, min_bucket_numel=0, lr=0.1, momentum=0.9)
    for i, (x, y) in enumerate(batches((6,), 4)):
        if i == 1:
            opt.close()
        for m, o in ((ref_model, ref), (model, opt)):
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
            o.zero_grad()
    for p, q in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(p, q)


def test_state_dict_hooks_registered_on_the_fused_optimizer_run() -> None:
    opt = fuse_optimizer(mlp(), torch.optim.Adam, "backward", min_bucket_numel=0, lr=0.01)
    seen: list[str] = []
    opt.register_state_dict_post_hook(lambda o, sd: seen.append("saved"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("loading"))
    opt.load_state_dict(opt.state_dict())
    assert seen == ["saved", "loading"]
    opt.close()
