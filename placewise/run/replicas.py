"""Replicated pipeline stages: a plan's stage with `replicas` r > 1 runs on r processes.

Design. torch's schedules (GPipe, 1F1B) drive one `PipelineStage` per stage, talking to fixed
neighbours, so only the stage's *lead* (its first rank) takes part in them. The lead's stage module is
a `ReplicatedModule`: each forward scatters the microbatch's samples (dim 0 of every value the stage
receives) over the r replicas, every replica runs the stage's submodule on its share at the same
time, and the lead gathers the shares' outputs into the whole microbatch's, which torch sends on. The
backward mirrors it: the output gradient is scattered, every replica back-propagates its share, the
input gradients are gathered. The other replicas (*followers*) are told what to do by a small command
the lead broadcasts in the stage's own process group before each forward and backward, so they follow
any schedule's order without knowing it.

Splitting samples, not dealing whole microbatches round-robin, is what fits torch's schedules: a
schedule hands the lead every microbatch in its own order and expects the result back before it
sends on, so a replica running a whole microbatch would leave the lead waiting idle; a share of each
microbatch keeps all replicas busy on every schedule action.

Loss scaling: the loss is computed on the gathered output, as without replicas (each microbatch's loss
divided by M), so each replica's parameter gradient is its share's part of the batch-mean loss: the
replicas' gradients are *summed* (not averaged) by one all-reduce in the stage's group at the end of
the step, before the optimizer steps, and every replica then holds the one-process gradient.

Limits (checked when the job is prepared, one line each): every value the stage receives and sends
must be a tensor with the microbatch's samples along dim 0 (not a shape or a constant), the
microbatch size a multiple of r, and the stage free of batch normalisation (its statistics over a
share would differ from the microbatch's). Optimizer fusion is refused: it updates inside the
backward, before the replicas' gradients are summed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from placewise.errors import PlacewiseError

# What the lead tells its followers to do next.
FORWARD, BACKWARD, END = 0, 1, 2


def stage_ranks(replicas: Sequence[int]) -> list[list[int]]:
    """The global ranks of each stage: consecutive, the first of each its lead."""
    ranks, start = [], 0
    for r in replicas:
        ranks.append(list(range(start, start + r)))
        start += r
    return ranks


def stage_groups(replicas: Sequence[int], world_size: int) -> tuple[Any, list[Any]]:
    """The process group of the stages' leads (None: every rank) and each replicated stage's own group
    (None for a stage of one). new_group is collective: every rank creates every group, in the same order."""
    ranks = stage_ranks(replicas)
    leads = [members[0] for members in ranks]
    pipeline = None if len(leads) == world_size else dist.new_group(leads)
    return pipeline, [dist.new_group(members) if len(members) > 1 else None for members in ranks]


def check_replicas(replicas: Sequence[int], n_stages: int, batch_size: int, microbatches: int, fuse: str,
                   source: str, *, flags: bool = True) -> None:
    """Replica counts that fit the job, or a PlacewiseError naming `source` (the plan) and the fix, with the
    batch and microbatches named as the caller took them: command-line flags (`flags`), or the arguments
    of `placewise.parallelize`."""
    if len(replicas) != n_stages:
        raise PlacewiseError(f"{source}: {len(replicas)} replica counts for {n_stages} stages; give one per stage")
    for s, r in enumerate(replicas):
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise PlacewiseError(f"{source}: stage {s} has replicas {r!r}; use a whole number of at least 1")
    replicated = [(s, r) for s, r in enumerate(replicas) if r > 1]
    if not replicated:
        return
    s, r = replicated[0]
    if fuse != "none":
        raise PlacewiseError(f"--fuse {fuse} with {source}, whose stage {s} has {r} replicas: a fused update would "
                             "apply before the replicas' gradients are summed; use --fuse none")
    size = batch_size // microbatches
    split = (f"--batch-size {batch_size} / --microbatches {microbatches}" if flags else
             f"the batch of {batch_size} in microbatches={microbatches}")
    for s, r in replicated:
        if size % r:
            raise PlacewiseError(f"{split} gives microbatches of {size} samples, which stage {s}'s {r} replicas "
                                 f"({source}) cannot share equally; make the microbatch size a multiple of {r}")


def check_shardable(stage_index: int, replicas: int, module: nn.Module, names: Sequence[str],
                    values: Sequence[Any], microbatch: int) -> None:
    """The stage's received and sent values split by sample (tensors, samples along dim 0), and nothing
    in it mixes samples: otherwise a PlacewiseError saying where to cut instead."""
    for name, value in zip(names, values):
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != microbatch:
            what = type(value).__name__ if not isinstance(value, torch.Tensor) else f"shape {list(value.shape)}"
            raise PlacewiseError(f"stage {stage_index} has {replicas} replicas, which share each microbatch's "
                                 f"{microbatch} samples, but its value {name} ({what}) is not split by sample; move "
                                 f"the cut so it stays inside one stage, or give the stage 1 replica")
    norms = [n for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if norms:
        raise PlacewiseError(f"stage {stage_index} has {replicas} replicas and batch normalisation ({norms[0]}), whose "
                             "statistics over a replica's share of a microbatch differ from the whole microbatch's; "
                             "give that stage 1 replica")


@dataclass
class StageGroup:
    """A replicated stage's process group and its global ranks (the first is the lead)."""
    group: Any
    ranks: list[int]


@dataclass
class _Record:
    """One microbatch share's forward, kept until its backward."""
    inputs: list[torch.Tensor]
    outputs: tuple[torch.Tensor, ...]


class Replicas:
    """This process's part in a replicated stage: the stage's submodule, its group (group rank 0 is the
    lead) and the shares of the microbatches whose backward is still to come."""

    def __init__(self, module: nn.Module, group: Any, ranks: Sequence[int], device: torch.device,
                 n_inputs: int) -> None:
        self.module, self.group, self.size, self.lead = module, group, len(ranks), ranks[0]
        self.device, self.n_inputs = device, n_inputs
        self.records: dict[int, _Record] = {}
        self.single = False  # the submodule returns one tensor, not a tuple

    # -- collectives: the lead gives whole tensors and gets whole tensors; followers give and get shares --
    def command(self, op: int = END, key: int = 0, grad: bool = False, needs: Sequence[bool] = ()) -> list[int]:
        """The lead's next command (op, key, grad, needs per input), broadcast to the followers, whose
        own arguments are ignored. One length for every command: a broadcast needs it on every rank."""
        needs = [int(n) for n in needs] + [0] * (self.n_inputs - len(needs))
        cmd = torch.tensor([op, key, int(grad), *needs], dtype=torch.int64, device=self.device)
        dist.broadcast(cmd, src=self.lead, group=self.group)
        return cmd.tolist()

    def scatter(self, whole: torch.Tensor | None, like: torch.Tensor | None = None) -> torch.Tensor:
        """The lead splits `whole` by sample and keeps share 0; a follower receives a share shaped as `like`."""
        if whole is not None:
            parts = [p.contiguous() for p in _wire(whole).chunk(self.size)]
            share = torch.empty_like(parts[0])
            dist.scatter(share, parts, src=self.lead, group=self.group)
            return share.view(whole.dtype) if whole.dtype == torch.bool else share
        share = torch.empty_like(_wire(like))
        dist.scatter(share, None, src=self.lead, group=self.group)
        return share.view(like.dtype) if like.dtype == torch.bool else share

    def gather(self, share: torch.Tensor) -> torch.Tensor | None:
        """Every replica's share, joined by sample on the lead (None on followers)."""
        wire = _wire(share.detach()).contiguous()
        parts = [torch.empty_like(wire) for _ in range(self.size)] if dist.get_rank() == self.lead else None
        dist.gather(wire, parts, dst=self.lead, group=self.group)
        if parts is None:
            return None
        whole = torch.cat(parts)
        return whole.view(share.dtype) if share.dtype == torch.bool else whole

    # -- the same work on every replica ---------------------------------------------------------------
    def forward(self, key: int, shares: list[torch.Tensor], grad: bool, needs: Sequence[bool]) -> tuple[torch.Tensor, ...]:
        """Run the submodule on this replica's shares; keep what the backward of `key` needs."""
        with torch.set_grad_enabled(grad):
            inputs = [s.detach().requires_grad_(bool(n)) for s, n in zip(shares, needs)]
            out = self.module(*inputs)
        self.single = not isinstance(out, tuple)
        outputs = (out,) if self.single else out
        if grad:
            self.records[key] = _Record(inputs, outputs)
        return outputs

    def backward(self, key: int, output_grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Back-propagate microbatch `key`'s share (the outputs that carry gradients, in order): the
        parameters' gradients accumulate here; the gradients of the inputs that need them come back."""
        record = self.records.pop(key)
        carrying = [o for o in record.outputs if o.requires_grad]
        if carrying:
            torch.autograd.backward(carrying, output_grads)
        return [x.grad if x.grad is not None else torch.zeros_like(x) for x in record.inputs if x.requires_grad]

    def end_step(self) -> None:
        """The lead's end of a training step: the end command (the followers' gradients are then
        complete), then the replicas' gradients summed."""
        self.command()
        self.sum_gradients()

    def sum_gradients(self) -> None:
        """Sum the replicas' gradients (each is its share's part of the batch-mean loss), in one all-reduce."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        if not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()


def _wire(t: torch.Tensor) -> torch.Tensor:
    """How a tensor travels: gloo has no bool collectives, so masks go as bytes."""
    return t.view(torch.uint8) if t.dtype == torch.bool else t


class _Replicated(torch.autograd.Function):
    """The lead's forward and backward of a replicated stage, each one scatter, a share's work and a gather."""

    @staticmethod
    def forward(ctx, replicas: Replicas, key: int, grad: bool, needs: tuple[bool, ...], anchor: torch.Tensor,
                *inputs: torch.Tensor):
        shares = [replicas.scatter(t) for t in inputs]
        outputs = replicas.forward(key, shares, grad, needs)
        whole = tuple(replicas.gather(o) for o in outputs)
        ctx.replicas, ctx.key, ctx.needs = replicas, key, needs
        ctx.carrying = [o.requires_grad for o in outputs]
        ctx.mark_non_differentiable(*(w for w in whole if not w.is_floating_point()))
        return whole

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        replicas: Replicas = ctx.replicas
        replicas.command(BACKWARD, ctx.key, True, ctx.needs)
        shares = [replicas.scatter(g) for g, c in zip(grads, ctx.carrying) if c]
        input_grads = iter(replicas.gather(g) for g in replicas.backward(ctx.key, shares))
        return (None, None, None, None, None, *(next(input_grads) if n else None for n in ctx.needs))


class ReplicatedModule(nn.Module):
    """The lead's stage module under torch's schedule: the stage's submodule spread over its replicas."""

    def __init__(self, replicas: Replicas) -> None:
        super().__init__()
        self.inner = replicas.module
        self.replicas = replicas
        self.key = 0
        # Makes the outputs require grad even when no input does (the first stage), so torch's backward
        # reaches `_Replicated.backward` and the followers get their backward command.
        self.anchor = torch.zeros((), requires_grad=True, device=replicas.device)

    def forward(self, *inputs: torch.Tensor):
        self.key += 1
        grad = torch.is_grad_enabled()
        needs = tuple(grad and t.is_floating_point() and t.requires_grad for t in inputs)
        self.replicas.command(FORWARD, self.key, grad, needs)
        whole = _Replicated.apply(self.replicas, self.key, grad, needs, self.anchor, *inputs)
        return whole[0] if self.replicas.single else whole


def follow(replicas: Replicas, likes: Sequence[torch.Tensor]) -> None:
    """A follower's step: do what the lead says until it ends the step (`replicas.command()` on the
    lead). `likes`: a share of each value the stage receives (shape and dtype)."""
    while True:
        op, key, grad, *needs = replicas.command()
        if op == END:
            return
        if op == FORWARD:
            shares = [replicas.scatter(None, like) for like in likes]
            for out in replicas.forward(key, shares, bool(grad), needs):
                replicas.gather(out)
        else:
            outputs = replicas.records[key].outputs
            grads = [replicas.scatter(None, o) for o in outputs if o.requires_grad]
            for g in replicas.backward(key, grads):
                replicas.gather(g)
