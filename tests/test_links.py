"""Link measurement: the fit recovers latency and bandwidth; two processes here measure a real link."""

import pytest

from placewise.errors import PlacewiseError
from placewise.run.links import fit, measure_link


def test_fit_recovers_latency_and_bandwidth():
    sizes = (1000, 10_000, 100_000, 1_000_000)
    times = tuple(50e-6 + s / 2e9 for s in sizes)
    link = fit(sizes, times, "gloo")
    assert link.latency == pytest.approx(50e-6, rel=1e-6)
    assert link.bandwidth == pytest.approx(2e9, rel=1e-6)
    assert link.transfer_seconds(4e6) == pytest.approx(50e-6 + 2e-3)


def test_fit_refuses_times_that_do_not_grow():
    with pytest.raises(PlacewiseError, match="measure again"):
        fit((1000, 1_000_000), (1e-3, 0.5e-3), "gloo")


@pytest.mark.timeout(120)
def test_two_processes_measure_a_positive_link():
    # Sizes far apart, so that growth shows through the noise of a loaded machine.
    link = measure_link(gpu=False, sizes=(1 << 10, 32 << 20), repeats=5, timeout_s=100)
    assert link.backend == "gloo"
    assert link.latency > 0 and link.bandwidth > 1e6  # loopback moves far more than 1 MB/s
    assert len(link.one_way) == 2
