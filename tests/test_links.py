"""Link measurement: the fit recovers latency and bandwidth; two processes here measure a real link."""

import pytest

from placewise.errors import PlacewiseError
from placewise.run.links import fit, late_receive_waits, measure_link


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


def test_device_file_latency_units_and_round_trip():
    from placewise.graph import Cluster
    from placewise.graph.devicefile import device_file_text, parse_device_file
    import yaml
    cluster = parse_device_file({"bandwidth": "2 GB/s", "latency": "80 us", "kinds": [{"name": "cpu", "count": 2}]})
    assert cluster.latency == pytest.approx(80e-6)
    assert parse_device_file(yaml.safe_load(device_file_text(cluster))) == cluster
    assert Cluster.from_json(cluster.to_json()) == cluster
    timed = parse_device_file({"latency": "80 us", "overhead": "0.4 ms", "late_answer": 0.9,
                               "kinds": [{"name": "cpu", "count": 2}]})
    assert timed.overhead == pytest.approx(4e-4) and timed.late_answer == pytest.approx(0.9)
    assert parse_device_file(yaml.safe_load(device_file_text(timed))) == timed == Cluster.from_json(timed.to_json())
    with pytest.raises(PlacewiseError, match="overhead"):
        parse_device_file({"overhead": "-1 ms", "kinds": [{"name": "cpu"}]})
    with pytest.raises(PlacewiseError, match="latency"):
        parse_device_file({"latency": "3 parsecs", "kinds": [{"name": "cpu"}]})
    with pytest.raises(PlacewiseError, match="late_answer.*share from 0 to 1"):
        parse_device_file({"late_answer": 1.5, "kinds": [{"name": "cpu"}]})


@pytest.mark.timeout(300)  # the link's ping-pong and the null pipeline, each in two fresh processes
def test_devices_measure_writes_the_link(tmp_path):
    from placewise.cli import main
    from placewise.graph.devicefile import load_device_file
    out = tmp_path / "here.yaml"
    assert main(["devices", "--measure", "--out", str(out)]) == 0
    cluster = load_device_file(out)
    assert cluster.latency is not None and cluster.latency > 0
    assert cluster.bandwidth is not None and cluster.bandwidth > 1e6
    assert cluster.overhead is not None and 0 < cluster.overhead < 0.02
    assert cluster.late_answer is not None and 0 <= cluster.late_answer <= 1
    assert cluster.kind("cpu").pays_transfers  # the cores run stages as separate processes


@pytest.mark.timeout(200)
def test_null_pipeline_measures_the_runtimes_overhead_per_microbatch():
    from placewise.run.links import measure_stage_overhead
    first, last = measure_stage_overhead(timeout_s=180)
    # Posting and completing transfers and torch's bookkeeping cost some CPU time per microbatch,
    # far less than a real chunk (tens of microseconds to a few milliseconds even on a loaded machine).
    assert 0 < first < 0.02 and 0 < last < 0.02


@pytest.mark.timeout(120)
def test_late_receives_are_timed_against_the_senders_chunk():
    # A receive posted halfway through the sender's 30 ms chunk waits at most the other half (plus the
    # link), whatever the machine; how much of it depends on the scheduler (`Cluster.late_answer`).
    waits = late_receive_waits(chunk=0.03, count=5)
    assert len(waits) == 4 and all(0 < w < 0.1 for w in waits)
