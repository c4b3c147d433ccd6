"""The parameter server's recovery: when a server process dies (killed, crashed), the launcher starts a
fresh one from the server's last checkpoint in a new process-group generation, and the workers rejoin
it (`ServerLink.call`) and go on from the checkpoint's steps.

At most `--checkpoint-every` updates are lost per death: those applied after the last checkpoint.
The server records its version after every update in the run's folder, so the count is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from placewise.errors import PlacewiseError
from placewise.run.choices import DDP
from placewise.run.data import Dataset
from placewise.run.dataparallel.checkpoint import checkpoint_path, load_checkpoint
from placewise.run.dataparallel.config import TrainConfig
from placewise.run.dataparallel.layout import Layout
from placewise.run.dataparallel.server import record_file, recorded_version
from placewise.run.launcher import RankFailure


@dataclass
class ServerRecovery:
    """The launcher's `restart` for a server run, and the record of every restart it made."""
    cfg: TrainConfig                  # the run's settings, as its ranks got them
    data: Dataset
    layout: Layout
    restarts: list[dict[str, int]] = field(default_factory=list)  # died_at, resumed_at, lost_updates

    @staticmethod
    def possible(cfg: TrainConfig) -> bool:
        """Whether a dead server can be restarted: one server shard, workers of one process, checkpoints."""
        return cfg.mode != DDP and not cfg.mapping and cfg.server_count() == 1 and bool(cfg.checkpoint_every)

    def __call__(self, rank: int, failure: RankFailure, gone: set[int], folder: str) -> tuple[Any, ...] | None:
        if rank >= self.layout.servers or failure.traceback:
            return None  # a worker (tolerated) or an error the server raised (a restart would repeat it)
        died = f"rank {rank} (the parameter server) failed: {failure.message}"
        if not self.possible(self.cfg):
            fix = ("add --checkpoint PATH --checkpoint-every K to restart it from its last checkpoint (at most K "
                   "updates lost)" if not self.cfg.checkpoint_every and not self.cfg.mapping
                   and self.cfg.server_count() == 1 else
                   "only a single server shard (--servers 1) of single-process workers is restarted")
            raise PlacewiseError(f"{died}; the run cannot go on without it: {fix}")
        workers = [r for r in range(self.layout.servers, self.layout.world_size) if r not in gone]
        if not workers:
            raise PlacewiseError(f"{died}; no worker is left to go on with a restarted server")
        path = checkpoint_path(self.cfg.checkpoint, rank, 1)
        # Before the first checkpoint of this run: from where the run began (its --resume, or the start).
        resume = str(path) if path.is_file() else self.cfg.resume
        resumed_at = (load_checkpoint(Path(resume), self.cfg.fingerprint(self.data.features, self.data.classes))
                      ["version"] if resume else 0)
        died_at = recorded_version(record_file(rank, folder)) or resumed_at
        self.restarts.append({"died_at": died_at, "resumed_at": int(resumed_at),
                              "lost_updates": max(0, died_at - int(resumed_at))})
        return replace(self.cfg, resume=resume, absent=tuple(sorted(gone))), self.data
