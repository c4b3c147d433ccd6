"""Simulate one pipeline schedule over per-stage times: the step time a plan will actually run at.

The planner's max-load is the steady state (the busiest stage's work per sample). A real step also
fills and drains the pipeline and waits for sends and receives between stages. This module replays
the order in which torch's `ScheduleGPipe` and `Schedule1F1B` (torch/distributed/pipelining/
schedules.py) issue each stage's computations, sends, receives and waits, over given durations:

- a stage runs its program in order: `post` a send or receive (non-blocking), `wait` for transfers,
  `compute` a forward or backward chunk, and after the schedule the optimizer `update`;
- a transfer between neighbouring stages costs its link time; it starts when the sender posts it
  (`eager`, buffered transports) or when both ends have posted it (`rendezvous`, e.g. gloo's large
  messages and NCCL); waiting on it blocks until it has arrived;
- with `overlap` off the sending stage spends the transfer time itself (a blocking copy) before it
  goes on; with it on (the default) transfers run beside compute;
- a link's `late_answer` (a share, 0 to 1; `Cluster.late_answer`, measured by `run.links`): a
  receive posted after its send, while the sending stage computes a chunk, is answered that share of
  the rest of the chunk later (at once if the sender is waiting or done). On this project's 2-core VM
  it measured 0.02 to 1 from run to run; at 1, a receive posted halfway through the sender's chunk of
  2, 4, 8, 16 or 32 ms completed after 1.4, 2.1, 4.1, 8.2 and 16.0 ms, the rest of the chunk, though
  the receiver's core was idle (the scheduler kept the sender's transport thread waiting on the
  sender's busy core). A link measured between idle processes cannot show it; GPipe's forward
  phase, whose later stage posts each receive after the first stage has sent and moved on, pays it
  on every microbatch.

What a stage spends beyond its chunks is modelled where it is real, not an artefact of a loaded
machine, and measured rather than fitted: the optimizer's `update` once per step (timed by the
profiler, `update_ms`), preceded on a replicated stage by its gradient `allreduce` (see
`plan.predict`), and a per-microbatch `overhead` (the runtime's own work for a microbatch:
posting and completing its sends and receives, torch's schedule bookkeeping around each chunk, the
loss), measured as the CPU time per microbatch of a pipeline whose chunks compute next to nothing
(`run.links.measure_stage_overhead`); half of it is charged to each forward and backward. Waiting
for a neighbour is not an overhead: the replay produces it. Time lost to other processes on shared
cores is not modelled (a prediction is for cores the stages have to themselves).

Several steps are simulated back to back, so the figure is the period of a pipeline that runs step
after step (the last stage's time from one step's end to the next's, what `train` measures), not
the first step's makespan (also reported). Torch-free; times in any one unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from placewise.errors import PlacewiseError
from placewise.plan.schedule import GPIPE, Schedule

FORWARD, BACKWARD, ALLREDUCE, UPDATE = "forward", "backward", "allreduce", "update"
# Steps simulated back to back: the first fills an empty pipeline; the period is taken between the
# last two, by which time the stages' offsets from each other have settled.
STEPS = 3


@dataclass(frozen=True)
class StageTimes:
    """One stage's durations: per microbatch (forward, backward, and the runtime's `overhead` beyond
    them) and per step (a replicated stage's gradient all-reduce, then the optimizer update)."""
    forward: float
    backward: float = 0.0
    update: float = 0.0
    overhead: float = 0.0
    allreduce: float = 0.0

    def duration(self, kind: str, training: bool) -> float:
        """How long the stage's clock moves for one action of `kind` (forward, backward, allreduce, update)."""
        if kind == UPDATE:
            return self.update
        if kind == ALLREDUCE:
            return self.allreduce
        share = self.overhead / 2 if training else self.overhead
        return (self.forward if kind == FORWARD else self.backward) + share


@dataclass(frozen=True)
class LinkTimes:
    """Time to move one microbatch across the boundary after a stage: activations forward, gradients back."""
    forward: float = 0.0
    backward: float = 0.0
    late_answer: float = 0.0  # the share of the rest of the sender's chunk a late receive waits


@dataclass(frozen=True)
class SimulateOptions:
    training: bool = True  # False: forward only (torch's `schedule.eval`), whatever the schedule
    rendezvous: bool = False  # a transfer starts only once the receiver has posted its receive
    overlap: bool = True  # transfers run beside compute; False: the sender spends the transfer time
    steps: int = STEPS


@dataclass(frozen=True)
class Event:
    """A computation (stage, kind, microbatch) or a transfer (stage = sender, kind send-forward or
    send-backward) of one step, with its start and end."""
    stage: int
    kind: str
    microbatch: int
    step: int
    start: float
    end: float


@dataclass(frozen=True)
class Simulation:
    step_time: float  # steady-state period: the last stage's time from one step's end to the next's
    first_step: float  # makespan of the first step from an empty pipeline
    busy: tuple[float, ...]  # per stage: compute time per step (the max-load figure's kind of number)
    events: tuple[Event, ...]  # every computation and transfer of every simulated step

    @property
    def bubble(self) -> float:
        """Fraction of the step the busiest stage idles (fill, drain and waits)."""
        return 1.0 - max(self.busy) / self.step_time if self.step_time > 0 else 0.0

    def step_events(self, step: int) -> list[Event]:
        return [e for e in self.events if e.step == step]


# A transfer is named by (direction, boundary, microbatch, step); boundary i joins stages i and i+1.
Key = tuple[str, int, int, int]


@dataclass
class _Action:
    op: str  # post-send | post-recv | wait | compute
    keys: tuple[Key, ...] = ()
    kind: str = ""
    microbatch: int = -1


@dataclass
class _Program:
    """One stage's actions as torch's schedule issues them."""
    stage: int
    stages: int
    step: int
    actions: list[_Action] = field(default_factory=list)

    def _fwd_in(self, k: int) -> list[Key]:
        return [(FORWARD, self.stage - 1, k, self.step)] if self.stage > 0 else []

    def _fwd_out(self, k: int) -> list[Key]:
        return [(FORWARD, self.stage, k, self.step)] if self.stage < self.stages - 1 else []

    def _bwd_in(self, k: int) -> list[Key]:
        return [(BACKWARD, self.stage, k, self.step)] if self.stage < self.stages - 1 else []

    def _bwd_out(self, k: int) -> list[Key]:
        return [(BACKWARD, self.stage - 1, k, self.step)] if self.stage > 0 else []

    def post(self, sends: list[Key], recvs: list[Key]) -> list[Key]:
        if sends:
            self.actions.append(_Action("post-send", tuple(sends)))
        if recvs:
            self.actions.append(_Action("post-recv", tuple(recvs)))
        return sends + recvs

    def wait(self, keys: list[Key]) -> None:
        if keys:
            self.actions.append(_Action("wait", tuple(keys)))

    def compute(self, kind: str, k: int = -1) -> None:
        self.actions.append(_Action("compute", kind=kind, microbatch=k))

    def gpipe(self, m: int, training: bool) -> None:
        """ScheduleGPipe: every forward (sends waited at the end), then every backward."""
        for phase, ins, outs in ((FORWARD, self._fwd_in, self._fwd_out), (BACKWARD, self._bwd_in, self._bwd_out)):
            if phase == BACKWARD and not training:
                break
            sent: list[Key] = []
            for k in range(m):
                self.wait(self.post([], ins(k)))
                self.compute(phase, k)
                sent += self.post(outs(k), [])
            self.wait(sent)

    def one_f_one_b(self, m: int) -> None:
        """Schedule1F1B._step_microbatches, action for action (warm-up forwards, 1B1F, cool-down)."""
        warmup = min(m, self.stages - self.stage)
        send_work: list[Key] = []
        fwd_sends: list[Key] = []
        for k in range(warmup):
            self.wait(self.post([], self._fwd_in(k)))
            self.compute(FORWARD, k)
            self.wait(send_work)
            send_work = []
            fwd_sends = self._fwd_out(k)
            if k != warmup - 1:
                send_work, fwd_sends = self.post(fwd_sends, []), []
        f = warmup
        b = 0
        while True:
            self.wait(self.post(fwd_sends, self._bwd_in(b)))
            self.compute(BACKWARD, b)
            bwd_sends = self._bwd_out(b)
            b += 1
            if f == m:
                break
            self.wait(self.post(bwd_sends, self._fwd_in(f)))
            self.compute(FORWARD, f)
            fwd_sends = self._fwd_out(f)
            f += 1
        send_work = self.post(bwd_sends, [])
        while b < m:
            self.wait(self.post([], self._bwd_in(b)))
            self.compute(BACKWARD, b)
            self.wait(send_work)
            send_work = self.post(self._bwd_out(b), [])
            b += 1
        self.wait(send_work)


def _programs(schedule: Schedule, times: Sequence[StageTimes], options: SimulateOptions
              ) -> list[list[tuple[int, _Action]]]:
    """Per stage, its actions for `options.steps` steps in a row, each tagged with its step."""
    out: list[list[tuple[int, _Action]]] = []
    stages = len(times)
    for i in range(stages):
        actions: list[tuple[int, _Action]] = []
        for step in range(options.steps):
            program = _Program(i, stages, step)
            if schedule.kind == GPIPE or not options.training or stages == 1:
                program.gpipe(schedule.microbatches, options.training)
            else:
                program.one_f_one_b(schedule.microbatches)
            if options.training:
                if times[i].allreduce > 0:  # a replicated stage sums its replicas' gradients first
                    program.compute(ALLREDUCE)
                program.compute(UPDATE)
            actions += [(step, a) for a in program.actions]
        out.append(actions)
    return out


def _check(times: Sequence[StageTimes], links: Sequence[LinkTimes], schedule: Schedule,
           options: SimulateOptions) -> None:
    if not times:
        raise PlacewiseError("simulate: the plan has no stages; plan a graph first")
    if len(links) != len(times) - 1:
        raise PlacewiseError(f"simulate: {len(times)} stages need {len(times) - 1} link(s) between them, "
                             f"got {len(links)}")
    if options.steps < 2:
        raise PlacewiseError(f"simulate: steps is {options.steps}; at least 2 are needed for a period")
    numbers = [x for t in times for x in (t.forward, t.backward, t.update, t.overhead, t.allreduce)]
    numbers += [x for link in links for x in (link.forward, link.backward)]
    if any(not (x >= 0) for x in numbers):
        raise PlacewiseError("simulate: a stage or link time is negative or not a number; give times >= 0")
    if len(times) > 1 and options.training and schedule.microbatches < len(times) and schedule.kind != GPIPE:
        raise PlacewiseError(f"simulate: 1F1B needs at least one microbatch per stage ({len(times)}); "
                             f"--microbatches is {schedule.microbatches}")


def simulate(times: Sequence[StageTimes], links: Sequence[LinkTimes], schedule: Schedule,
             options: SimulateOptions | None = None) -> Simulation:
    """Replay `schedule` over `times` (per stage, pipeline order) and `links` (one per boundary)."""
    options = options or SimulateOptions()
    _check(times, links, schedule, options)
    programs = _programs(schedule, times, options)
    cost = {FORWARD: [link.forward for link in links], BACKWARD: [link.backward for link in links]}
    clock = [0.0] * len(times)
    position = [0] * len(times)
    sent: dict[Key, float] = {}  # when the sender posted (and, without overlap, finished copying)
    received: dict[Key, float] = {}  # when the receiver posted its receive
    events: list[Event] = []

    def sender_of(key: Key) -> int:
        return key[1] if key[0] == FORWARD else key[1] + 1

    def answered(key: Key) -> float | None:
        """When the sender answers a receive posted after its send: `late_answer` of the rest of the
        chunk it computes then, or at once if it is not computing; None while the sender's timeline
        has not reached that time (it may still compute across it)."""
        if key in answers:  # decided once: the sender may since have moved on because of it
            return answers[key]
        sender, posted = sender_of(key), received[key]
        if clock[sender] <= posted and not finished[sender] and not settle:
            return None
        end = next((e.end for e in reversed(computing[sender]) if e.start <= posted < e.end), posted)
        answers[key] = posted + links[key[1]].late_answer * (end - posted)
        return answers[key]

    def arrival(key: Key) -> float | None:
        if key not in sent or key not in received:
            return None
        direction, boundary, _, _ = key
        start = max(sent[key], received[key]) if options.rendezvous else sent[key]
        if links[boundary].late_answer > 0 and received[key] > sent[key]:
            answer = answered(key)
            if answer is None:
                return None
            start = answer
        wire = 0.0 if not options.overlap else cost[direction][boundary]
        return max(start + wire, received[key])

    finished = [False] * len(times)
    computing: list[list[Event]] = [[] for _ in times]  # per stage, its computations so far
    answers: dict[Key, float] = {}  # when each late receive was answered
    # True for one sweep after a sweep that moved nothing: a sender that has not reached a late
    # receive's time is blocked until after it, so it answers at once.
    settle = False
    transfers: list[Key] = []
    while not all(finished):
        progressed = False
        for i, program in enumerate(programs):
            while position[i] < len(program):
                step, action = program[position[i]]
                if action.op == "wait":
                    arrivals = [arrival(key) for key in action.keys]
                    if any(a is None for a in arrivals):
                        break
                    clock[i] = max([clock[i], *arrivals])
                elif action.op == "post-send":
                    for key in action.keys:
                        if not options.overlap:  # the sender copies the data itself, then goes on
                            clock[i] += cost[key[0]][key[1]]
                        sent[key] = clock[i]
                        transfers.append(key)
                elif action.op == "post-recv":
                    for key in action.keys:
                        received[key] = clock[i]
                else:
                    duration = times[i].duration(action.kind, options.training)
                    event = Event(i, action.kind, action.microbatch, step, clock[i], clock[i] + duration)
                    events.append(event)
                    computing[i].append(event)
                    clock[i] += duration
                position[i] += 1
                progressed = True
            finished[i] = position[i] == len(program)
        if not progressed and not all(finished):
            if settle:  # the programs mirror torch's; a stall is a bug here
                raise RuntimeError(f"simulate: the schedule's programs wait on each other (positions {position})")
        settle = not progressed
    for key in transfers:
        if key in received:
            direction, boundary, k, step = key
            end = arrival(key)
            events.append(Event(sender_of(key), f"send-{direction}", k, step, end - cost[direction][boundary], end))
    return _summarise(times, schedule, options, events)


def _summarise(times: Sequence[StageTimes], schedule: Schedule, options: SimulateOptions,
               events: list[Event]) -> Simulation:
    last = len(times) - 1
    ends = [max(e.end for e in events if e.stage == last and e.step == s and not e.kind.startswith("send"))
            for s in range(options.steps)]
    first = max(e.end for e in events if e.step == 0)
    m = schedule.microbatches
    busy = tuple(m * (t.forward + (t.backward if options.training else 0.0) + t.overhead)
                 + (t.update + t.allreduce if options.training else 0.0) for t in times)
    events.sort(key=lambda e: (e.step, e.start, e.stage))
    return Simulation(ends[-1] - ends[-2], first, busy, tuple(events))
