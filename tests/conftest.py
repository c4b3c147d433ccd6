from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ROOT.parent / "shared" / "workloads"
PAPER = WORKLOADS / "dnn-partitioning"
THROUGHPUT_LAYER = PAPER / "throughput-inputs" / "LayerGraphs"
EXPERTS = PAPER / "human-experts"


@pytest.fixture(scope="session")
def workloads() -> Path:
    assert WORKLOADS.is_dir(), f"shared workloads missing at {WORKLOADS}"
    return WORKLOADS
