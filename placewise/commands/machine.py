"""`placewise profile` and `devices`: a model measured into a graph; this machine described in a device file."""

from __future__ import annotations

import sys
from pathlib import Path

from placewise.console import console as rich_console, fmt_bytes
from placewise.errors import dump_json


def cmd_profile(args) -> int:
    from placewise.graph import save_graph
    from placewise.graph.devicefile import load_device_file
    from placewise.profile import build_model, export_paper, profile_model
    from placewise.profile.report import print_summary, summary
    cluster = load_device_file(args.devices) if args.devices else None
    model, inputs = build_model(args.model, args.batch_size, args.input_shape, layers=args.layers, hidden=args.hidden,
                                heads=args.heads, seed=args.seed)
    graph = profile_model(model, inputs, name=args.model, granularity=args.granularity, device=args.device,
                          training=args.training, repeats=args.repeats, warmup=args.warmup, cluster=cluster,
                          optimizer=args.optimizer, threads=args.threads, clock=args.clock,
                          progress=not args.json and sys.stderr.isatty())
    written = []
    if args.out:
        save_graph(graph, args.out)
        written.append(f"graph written to {args.out}")
    if args.export_paper:
        export_paper(graph, args.export_paper)
        written.append(f"paper JSON written to {args.export_paper}")
    if args.json:
        print(dump_json(summary(graph)))
    else:
        print_summary(graph, written)
    return 0


def cmd_devices(args) -> int:
    from placewise.profile.machine import describe_machine, machine_device_file
    info = describe_machine()
    if args.measure:
        from placewise.run.links import measure_here
        info["link"] = measure_here()
    if args.out:
        Path(args.out).write_text(machine_device_file(info))
    if args.json:
        print(dump_json(info))
        return 0
    from rich.table import Table
    table = Table(title="this machine")
    for col in ("device", "count", "memory", "details"):
        table.add_column(col)
    cpu = info["cpu"]
    table.add_row("cpu", f"{cpu['usable_cores']} of {cpu['cores']} cores", fmt_bytes(info["memory"] or 0), cpu["model"])
    for gpu in info["cuda"]:
        table.add_row(f"cuda:{gpu['index']}", "1", fmt_bytes(gpu["memory"]),
                      f"{gpu['name']} (compute {gpu['capability']}, {gpu['multiprocessors']} SMs)")
    rich_console(120).print(table)
    if info["torch"]:
        print(f"torch {info['torch']['version']}, {info['torch']['threads']} intra-op thread(s)"
              + ("" if info["cuda"] else "; no CUDA device"))
    if info.get("link"):
        link = info["link"]
        print(f"link between two processes ({link['backend']}): latency {1e6 * link['latency']:.0f} us, "
              f"bandwidth {link['bandwidth'] / 1e9:.2f} GB/s; a pipeline stage's overhead {1e3 * link['overhead']:.2f} ms "
              f"per microbatch; a receive posted late waits {link['late_answer']:.0%} of the rest of the sender's chunk")
    if args.out:
        print(f"device file written to {args.out}")
    return 0
