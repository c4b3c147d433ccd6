"""The profiler on real models: graphs that validate, names that map back to the traced model,
per-node times that add up to the whole forward pass, plans on device files, clear errors, and a
model left exactly as it was."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from placewise.cli import main
from placewise.graph import load_graph
from placewise.graph.formats import DEFAULT_BANDWIDTH
from placewise.profile import build_model, profile_model, trace_model
from placewise.profile.trace import CALL_OPS

pytestmark = pytest.mark.torch

DATA = Path(__file__).resolve().parents[1] / "placewise" / "data"
# Measured on the shared 2-core test machine under load from other jobs (one thread, process CPU
# time, medians of 5): resnet18 64x64 batch 2 gave 0.98-1.02, bert-tiny batch 2 x 128 gave 0.95.
# The whole forward also pays the eager model's Python glue that the traced nodes do not, so the
# ratio sits a little under 1 for small transformers.
RATIO_BOUND = 0.2


def _call_names(gm: torch.fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op in CALL_OPS]


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """resnet18 profiled through the CLI, with a device file and the paper export."""
    out = tmp_path_factory.mktemp("resnet")
    argv = ["profile", "resnet18", "--batch-size", "2", "--input-shape", "3", "64", "64", "--repeats", "5",
            "--devices", str(DATA / "cluster-2.yaml"), "--out", str(out / "g.json"),
            "--export-paper", str(out / "paper.json"), "--json"]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def bert():
    model, inputs = build_model("bert-tiny", 2, (128,))
    return model, inputs, profile_model(model, inputs, name="bert-tiny", repeats=5)


@pytest.fixture(scope="module")
def trained():
    """A training profile of a model with batch norm, frozen parameters and existing gradients,
    with its state captured before profiling."""
    model, inputs = build_model("resnet18", 2, (3, 32, 32))
    model.eval()
    for p in model.layer1.parameters():
        p.requires_grad_(False)
    model.fc.weight.grad = torch.full_like(model.fc.weight, 0.5)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grad_before = model.fc.weight.grad
    graph = profile_model(model, inputs, name="resnet18", training=True, repeats=3, optimizer="adam")
    return model, inputs, graph, before, grad_before


def test_profiled_graph_validates_and_round_trips(resnet):
    graph = load_graph(resnet / "g.json")
    meta = graph.meta_dict
    assert graph.name == "resnet18" and meta["tracer"] == "fx" and meta["time_unit"] == "ms"
    assert graph.cluster is not None and graph.cluster.accelerators == 2
    assert all(n.acc_time >= 0 and n.memory > 0 for n in graph.nodes)
    # On CPU the node times are scaled to add up to the whole model's run (`scaled_to_whole`).
    assert sum(n.acc_time for n in graph.nodes) == pytest.approx(float(meta["whole_forward_ms"]), rel=1e-4)
    assert sum(n.cpu_time for n in graph.nodes) == pytest.approx(float(meta["whole_forward_ms"]), rel=1e-4)
    paper = load_graph(resnet / "paper.json")
    assert len(paper.nodes) == len(graph.nodes)
    # The paper's JSON has no speeds: accelerator times are divided by the device file's 20.
    for a, b in zip(graph.nodes, paper.nodes):
        assert b.acc_time == pytest.approx(a.acc_time / 20) and b.cpu_time == pytest.approx(a.cpu_time)


def test_edge_bytes_and_memory_match_the_model(resnet):
    graph = load_graph(resnet / "g.json")
    model, _ = build_model("resnet18", 2, (3, 64, 64))
    by_module = {n.module: n for n in graph.nodes}
    conv1 = by_module["conv1"]
    out_bytes = 2 * 64 * 32 * 32 * 4  # conv1 halves 64x64 and has 64 channels, float32
    edges = [e for e in graph.edges if e.src == conv1.id]
    assert edges and all(e.bytes == out_bytes for e in edges)
    # Transfer cost: bytes over the device file's 12 GB/s, in milliseconds.
    assert edges[0].transfer_cost == pytest.approx(out_bytes / 12e9 * 1000)
    assert conv1.memory == model.conv1.weight.numel() * 4 + out_bytes
    # Every parameter and buffer is counted once, at its first user.
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    activations = sum(max([e.bytes for e in graph.edges if e.src == n.id], default=0) for n in graph.nodes)
    output = 2 * 1000 * 4  # the logits leave the graph without an edge
    assert sum(n.memory for n in graph.nodes) == state + activations + output


def test_modules_name_the_fx_nodes_and_tracing_is_deterministic(resnet, bert):
    graph = load_graph(resnet / "g.json")
    model, inputs = build_model("resnet18", 2, (3, 64, 64))
    first, second = trace_model(model, inputs), trace_model(model, inputs)
    assert _call_names(first) == _call_names(second)
    assert [n.module for n in graph.nodes] == _call_names(first)
    bert_model, bert_inputs, bert_graph = bert
    bert_model.eval()  # the profile traced it for inference
    retraced = trace_model(bert_model, bert_inputs)
    assert [n.module for n in bert_graph.nodes] == _call_names(retraced)
    # The export path folds leaf modules back into call_module nodes.
    targets = {n.target for n in retraced.graph.nodes if n.op == "call_module"}
    assert "model.encoder.layer.0.attention.self.query" in targets
    # Cutting by the graph's names: running the retraced graph reproduces the model.
    with torch.no_grad():
        assert torch.allclose(retraced(*bert_inputs), bert_model(*bert_inputs), atol=1e-5)


def test_operator_granularity_is_finer():
    model, inputs = build_model("gpt2-tiny", 2, (16,))
    model.eval()
    layer, operator = trace_model(model, inputs, "layer"), trace_model(model, inputs, "operator")
    conv1d = [n for n in layer.graph.nodes if n.op == "call_module"
              and type(layer.get_submodule(n.target)).__name__ == "Conv1D"]
    assert conv1d, "GPT-2's Conv1D (view, addmm, view) should fold into one call_module at layer granularity"
    assert len(_call_names(operator)) > len(_call_names(layer))
    with torch.no_grad():
        expected = model(*inputs)
        assert torch.allclose(layer(*inputs), expected, atol=1e-5)
        assert torch.allclose(operator(*inputs), expected, atol=1e-5)
        # The batch dimension stays symbolic: a pipeline's micro-batches of another size run too.
        assert torch.allclose(layer(inputs[0][:1]), model(inputs[0][:1]), atol=1e-5)


def test_forward_sum_matches_whole_forward(resnet, bert):
    resnet_ratio = float(load_graph(resnet / "g.json").meta_dict["forward_ratio"])
    bert_ratio = float(bert[2].meta_dict["forward_ratio"])
    assert abs(resnet_ratio - 1) <= RATIO_BOUND, resnet_ratio
    assert abs(bert_ratio - 1) <= RATIO_BOUND, bert_ratio


def test_training_graph_mirrors_forward(trained):
    model, _, graph, _, _ = trained
    forward = [n for n in graph.nodes if not n.backward]
    backward = {n.colocate: n for n in graph.nodes if n.backward}
    assert len(backward) == len(forward)
    assert all(backward[n.id].colocate == n.colocate == n.id and backward[n.id].module == n.module for n in forward)
    fwd_edges = {(e.src, e.dst) for e in graph.edges if not graph.node(e.src).backward}
    bwd_edges = {(graph.node(e.dst).colocate, graph.node(e.src).colocate) for e in graph.edges
                 if graph.node(e.src).backward}
    assert bwd_edges and bwd_edges <= fwd_edges  # backward edges are forward edges reversed
    assert sum(n.acc_time for n in backward.values()) == pytest.approx(float(graph.meta_dict["whole_backward_ms"]),
                                                                       rel=1e-4)
    # Gradients plus Adam's two moments for the trainable parameters only (layer1 is frozen).
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert sum(n.memory for n in backward.values()) == 3 * trainable
    assert float(graph.meta_dict["backward_ratio"]) > 0 and graph.meta_dict["mode"] == "train"
    # One Adam step over the trainable parameters was timed (the simulation's per-stage update).
    assert float(graph.meta_dict["cpu_update_ms"]) > 0


def test_profiling_leaves_the_model_unchanged(trained):
    model, _, _, before, grad_before = trained
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # batch-norm statistics included
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.layer1.parameters())
    assert all(p.requires_grad for p in model.layer2.parameters())
    assert model.fc.weight.grad is grad_before and model.conv1.weight.grad is None
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())


def _plan(tmp_path: Path, graph: Path, devices: str, capsys) -> dict:
    assert main(["plan", str(graph), "--devices", str(DATA / devices), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("devices,count", [("cluster-2.yaml", 2), ("cluster-4.yaml", 4)])
def test_plan_on_profiled_graph_maps_stages_to_modules(resnet, tmp_path, capsys, devices, count):
    graph = load_graph(resnet / "g.json")
    model, inputs = build_model("resnet18", 2, (3, 64, 64))
    names = set(_call_names(trace_model(model, inputs)))
    plan = _plan(tmp_path, resnet / "g.json", devices, capsys)
    assert plan["feasible"] and plan["solver"] == "dp"
    assert 1 < len(plan["stages"]) <= count
    placed = [n for s in plan["stages"] for n in s["nodes"]]
    assert sorted(placed) == sorted(n.id for n in graph.nodes)
    for stage in plan["stages"]:
        assert stage["modules"] == [graph.node(n).module for n in stage["nodes"]]
        assert set(stage["modules"]) <= names


def _user_module(tmp_path: Path, monkeypatch, name: str, body: str) -> str:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_untraceable_model_exits_2(tmp_path, monkeypatch, capsys):
    module = _user_module(tmp_path, monkeypatch, "pw_branchy_model", """
        import torch
        class Branchy(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(4, 4)
            def forward(self, x):
                y = self.fc(x)
                if y.sum() > 0:  # control flow on a tensor's value
                    return y * 2
                return y
        def build():
            return Branchy()
    """)
    assert main(["profile", f"{module}:build", "--input-shape", "4", "--batch-size", "2", "--repeats", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("placewise: error: cannot trace Branchy") and "\n" not in err
    assert "torch.fx" in err and "torch.export" in err


def test_user_factory_with_inputs_profiles(tmp_path, monkeypatch, capsys):
    module = _user_module(tmp_path, monkeypatch, "pw_mlp_model", """
        import torch
        def build():
            model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
            return model, (torch.randn(4, 32),)
    """)
    assert main(["profile", f"{module}:build", "--repeats", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["forward_nodes"] == 3 and summary["inputs"] == "[4, 32]"


@pytest.mark.parametrize("argv,words", [
    (["profile", "resnet19"], ["unknown model 'resnet19'", "did you mean", "resnet18"]),
    (["profile", "nosuchpackage.mod:build"], ["cannot import nosuchpackage.mod"]),
    (["profile", "resnet18", "--batch-size", "1", "--input-shape", "5", "8", "8"], ["forward pass", "--input-shape"]),
    (["profile", "bert-tiny", "--input-shape", "9999"], ["over its 512 positions"]),
    (["profile", "resnet18", "--layers", "2"], ["--layers applies to the transformers models only"]),
    (["profile", "resnet18", "--devices", "/nonexistent/c.yaml"], ["no such device file"]),
    (["profile", "resnet18", "--input-shape", "3", "32", "32", "--batch-size", "2", "--device", "tpu"], ["--device"]),
])
def test_profile_errors_exit_2_with_one_line(capsys, argv, words):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("placewise: error:") and "\n" not in err
    for word in words:
        assert word in err


def test_devices_reports_this_machine(tmp_path, capsys):
    assert main(["devices", "--json", "--out", str(tmp_path / "here.yaml")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cpu"]["cores"] >= 1 and info["memory"] > 0
    assert len(info["cuda"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    from placewise.graph.devicefile import load_device_file
    cluster = load_device_file(tmp_path / "here.yaml")
    assert cluster.cpus == info["cpu"]["usable_cores"] and cluster.accelerators == len(info["cuda"])
    assert cluster.bandwidth == DEFAULT_BANDWIDTH


def test_inference_profile_splits_memory(resnet):
    graph = load_graph(resnet / "g.json")  # through the graph JSON, version 2
    model, _ = build_model("resnet18", 2, (3, 64, 64))
    assert all(n.memory == n.parameters + n.output for n in graph.nodes)
    assert all(n.activations == n.gradients == n.optimizer_state == 0.0 for n in graph.nodes)
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert sum(n.parameters for n in graph.nodes) == state
    conv1 = next(n for n in graph.nodes if n.module == "conv1")
    assert conv1.output == 2 * 64 * 32 * 32 * 4


def test_training_profile_splits_memory(trained):
    model, _, graph, _, _ = trained
    forward = [n for n in graph.nodes if not n.backward]
    backward = [n for n in graph.nodes if n.backward]
    assert all(n.memory == n.parameters + n.output and n.gradients == n.optimizer_state == 0.0 for n in forward)
    assert all(n.memory == n.gradients + n.optimizer_state and n.parameters == n.activations == 0.0 for n in backward)
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert sum(n.gradients for n in backward) == trainable
    assert sum(n.optimizer_state for n in backward) == 2 * trainable  # Adam's two moments
    # conv1 saves the input batch for its weight gradient; a block's ReLU saves its output (2 x 64 x 8 x 8
    # floats), and the convolution after it saves the same tensor again, charged to the ReLU only
    by_module = {n.module: n for n in forward}
    assert by_module["conv1"].activations == 2 * 3 * 32 * 32 * 4
    assert by_module["layer1_0_relu"].activations == 2 * 64 * 8 * 8 * 4 and by_module["layer1_0_conv2"].activations == 0


@pytest.mark.parametrize("optimizer,states", [("sgd", 0), ("momentum", 1), ("adamw", 2)])
def test_saved_activations_and_optimizer_state_by_hand(optimizer, states):
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    graph = profile_model(model, (torch.randn(4, 32),), training=True, repeats=1, warmup=0, optimizer=optimizer)
    fc1, relu, fc2 = (n for n in graph.nodes if not n.backward)
    # fc1 saves its input (4 x 32 floats); the ReLU its output (4 x 64), which fc2 saves again: one tensor,
    # charged once, to the ReLU
    assert (fc1.activations, relu.activations, fc2.activations) == (4 * 32 * 4, 4 * 64 * 4, 0.0)
    assert (fc1.output, relu.output, fc2.output) == (4 * 64 * 4, 4 * 64 * 4, 4 * 8 * 4)
    assert (fc1.parameters, relu.parameters, fc2.parameters) == ((32 * 64 + 64) * 4, 0.0, (64 * 8 + 8) * 4)
    back = {n.colocate: n for n in graph.nodes if n.backward}
    assert back[fc2.id].gradients == fc2.parameters and back[fc2.id].optimizer_state == states * fc2.parameters
    # a backward node outputs the gradients of its inputs: none for fc1 (the data needs none)
    assert back[fc1.id].output == 0.0 and back[fc2.id].output == 4 * 64 * 4
