"""LiveTensorBytes counts what operators allocate, once per storage, and forgets what is freed."""

import torch

from placewise.run.tensor_memory import LiveTensorBytes


def test_counts_saved_activations_and_gradients_once():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(100, 200), torch.nn.ReLU(), torch.nn.Linear(200, 50))
    x = torch.randn(16, 100)
    params = sum(p.numel() * 4 for p in model.parameters())
    with LiveTensorBytes() as live:
        live.hold(model.parameters())
        y = model(x)
        # The ReLU's output (16 x 200, saved for the second Linear) and y (16 x 50); the first Linear's
        # output is freed once the ReLU has read it. Transposed weights are views: not counted.
        assert live.live == params + 16 * 200 * 4 + 16 * 50 * 4
        y.sum().backward()
        del y
    # Gradients as big as the parameters remain; the activations are gone.
    assert live.live == 2 * params
    assert live.peak >= 2 * params
    assert live.peak < 2 * params + 16 * 200 * 4 * 4


def test_a_freed_temporary_counts_towards_the_peak_only():
    with LiveTensorBytes() as live:
        t = torch.ones(1000)
        del t
    assert (live.live, live.peak) == (0, 4000)
