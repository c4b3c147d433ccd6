"""Data parallelism: asynchronous workers around a parameter server, its synchronous twin, and DDP.

config (TrainConfig) -> train (orchestration) -> ranks (what each process does: server, worker,
pipeline stage, DDP rank) -> report. Imports torch.
"""
