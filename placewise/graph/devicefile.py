"""Device files: the cluster to plan for, in YAML or JSON.

    # cluster.yaml
    bandwidth: 12 GB/s            # link between devices; bytes/s or a string with a unit
    latency: 80 us                # one-way message latency; seconds or a string (s, ms, us, ns)
    overhead: 0.3 ms              # a pipeline stage's runtime work per microbatch beyond computing
    late_answer: 1.0              # share of a sender's chunk a receive posted after its send waits (0-1)
    kinds:
      - name: accelerator         # `-k/--memory` on the command line override this kind
        type: accelerator         # accelerator (also gpu, fpga) or cpu; default from the name
        count: 2
        memory: 16 GiB            # per device; bytes or a string with a unit; null = unlimited
        speed: 20                 # relative to the device the graph was profiled on
      - name: cpu
        type: cpu
        count: 4
        speed: 1
        shared_memory: false      # cores in separate processes pay the link (default true: one process)

`speed` is relative to the measured graph: an accelerator kind divides the graph's accelerator
times by it, a CPU kind its CPU times. Instead of a number a kind may give `profile: FILE`, a graph
profiled on a device of that kind (`placewise profile --device cuda --out FILE`); its speed is then
the whole-model forward time of the top-level `reference: FILE` graph (the one to be planned, or
another profile of the same model on the same device) over the kind's own. Relative paths are
read from the device file's folder. `kinds` may also be a mapping from name to the other fields.
`shared_memory` (CPU kinds only) says whether the kind's cores share host memory and so pay no
transfers, the paper's rule (the default), or run as separate processes that send and receive over
the link (`false`; what placewise's runtime does). Units are bytes (`GB`, `GiB`); units in bits
(`Gb`) are refused. A cluster written by placewise
(`Cluster.to_json`) is a valid device file.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from pathlib import Path
from typing import Any, Callable

import yaml

from placewise.errors import PlacewiseError, read_text
from placewise.graph.devices import MAX_DEVICES, Cluster, DeviceKind

TOP_FIELDS = ("kinds", "bandwidth", "latency", "overhead", "late_answer", "reference", "name", "description")
_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
KIND_FIELDS = ("name", "type", "accelerator", "count", "memory", "speed", "profile", "shared_memory", "description")
KIND_TYPES = {"accelerator": True, "gpu": True, "cuda": True, "fpga": True, "tpu": True, "cpu": False}
# A unit is a prefix, an optional `i` (powers of 1024) and `B` for bytes: `GB` is 10**9 bytes,
# `GiB` 2**30. A bare prefix (`16G`, `16Gi`) reads as bytes too, as in Kubernetes. A lowercase `b`
# means bits (`Gb` is a gigabit, an eighth of a GB), which is almost always a typo for `GB` here.
_PREFIXES = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
_UNIT = re.compile(r"^([kKmMgGtTpP]?)([iI]?)(B?)$")
_BITS = re.compile(r"^[kKmMgGtTpP]?[iI]?b(?:ps|it|its)?$")
_QUANTITY = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([a-zA-Z]*)\s*(/\s*s)?\s*$")


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, message: str) -> PlacewiseError:
        return PlacewiseError(f"{self.source}: {where}: {message}")

    def fields(self, obj: Any, where: str, allowed: tuple[str, ...]) -> dict:
        if not isinstance(obj, dict):
            raise self.fail(where, f"expected a mapping of fields, got {type(obj).__name__}; write it as key: value lines")
        for key in obj:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise self.fail(where, f"unknown field {key!r}; {hint}the fields are {', '.join(allowed)}")
        return obj

    def quantity(self, value: Any, where: str, what: str, *, allow_none: bool = False) -> float | None:
        """A non-negative number, or a string with a unit (`16 GiB`, `12 GB/s`, `1e10`)."""
        if value is None and allow_none:
            return None
        number = _number(value, lambda n, unit: _with_unit(self, n, unit, value, where), per_second=True)
        if number is None or not math.isfinite(number):
            raise self.fail(where, f"{value!r} is not {what}; write a number or a string such as '16 GiB'")
        if number < 0:
            raise self.fail(where, f"{value!r} is negative; {what} must be 0 or more")
        return number


def _number(value: Any, scale: Callable[[float, str], float | None], *, per_second: bool) -> float | None:
    """`value` as a number: a number, or a string of a number and a unit that `scale(number, unit)`
    reads (None: a unit it does not know), ending in '/s' only if `per_second`; None when neither."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        m = _QUANTITY.match(value)
        if m and (per_second or not m.group(3)):
            return scale(float(m.group(1)), m.group(2))
    return None


def _with_unit(reader: _Reader, number: float, unit: str, value: str, where: str) -> float | None:
    """`number` times the bytes `unit` stands for; None for no unit at all, an error for units in bits."""
    m = _UNIT.match(unit)
    if m and (m.group(1) or not m.group(2)):
        prefix, binary, _ = m.groups()
        return number * (1024 if binary else 1000) ** _PREFIXES[prefix.lower()]
    if _BITS.match(unit):
        prefix = unit[0].upper() if unit[0].lower() in _PREFIXES else ""
        decimal, binary = value.replace(unit, prefix + "B"), value.replace(unit, prefix + "iB")
        raise reader.fail(where, f"{value!r}: {unit} is in bits; write bytes, e.g. {decimal!r}"
                          + (f" (powers of 1000) or {binary!r} (powers of 1024)" if prefix else "")
                          + "; a figure in bits is eight times the bytes")
    return None


def _speed_from_profiles(reader: _Reader, kind_profile: str, reference: str | None, base: Path, accelerator: bool,
                         where: str) -> float:
    from placewise.graph.formats import load_graph
    if reference is None:
        raise reader.fail(where, "a kind measured by `profile` needs the top-level `reference` graph its speed is relative to")
    key = "acc_forward_ms" if accelerator else "cpu_forward_ms"
    times = []
    models = []
    for label, path in (("reference", reference), (f"{where}.profile", kind_profile)):
        graph = load_graph(base / path)
        meta = graph.meta_dict
        if key not in meta:
            raise reader.fail(label, f"{path} has no measured whole-model time ({key}); give a graph written by "
                              "`placewise profile`")
        times.append(float(meta[key]))
        models.append(meta.get("model"))
    if models[0] != models[1]:
        raise reader.fail(where, f"profile is of model {models[1]!r} but reference of {models[0]!r}; profile the same model")
    if not times[1] > 0:
        raise reader.fail(where, f"profile {kind_profile} has a whole-model time of {times[1]}; profile again")
    return times[0] / times[1]


def parse_device_file(data: Any, source: str = "device file", base: Path | None = None) -> Cluster:
    """Validate a device file's content (already parsed from YAML/JSON) into a Cluster."""
    reader = _Reader(source)
    base = base or Path(".")
    top = reader.fields(data, "top level", TOP_FIELDS)
    raw_kinds = top.get("kinds")
    if isinstance(raw_kinds, dict):
        raw_kinds = [{"name": name, **(spec if isinstance(spec, dict) else {"count": spec})}
                     for name, spec in raw_kinds.items()]
    if not isinstance(raw_kinds, list) or not raw_kinds:
        raise reader.fail("kinds", "missing or empty; list the device kinds (name, type, count, memory, speed)")
    bandwidth = reader.quantity(top.get("bandwidth"), "bandwidth", "a link bandwidth in bytes/s", allow_none=True)
    if bandwidth is not None and bandwidth <= 0:
        raise reader.fail("bandwidth", f"{top['bandwidth']!r}; give a positive number of bytes per second")
    latency = _seconds(reader, top.get("latency"), "latency", "a latency")
    overhead = _seconds(reader, top.get("overhead"), "overhead", "an overhead")
    late_answer = top.get("late_answer")
    if late_answer is not None and (isinstance(late_answer, bool) or not isinstance(late_answer, (int, float))
                                    or not 0 <= late_answer <= 1):
        raise reader.fail("late_answer", f"{late_answer!r}; give a share from 0 to 1 (what `placewise devices --measure` "
                          "writes), or leave it out")
    reference = top.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise reader.fail("reference", "expected a path to a profiled graph")
    kinds: list[DeviceKind] = []
    for i, raw in enumerate(raw_kinds):
        name = raw.get("name") if isinstance(raw, dict) else None
        where = f"kinds[{i}]" + (f" ({name})" if isinstance(name, str) and name.strip() else "")
        spec = reader.fields(raw, where, KIND_FIELDS)
        if not isinstance(name, str) or not name.strip():
            raise reader.fail(f"{where}.name", "missing; give each kind a name (e.g. accelerator, cpu)")
        if any(k.name == name for k in kinds):
            raise reader.fail(where, f"duplicate kind name {name!r}; give each kind its own name")
        accelerator = _kind_type(reader, spec, name, where)
        count = spec.get("count", 1)
        if isinstance(count, float) and count.is_integer():
            count = int(count)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise reader.fail(f"{where}.count", f"{count!r}; give a whole number of devices, 0 or more")
        if count > MAX_DEVICES:
            raise reader.fail(f"{where}.count", f"{count!r} is more than the {MAX_DEVICES} devices placewise plans for; "
                              "give a smaller count")
        memory = reader.quantity(spec.get("memory"), f"{where}.memory", "a memory size in bytes", allow_none=True)
        if "speed" in spec and "profile" in spec:
            raise reader.fail(where, "gives both speed and profile; keep one")
        if "profile" in spec:
            if not isinstance(spec["profile"], str):
                raise reader.fail(f"{where}.profile", "expected a path to a profiled graph")
            speed = _speed_from_profiles(reader, spec["profile"], reference, base, accelerator, where)
        else:
            speed = reader.quantity(spec.get("speed", 1.0), f"{where}.speed", "a relative speed")
            if speed == 0:
                raise reader.fail(f"{where}.speed", "is 0; a relative speed must be positive (1 = the profiled device)")
        kinds.append(DeviceKind(name, count, accelerator, memory, speed, _shared_memory(reader, spec, accelerator, where)))
    try:
        return Cluster(tuple(kinds), bandwidth, latency, overhead, None if late_answer is None else float(late_answer))
    except PlacewiseError as e:  # too many devices in all
        raise reader.fail("kinds", str(e)) from None


def _seconds(reader: _Reader, value: Any, field: str, what: str) -> float | None:
    """A duration in seconds (the link's latency, the runtime's overhead): a number of seconds or a
    string such as '80 us'."""
    if value is None:
        return None
    number = _number(value, lambda n, unit: n * _TIME_UNITS[unit] if unit in _TIME_UNITS else None, per_second=False)
    if number is None or not math.isfinite(number) or number < 0:
        raise reader.fail(field, f"{value!r} is not {what}; write seconds (0 or more) or a string such as "
                          "'80 us' (units s, ms, us, ns)")
    return number


def _shared_memory(reader: _Reader, spec: dict, accelerator: bool, where: str) -> bool | None:
    """A kind's `shared_memory` flag: true or false, and only on a CPU kind; None when not given."""
    flag = spec.get("shared_memory")
    if flag is None:
        return None
    if not isinstance(flag, bool):
        raise reader.fail(f"{where}.shared_memory", f"{flag!r}; write true (cores in one process) or false "
                          "(separate processes that pay the link)")
    if flag and accelerator:
        raise reader.fail(f"{where}.shared_memory", "is true on an accelerator kind; only CPU cores share host memory, "
                          "drop it or give type: cpu")
    return flag


def _kind_type(reader: _Reader, spec: dict, name: str, where: str) -> bool:
    """Whether a kind is an accelerator, from `type`, `accelerator` or (failing both) its name."""
    flag = spec.get("accelerator")
    if flag is not None and not isinstance(flag, bool):
        raise reader.fail(f"{where}.accelerator", f"{flag!r}; write true or false")
    kind_type = spec.get("type")
    if kind_type is None:
        return flag if flag is not None else not name.lower().startswith("cpu")
    if not isinstance(kind_type, str) or kind_type.lower() not in KIND_TYPES:
        raise reader.fail(f"{where}.type", f"unknown kind {kind_type!r}; use one of {', '.join(KIND_TYPES)}")
    accelerator = KIND_TYPES[kind_type.lower()]
    if flag is not None and flag != accelerator:
        raise reader.fail(where, f"type {kind_type!r} contradicts accelerator: {flag}; keep one")
    return accelerator


def load_device_file(path: str | Path) -> Cluster:
    """Read a device file (YAML or JSON) into a Cluster; bad content raises a one-line PlacewiseError."""
    path = Path(path)
    text = read_text(path, "device file (YAML or JSON; see `placewise devices --out FILE`)")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise PlacewiseError(f"{path}: not JSON ({e.msg} at line {e.lineno} column {e.colno}); fix the syntax") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise PlacewiseError(f"{path}: not YAML ({problem}{at}); fix the syntax") from None
    except RecursionError:  # YAML's block nesting (`- - - ...`), which read_text's bracket count does not see
        raise PlacewiseError(f"{path}: nests too deep for a device file; give kinds as a list of fields") from None
    return parse_device_file(data, str(path), path.parent)


def device_file_text(cluster: Cluster, header: str = "") -> str:
    """A device file (YAML) for a cluster, with an optional comment header."""
    data = {"bandwidth": cluster.bandwidth,
            "kinds": [{"name": k.name, "type": "accelerator" if k.accelerator else "cpu", "count": k.count,
                       "memory": k.memory, "speed": k.speed,
                       **({} if k.accelerator else {"shared_memory": k.shared_memory})} for k in cluster.kinds]}
    timing = {name: value for name, value in (("latency", cluster.latency), ("overhead", cluster.overhead),
                                              ("late_answer", cluster.late_answer)) if value is not None}
    data = {"bandwidth": data["bandwidth"], **timing, "kinds": data["kinds"]}
    if data["bandwidth"] is None:
        del data["bandwidth"]
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comment + yaml.safe_dump(data, sort_keys=False)
