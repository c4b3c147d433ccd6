"""The `placewise` command: parses arguments and calls the layers. Domain errors print one line, exit 2."""

from __future__ import annotations

import argparse
import os
import sys

from placewise.commands.comparing import cmd_compare
from placewise.commands.machine import cmd_profile, cmd_devices
from placewise.commands.planning import cmd_evaluate, cmd_plan, cmd_simulate, cmd_export
from placewise.commands.training import DEFAULT_MICROBATCHES, cmd_train, cmd_serve_bench, cmd_demo
from placewise.errors import PlacewiseError
from placewise.export import FORMATS as EXPORT_FORMATS
from placewise.plan.allreduce import ALLREDUCE_MODELS
from placewise.plan.options import OBJECTIVES
from placewise.plan.schedule import DEFAULT_SCHEDULE, SCHEDULES
from placewise.run.choices import (DATASETS, DEFAULT_MOMENTUM, FUSE_MODES, OPTIMIZER_STATES, OPTIMIZERS,
                                   PIPELINE, STALENESS_HELP, TRAIN_MODES, TRANSPORTS)
from placewise.validate import (OneLineParser, device_count, finite_non_negative, finite_positive, input_file,
                                learning_rate, momentum, non_negative_int, output_file, output_file_in_new_folder,
                                output_folder, positive_int, seed)


# ---- shared helpers -------------------------------------------------------------------------------
def _cluster_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("devices (override what the graph file carries)")
    g.add_argument("--accelerators", "-k", type=device_count, metavar="K", help="number of accelerators")
    g.add_argument("--cpus", "-l", type=device_count, metavar="L", help="number of CPU cores")
    g.add_argument("--memory", type=finite_positive, metavar="BYTES", help="memory of one accelerator, bytes")
    g.add_argument("--devices", metavar="FILE", help="a device file (YAML or JSON) describing the cluster")


def _graph_command(p: argparse.ArgumentParser) -> None:
    """What every command that reads a graph takes: the graph file, the objective, the devices."""
    p.add_argument("graph", help="graph file (paper JSON, placewise JSON or PipeDream graph.txt)")
    p.add_argument("--objective", choices=OBJECTIVES, default="throughput")
    _cluster_flags(p)
    _graph_flags(p)


def _graph_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bandwidth", type=finite_positive, default=None, metavar="BYTES_PER_S",
                   help="link bandwidth for PipeDream graphs (bytes/s; default 10e9)")


EXAMPLES = {
    "evaluate": "placewise evaluate ../shared/workloads/dnn-partitioning/throughput-inputs/LayerGraphs/bert24_inference.json "
                "../shared/workloads/dnn-partitioning/human-experts/bert24_inference_expert.json",
    "plan": "placewise plan ../shared/workloads/dnn-partitioning/throughput-inputs/LayerGraphs/resnet50_inference.json -k 4 --out plan.json"
            "\n  placewise plan resnet18.json --devices here.yaml --solver dp-schedule --schedule gpipe --microbatches 8",
    "compare": "placewise compare ../shared/workloads/dnn-partitioning/throughput-inputs/LayerGraphs/bert24_inference.json "
               "--plot compare.png",
    "profile": "placewise profile resnet18 --input-shape 3 64 64 --batch-size 8 --training --out resnet18.json",
    "devices": "placewise devices --json\n  placewise devices --measure --out here.yaml  # with the link measured",
    "export": "placewise export plan.json --format megatron --model gpt2 --input-shape 128 --training",
    "simulate": "placewise simulate plan.json --microbatches 8 --picture timeline.png  # a plan made with:"
                "\n  placewise plan resnet18.json --devices here.yaml --schedule 1f1b --microbatches 4 --out plan.json",
    "train": "placewise train resnet18 --plan plan.json --graph resnet18.json --input-shape 3 64 64 --batch-size 8 "
             "--microbatches 4 --steps 3 --fuse backward\n  placewise train mlp --workers 2 --mode async --epochs 5"
             "\n  placewise train cnn --workers 2 --mode async --staleness dc-asgd --epochs 5  # any model"
             "\n  placewise train mlp:256x256 --plan mlp-plan.json --workers 2 --mode async --epochs 5  "
             "# pipelines as workers",
    "serve-bench": "placewise serve-bench resnet18 --plan plan.json --graph resnet18.json --input-shape 3 64 64 "
                   "--batch-size 8 --microbatches 4",
    "demo": "placewise demo --out placewise-out",
}


def _replicate_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-replicate", action="store_true",
                   help="place every node once (default: cheap input-derived nodes such as sizes, masks and position "
                        "ids are recomputed by each stage that needs them)")


def _add_evaluate(add) -> None:
    p = add("evaluate", "score a split of a graph with the cost model", cmd_evaluate)
    _graph_command(p)
    p.add_argument("split", help="split file (reference {fpgas, cpus} format or a placewise plan)")
    p.add_argument("--noncontiguous", action="store_true", help="do not require contiguous sets")
    p.add_argument("--json", action="store_true", help="print the plan JSON on stdout")
    p.add_argument("--out", type=output_file, metavar="PLAN.json", help="also write the scored plan")
    _replicate_flag(p)


def _add_plan(add) -> None:
    p = add("plan", "find a split of a graph across devices", cmd_plan)
    _graph_command(p)
    p.add_argument("--solver", default="dp", help="dp (exact, default), ip, or a baseline")
    p.add_argument("--noncontiguous", action="store_true", help="allow non-contiguous sets (integer program)")
    p.add_argument("--time-limit", type=finite_positive, metavar="S", help="stop after S seconds with the best plan found")
    p.add_argument("--gap", type=finite_non_negative, default=1e-4, metavar="G", help="relative optimality gap to stop at (ip)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--schedule", choices=SCHEDULES, help="plan for this pipeline schedule: per-position memory, "
                   "predicted step time (default 1f1b when --microbatches is given)")
    p.add_argument("--microbatches", type=positive_int, metavar="M", help="microbatches per step of the schedule")
    p.add_argument("--batch-size", type=positive_int, metavar="N", help="training batch (default: M x the profiled "
                   "batch, so one microbatch is what was profiled)")
    p.add_argument("--max-replicas", type=positive_int, default=1, metavar="R",
                   help="let the dp or the ip replicate each stage on up to R devices of its kind (data parallel, "
                   "gradients all-reduced once per step: of M microbatches with --microbatches, else one per replica); "
                   "default 1")
    p.add_argument("--allreduce", choices=ALLREDUCE_MODELS, help="how a replicated stage's all-reduce is costed: ring "
                   "(default for dp) or PipeDream's model (default for pipedream-hybrid)")
    p.add_argument("--no-recompute", action="store_true", help="dp-schedule: never recompute a stage's activations in "
                   "its backward (by default a stage that does not fit its device recomputes, paying its forward again)")
    p.add_argument("--out", type=output_file, metavar="PLAN.json", help="write the plan")
    p.add_argument("--json", action="store_true", help="print the plan JSON on stdout")
    _replicate_flag(p)
    p.add_argument("--explain", action="store_true",
                   help="also say what was replicated, units and ideals before and after, and where the bound came from")


def _add_compare(add) -> None:
    p = add("compare", "run the exact planner and the baselines side by side", cmd_compare)
    _graph_command(p)
    p.add_argument("--methods", nargs="+", metavar="METHOD", help="solvers/baselines to run (default: all)")
    p.add_argument("--expert", type=input_file, metavar="SPLIT", help="an expert split file to include as a row")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--time-limit", type=finite_positive, metavar="S", help="per-method time limit (ip, local-search; default 60)")
    p.add_argument("--plot", type=output_file, metavar="FILE.png", help="write a bar chart")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    _replicate_flag(p)


def _add_profile(add) -> None:
    p = add("profile", "trace and time a PyTorch model into an operator graph", cmd_profile)
    p.add_argument("model", help="torchvision name (resnet18), transformers config (bert-base, gpt2) or package.module:factory")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N")
    p.add_argument("--input-shape", type=positive_int, nargs="+", metavar="D", help="input shape without the batch (e.g. 3 224 224, or a sequence length)")
    p.add_argument("--granularity", choices=["layer", "operator"], default="layer")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--training", action="store_true", help="also time backward passes (training graph)")
    p.add_argument("--repeats", type=positive_int, default=5, metavar="R", help="timed runs per node (median)")
    p.add_argument("--devices", metavar="FILE", help="device file: cluster to store with the graph")
    p.add_argument("--out", type=output_file, metavar="GRAPH.json", help="write the graph (placewise JSON)")
    p.add_argument("--export-paper", type=output_file, metavar="FILE.json", help="also write the paper's JSON format")
    p.add_argument("--json", action="store_true", help="print a summary as JSON on stdout")
    p.add_argument("--layers", type=positive_int, metavar="N", help="transformer blocks (transformers models only)")
    p.add_argument("--hidden", type=positive_int, metavar="H", help="transformer hidden width (transformers models only)")
    p.add_argument("--heads", type=positive_int, metavar="N", help="attention heads (transformers models only)")
    p.add_argument("--warmup", type=non_negative_int, default=1, metavar="W", help="untimed runs before timing (after one check run)")
    p.add_argument("--threads", type=positive_int, default=1, metavar="T", help="torch threads while profiling (1: one core)")
    p.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                   help="CPU timing: process CPU time, wall time, or auto (CPU time for one thread)")
    p.add_argument("--optimizer", choices=list(OPTIMIZER_STATES), default="adam",
                   help="optimizer whose state a training graph's memory counts")
    p.add_argument("--seed", type=seed, default=0, help="seed of the random weights and inputs")


def _add_export(add) -> None:
    p = add("export", "write a plan as torch's split_spec, torchtitan's module names, Megatron's layout or "
                      "DeepSpeed's partition", cmd_export)
    p.add_argument("plan", type=input_file, metavar="PLAN.json", help="a plan of a profiled model (placewise plan --out)")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    p.add_argument("--model", help="the model the plan is for (default: the name the plan's graph was profiled as)")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N")
    p.add_argument("--input-shape", type=positive_int, nargs="+", metavar="D", help="as given to profile")
    p.add_argument("--layers", type=positive_int, metavar="N", help="transformer blocks, as given to profile")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--training", action="store_true", help="the graph was profiled with --training (traced in train mode)")
    p.add_argument("--root", default="", metavar="MODULE", help="torchtitan/deepspeed: name the children of this submodule "
                   "(e.g. model for a wrapped Hugging Face model)")
    p.add_argument("--transformer-layers", metavar="MODULE", help="megatron: the list of transformer layers (default: found)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def _add_devices(add) -> None:
    p = add("devices", "show the devices of this machine", cmd_devices)
    p.add_argument("--json", action="store_true", help="print as JSON on stdout")
    p.add_argument("--out", type=output_file, metavar="FILE.yaml", help="write a device file describing this machine")
    p.add_argument("--measure", action="store_true", help="time send/receive between two processes here (gloo, or "
                   "NCCL between two GPUs) and write the measured latency and bandwidth into the device file")


def _add_train(add) -> None:
    p = add("train", "train a model as a pipeline (from a plan) and/or with data-parallel workers", cmd_train)
    p.add_argument("model", help="model name (as for profile) or package.module:factory")
    p.add_argument("--plan", metavar="PLAN.json", help="plan to cut the model into pipeline stages (with --mode "
                   "async|sync: every worker is such a pipeline)")
    p.add_argument("--graph", metavar="GRAPH.json", help="the profiled graph the plan came from (per-sample prediction)")
    p.add_argument("--schedule", choices=SCHEDULES, help="pipeline schedule (with --plan; default: the plan's, "
                   f"else {DEFAULT_SCHEDULE})")
    p.add_argument("--microbatches", type=int, metavar="M", help="microbatches per batch (with --plan; default: the "
                   f"plan's, else {DEFAULT_MICROBATCHES})")
    p.add_argument("--steps", type=int, default=10, metavar="N")
    p.add_argument("--batch-size", type=int, default=32, metavar="N")
    p.add_argument("--input-shape", type=int, nargs="+", metavar="D")
    p.add_argument("--lr", type=learning_rate, default=0.05)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    p.add_argument("--momentum", type=momentum, default=DEFAULT_MOMENTUM)
    p.add_argument("--fuse", choices=FUSE_MODES, default="none",
                   help="optimizer fusion: each update inside backward (backward-overlap: on a second thread, "
                        "for runs with fewer torch threads than cores) or just before the next forward")
    p.add_argument("--threads", type=int, default=1, metavar="T", help="torch threads per process")
    p.add_argument("--workers", type=int, metavar="W", help="data-parallel workers (async/sync/ddp); with --plan, each a pipeline")
    p.add_argument("--mode", choices=TRAIN_MODES, default=PIPELINE)
    p.add_argument("--n-push", type=int, default=1, metavar="N", help="push gradients every N steps")
    p.add_argument("--n-fetch", type=int, default=1, metavar="N", help="fetch parameters every N steps")
    p.add_argument("--staleness", default="none", metavar="POLICY", help=STALENESS_HELP)
    p.add_argument("--dc-lambda", type=float, metavar="L",
                   help="dc-asgd: lambda_0 of the compensated gradient g + lambda*g*g*(w_now - w_stale)")
    p.add_argument("--dc-meansquare", type=float, metavar="M",
                   help="dc-asgd: 0 keeps lambda constant; M in (0, 1) divides it by the root of a moving mean "
                        "square of g (DC-ASGD-a)")
    p.add_argument("--gap-decay", type=float, metavar="D",
                   help="gap-aware: momentum of the moving average of update sizes the gap is measured in")
    p.add_argument("--backup-workers", type=int, default=0, metavar="B",
                   help="--mode sync: each round takes the first W - B gradients and drops the rest")
    p.add_argument("--servers", type=int, default=1, metavar="S",
                   help="parameter-server shards (per stage with --plan)")
    p.add_argument("--transport", choices=TRANSPORTS, default="auto",
                   help="how gradients and parameters reach the servers: shared memory (processes placewise starts "
                        "on this machine), gloo messages, or auto (shared when possible)")
    p.add_argument("--dataset", choices=DATASETS, default="digits")
    p.add_argument("--epochs", type=int, default=None, metavar="E")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="K", help="server checkpoint every K updates")
    p.add_argument("--checkpoint", type=output_file_in_new_folder, metavar="PATH", help="checkpoint file")
    p.add_argument("--resume", metavar="CHECKPOINT", help="resume from a checkpoint")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--out", type=output_folder, metavar="DIR", help="folder for reports and pictures")
    p.add_argument("--json", action="store_true", help="print the final report as JSON on stdout")


def _add_simulate(add) -> None:
    p = add("simulate", "simulate a plan's pipeline schedule: predicted step time and timeline", cmd_simulate)
    p.add_argument("plan", type=input_file, metavar="PLAN.json", help="a plan made with --schedule/--microbatches")
    p.add_argument("--schedule", choices=SCHEDULES, help="another schedule than the plan's")
    p.add_argument("--microbatches", type=positive_int, metavar="M", help="another microbatch count than the plan's")
    p.add_argument("--picture", type=output_file, metavar="FILE.png", help="draw the predicted timeline of one step")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def _add_serve_bench(add) -> None:
    p = add("serve-bench", "measure pipelined inference throughput of a plan", cmd_serve_bench)
    p.add_argument("model", help="model name (as for profile) or package.module:factory")
    p.add_argument("--plan", metavar="PLAN.json", required=True)
    p.add_argument("--microbatches", type=int, default=4, metavar="M")
    p.add_argument("--batch-size", type=int, default=32, metavar="N")
    p.add_argument("--input-shape", type=int, nargs="+", metavar="D")
    p.add_argument("--steps", type=int, default=10, metavar="N")
    p.add_argument("--threads", type=int, default=1, metavar="T")
    p.add_argument("--graph", metavar="GRAPH.json", help="the profiled graph the plan came from (per-sample prediction)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")


def _add_demo(add) -> None:
    p = add("demo", "profile, plan, compare, pipeline-train and async-train a small model, with pictures", cmd_demo)
    p.add_argument("--out", type=output_folder, default="placewise-out", metavar="DIR", help="folder for pictures and files")
    p.add_argument("--quick", action="store_true", help="a reduced run (fewer repeats, steps and epochs)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="placewise", description="Optimal device placement of DNN operator graphs, "
                            "pipelined and asynchronous training, and optimizer fusion.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, func):
        p = sub.add_parser(name, help=help_text, description=help_text,
                           epilog=f"example:\n  {EXAMPLES[name]}" if name in EXAMPLES else None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    _add_evaluate(add)
    _add_plan(add)
    _add_compare(add)
    _add_profile(add)
    _add_export(add)
    _add_devices(add)
    _add_train(add)
    _add_simulate(add)
    _add_serve_bench(add)
    _add_demo(add)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Pictures go to files: matplotlib's file-only backend, chosen here, before anything imports it.
    os.environ["MPLBACKEND"] = "Agg"
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except PlacewiseError as e:
        print(f"placewise: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("placewise: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
