"""Plans exported to torch's split_spec, torchtitan's module names, Megatron's layout string and DeepSpeed's
partition boundaries: each checked against the framework's own reading of it (torch's `pipeline` cuts the
model where placewise's cut does; the strings parse back to the same stages), and each refusing, in one
line, a plan it cannot express."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from placewise.errors import PlacewiseError
from placewise.export import (Call, Outline, deepspeed_partition, export_plan, megatron_layout,
                              module_names_per_stage, split_points)
from placewise.plan import Plan, Stage

ROOT = Path(__file__).resolve().parents[1]


def plan_from(stages: list[list[str]], contiguous: bool = True) -> Plan:
    """A plan whose stage s runs the operations named in stages[s] (pipeline order)."""
    return Plan([Stage("accelerator", s, True, [], 0.0, 0.0, 0.0, 0.0, modules=list(names))
                 for s, names in enumerate(stages)],
                max_load=0.0, latency=None, solver="test", seconds=0.0, contiguous=contiguous)


def cut_before(outline: Outline, starts: list[str]) -> Plan:
    """The plan that starts a new stage at each operation named in `starts` (in run order)."""
    names = [c.name for c in outline.calls]
    bounds = [0, *(names.index(s) for s in starts), len(names)]
    return plan_from([names[a:b] for a, b in zip(bounds, bounds[1:])])


def parse_megatron(layout: str) -> list[list[str]]:
    """Megatron's documented grammar: commas cosmetic, (..)*n and x*n repeat, '|' splits stages."""
    text = layout.replace(",", "")
    text = re.sub(r"\(([^)]+)\)\*(\d+)", lambda m: m.group(1) * int(m.group(2)), text)
    text = re.sub(r"(.)\*(\d+)", lambda m: m.group(1) * int(m.group(2)), text)
    return [list(stage) for stage in text.split("|")]


# ---- a small GPT, outlined by hand: embedding (and two functions after it), 4 layers (attention, MLP,
# residual adds), norm, head ----
def tiny_gpt(layers: int = 4) -> Outline:
    calls = [Call("tok", ("emb",)), Call("arange"), Call("pos", ("pos",)), Call("add"), Call("scale")]
    for i in range(layers):
        block = ("layers", f"layers.{i}")
        calls += [Call(f"l{i}_ln1", (*block, f"layers.{i}.ln1")), Call(f"l{i}_attn", (*block, f"layers.{i}.attn")),
                  Call(f"l{i}_add1", block), Call(f"l{i}_mlp", (*block, f"layers.{i}.mlp")), Call(f"l{i}_add2", block)]
    calls += [Call("norm", ("norm",)), Call("head", ("head",))]
    layer_names = tuple(f"layers.{i}" for i in range(layers))
    children = {"": ("emb", "pos", "layers", "norm", "head"), "layers": layer_names,
                **{name: (f"{name}.ln1", f"{name}.attn", f"{name}.mlp") for name in layer_names}}
    classes = {"": "GPT", "emb": "Embedding", "pos": "Embedding", "layers": "ModuleList", "norm": "LayerNorm",
               "head": "Linear", **{name: "Block" for name in layer_names}}
    return Outline(tuple(calls), children, {"layers": "list"}, classes, {})


def test_the_torch_free_formats_import_no_torch():
    code = ("import sys, placewise.export as e; e.megatron_layout, e.deepspeed_partition, e.split_points; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_megatron_layout_of_a_layer_granular_plan_parses_back_to_its_layer_counts():
    outline = tiny_gpt()
    plan = cut_before(outline, ["l1_ln1", "l3_ln1"])
    text = megatron_layout(plan, outline)
    assert text == "E,t|t*2|t,L"
    assert [stage.count("t") for stage in parse_megatron(text)] == [1, 2, 1]
    assert parse_megatron(text)[0][0] == "E" and parse_megatron(text)[-1][-1] == "L"
    # The embedding alone on the first stage, the head alone on the last: empty layer lists are legal.
    alone = cut_before(outline, ["l0_ln1", "norm"])
    assert megatron_layout(alone, outline) == "E|t*4|L"
    assert megatron_layout(plan_from([[c.name for c in outline.calls]]), outline) == "E,t*4,L"


@pytest.mark.parametrize("starts,reason", [
    (["l1_attn"], "cuts inside transformer layer layers.1"),
    (["pos"], "runs before the first transformer layer"),
    (["l2_ln1", "head"], "runs after the last transformer layer"),
])
def test_megatron_refuses_what_its_layout_cannot_say(starts, reason):
    outline = tiny_gpt()
    with pytest.raises(PlacewiseError, match=reason):
        megatron_layout(cut_before(outline, starts), outline)


def test_megatron_finds_the_layers_or_asks_for_them():
    outline = tiny_gpt()
    assert megatron_layout(cut_before(outline, ["l2_ln1"]), outline, layers="layers") == "E,t*2|t*2,L"
    twin = Outline(outline.calls, {**outline.children, "": (*outline.children[""], "more"),
                                   "more": ("more.0", "more.1", "more.2", "more.3")},
                   {"layers": "list", "more": "list"}, {**outline.classes, **{f"more.{i}": "X" for i in range(4)}}, {})
    with pytest.raises(PlacewiseError, match="both hold 4 layers"):
        megatron_layout(cut_before(twin, ["l2_ln1"]), twin)


def test_torchtitan_names_whole_blocks_per_stage():
    outline = tiny_gpt()
    names = module_names_per_stage(cut_before(outline, ["l2_ln1", "norm"]), outline)
    assert names == [["emb", "pos", "layers.0", "layers.1"], ["layers.2", "layers.3"], ["norm", "head"]]
    with pytest.raises(PlacewiseError, match="cuts inside module layers.2"):
        module_names_per_stage(cut_before(outline, ["l2_mlp"]), outline)


def test_deepspeed_parts_index_the_layer_list():
    outline = tiny_gpt()
    part = deepspeed_partition(cut_before(outline, ["l2_ln1", "norm"]), outline)
    assert part.layers == ["emb", "pos", "layers.0", "layers.1", "layers.2", "layers.3", "norm", "head"]
    assert part.parts == [0, 4, 6, 8]
    assert part.stage_layers() == [["emb", "pos", "layers.0", "layers.1"], ["layers.2", "layers.3"], ["norm", "head"]]
    # A user's own layer list (embedding folded into one layer spec elsewhere: only the blocks and the head).
    mine = deepspeed_partition(cut_before(outline, ["l2_ln1", "norm"]), outline,
                               layers=["layers.0", "layers.1", "layers.2", "layers.3", "head"])
    assert mine.parts == [0, 2, 4, 5]
    with pytest.raises(PlacewiseError, match="comes after"):
        deepspeed_partition(cut_before(outline, ["l2_ln1"]), outline, layers=["layers.3", "layers.0"])
    with pytest.raises(PlacewiseError, match="run no operation"):
        deepspeed_partition(cut_before(outline, ["l2_ln1"]), outline, layers=["layers.0", "layers.2", "nothing"])


def test_every_format_refuses_plans_that_are_not_splits_of_the_forward_in_run_order():
    outline = tiny_gpt()
    names = [c.name for c in outline.calls]
    swapped = plan_from([names[5:], names[:5]])  # the second stage runs first
    for fmt in ("torch", "torchtitan", "megatron", "deepspeed"):
        with pytest.raises(PlacewiseError, match="not a split of the forward pass"):
            export_plan(swapped, outline, fmt)
    with pytest.raises(PlacewiseError, match="not contiguous"):
        export_plan(plan_from([names[:5], names[5:]], contiguous=False), outline, "torch")
    with pytest.raises(PlacewiseError, match="does not place 1 operation"):
        export_plan(plan_from([names[:5], names[5:-1]]), outline, "megatron")
    with pytest.raises(PlacewiseError, match="stage 1 holds no whole module"):
        export_plan(cut_before(outline, ["arange", "pos"]), outline, "torchtitan")
    uneven = plan_from([names[:5], names[5:]])
    uneven.stages[1].replicas = 2
    with pytest.raises(PlacewiseError, match=r"have \[1, 2\] replicas"):
        export_plan(uneven, outline, "deepspeed")
    with pytest.raises(PlacewiseError, match="--format 'onnx'"):
        export_plan(cut_before(outline, ["pos"]), outline, "onnx")


def test_torch_split_points_sit_where_a_module_begins_or_ends():
    outline = tiny_gpt()
    assert split_points(cut_before(outline, ["l1_ln1", "norm"]), outline) == {"layers.1": "BEGINNING",
                                                                             "norm": "BEGINNING"}
    # Inside a block: the cut before the MLP is the MLP's beginning; before a residual add, the attention's end.
    assert split_points(cut_before(outline, ["l1_mlp"]), outline) == {"layers.1.mlp": "BEGINNING"}
    assert split_points(cut_before(outline, ["l1_add1"]), outline) == {"layers.1.attn": "END"}
    assert split_points(cut_before(outline, ["l1_add2"]), outline) == {"layers.1.mlp": "END"}
    with pytest.raises(PlacewiseError, match="starts at scale, where no module"):
        split_points(cut_before(outline, ["scale"]), outline)
    # A module whose forward runs twice would cut twice: never chosen.
    twice = Outline(outline.calls, outline.children, outline.containers, outline.classes, {"layers.1.mlp": 2})
    with pytest.raises(PlacewiseError, match="starts at l1_mlp"):
        split_points(cut_before(twice, ["l1_mlp"]), twice)


# ---- against torch's own pipeline: resnet18 and a 12-layer GPT-2 config, random weights ------------------------
torch_only = pytest.mark.torch


def _stage_parameters(model, example_inputs, plan, outline):
    """Per stage, the parameter names of placewise's own cut and of torch's `pipeline` given the export."""
    pytest.importorskip("torch")
    from torch.distributed.pipelining import pipeline

    from placewise.export import to_torch_split_spec
    from placewise.run.cut import cut, record_values, trace
    gm = trace(model, example_inputs)
    mapping = {name: s for s, stage in enumerate(plan.stages) for name in stage.modules}
    parts = cut(gm, mapping, record_values(gm, example_inputs))
    ours = [sorted(n for n, _ in part.module.named_parameters()) for part in parts]
    pipe = pipeline(copy.deepcopy(model), example_inputs, split_spec=to_torch_split_spec(plan, outline=outline))
    theirs = [sorted(n for n, _ in pipe.get_stage_module(i).named_parameters()) for i in range(pipe.num_stages)]
    return ours, theirs


@torch_only
def test_torch_pipeline_cuts_resnet18_where_placewise_does():
    pytest.importorskip("torchvision")
    from placewise.export import outline_model
    from placewise.profile import build_model
    model, inputs = build_model("resnet18", batch_size=2, input_shape=(3, 32, 32))
    outline = outline_model(model, inputs)
    # A block boundary, a cut inside a block (before conv2; the downsample still follows), a cut at the flatten.
    plan = cut_before(outline, ["layer2_0_conv1", "layer3_0_conv2", "flatten"])
    assert split_points(plan, outline) == {"layer2": "BEGINNING", "layer3.0.conv2": "BEGINNING", "avgpool": "END"}
    ours, theirs = _stage_parameters(model, inputs, plan, outline)
    assert len(theirs) == 4 and ours == theirs
    assert "layer3.0.downsample.0.weight" in theirs[2]


@pytest.fixture(scope="module")
def gpt2():
    pytest.importorskip("transformers")
    from placewise.export import outline_model
    from placewise.profile import build_model
    model, inputs = build_model("gpt2-tiny", batch_size=2, input_shape=(8,), layers=12)
    return model, inputs, outline_model(model, inputs)


@torch_only
def test_torch_pipeline_cuts_gpt2_where_placewise_does(gpt2):
    model, inputs, outline = gpt2
    plan = cut_before(outline, ["model_h_4_ln_1", "model_h_9_ln_1"])
    assert split_points(plan, outline) == {"model.h.4": "BEGINNING", "model.h.9": "BEGINNING"}
    ours, theirs = _stage_parameters(model, inputs, plan, outline)
    assert len(theirs) == 3 and ours == theirs


@torch_only
def test_a_12_layer_gpt2_plan_in_every_format(gpt2):
    _, _, outline = gpt2
    plan = cut_before(outline, ["model_h_4_ln_1", "model_h_9_ln_1"])
    layout = megatron_layout(plan, outline)
    assert [stage.count("t") for stage in parse_megatron(layout)] == [4, 5, 3]
    assert export_plan(plan, outline, "megatron") == {"pipeline_model_parallel_size": 3,
                                                      "pipeline_model_parallel_layout": layout}
    names = module_names_per_stage(plan, outline, root="model")
    assert names[0][:3] == ["model.wte", "model.wpe", "model.drop"]
    assert [sum(n.startswith("model.h.") for n in stage) for stage in names] == [4, 5, 3]
    assert names[2][-1] == "model.ln_f"
    assert deepspeed_partition(plan, outline, root="model").parts == [0, 7, 12, 16]
    with pytest.raises(PlacewiseError, match="cuts inside transformer layer model.h.6"):
        megatron_layout(cut_before(outline, ["model_h_6_mlp_c_fc"]), outline)


def chain_graph(outline: Outline):
    """A profiled-like graph of the outline: one node per operation, a chain, uneven times."""
    from placewise.graph import Edge, Node, OpGraph
    nodes = [Node(i, c.name, 1.0 + (i * 7) % 5, 10.0, 1.0, True, module=c.name) for i, c in enumerate(outline.calls)]
    edges = [Edge(i, i + 1, 0.1, 100.0) for i in range(len(nodes) - 1)]
    return OpGraph.build(nodes, edges, name="tiny-gpt")


@pytest.mark.parametrize("fmt", ["torch", "torchtitan", "megatron", "deepspeed"])
def test_plans_of_the_colocated_graph_always_export(fmt):
    from placewise.export import colocate_for
    from placewise.graph import Cluster
    from placewise.plan import solve
    outline = tiny_gpt(layers=6)
    graph = chain_graph(outline)
    colocated = colocate_for(graph, outline, fmt)
    for k in (2, 3, 4):
        plan = solve(colocated, Cluster.simple(k), "dp")
        export_plan(plan, outline, fmt)  # raises if the format cannot say it
    classes = {n.module: n.colocate for n in colocated.nodes}
    if fmt != "torch":  # a block is one class; the torch cut may fall inside a block, at a module boundary
        assert len({classes[f"l2_{part}"] for part in ("ln1", "attn", "add1", "mlp", "add2")}) == 1
    assert classes["scale"] == classes["add"]  # between two functions no module begins or ends: never a cut
    if fmt == "megatron":
        assert classes["tok"] == classes["scale"] and classes["norm"] == classes["head"]


def test_render_gives_each_framework_its_own_text():
    from placewise.export import render
    outline = tiny_gpt()
    plan = cut_before(outline, ["l2_ln1", "norm"])
    texts = {fmt: render(fmt, export_plan(plan, outline, fmt))
             for fmt in ("torch", "torchtitan", "megatron", "deepspeed")}
    assert texts["torch"] == '{"layers.2": SplitPoint.BEGINNING, "norm": SplitPoint.BEGINNING}'
    assert texts["torchtitan"].startswith('module_fqns_per_model_part = [["emb", "pos", "layers.0", "layers.1"], ')
    assert texts["megatron"] == '--pipeline-model-parallel-size 3 --pipeline-model-parallel-layout "E,t*2|t*2|L"'
    assert texts["deepspeed"].startswith("parts = [0, 4, 6, 8]  # over layers [")


def test_placewise_export_prints_each_format_and_refuses_in_one_line(tmp_path):
    pytest.importorskip("torch")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "placewise.cli", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})

    assert cli("profile", "mlp:64x64x64", "--training", "--repeats", "1", "--out", "g.json").returncode == 0
    assert cli("plan", "g.json", "-k", "2", "--out", "p.json").returncode == 0
    torch_spec = cli("export", "p.json", "--format", "torch", "--training", "--json")
    assert torch_spec.returncode == 0, torch_spec.stderr
    assert list(json.loads(torch_spec.stdout).values()) == ["BEGINNING"]
    titan = cli("export", "p.json", "--format", "torchtitan", "--training")
    assert titan.returncode == 0 and titan.stdout.startswith("module_fqns_per_model_part = [[\"0\"")
    megatron = cli("export", "p.json", "--format", "megatron", "--training")
    assert megatron.returncode == 2 and megatron.stdout == ""
    assert megatron.stderr.strip().count("\n") == 0 and "no list of same-class layers" in megatron.stderr
    assert cli("export", "p.json", "--format", "onnx").returncode == 2
