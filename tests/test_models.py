"""Models by name: the transformers families with size options, and user factories that fail."""

from __future__ import annotations

import textwrap

import pytest
import torch

from placewise.errors import PlacewiseError
from placewise.profile.models import FAMILIES, TRANSFORMERS, build_model

TINY = ["bert-tiny", "gpt2-tiny", "llama-tiny", "mistral-tiny", "t5-tiny", "bart-tiny", "vit-tiny"]


@pytest.mark.parametrize("name", TINY)
def test_tiny_transformers_build_offline_and_take_sizes(name):
    image = FAMILIES[TRANSFORMERS[name].family].image
    shape = (3, 32, 32) if image else (12,)
    model, (x,) = build_model(name, 2, shape, layers=3, hidden=64, heads=4)
    family = FAMILIES[TRANSFORMERS[name].family]
    config = model.model.config
    assert all(getattr(config, k) == 3 for k in family.layers)
    assert all(getattr(config, k) == 64 for k in family.hidden)
    assert all(getattr(config, k) == 4 for k in family.heads)
    with torch.no_grad():
        y = model(x)
    tokens = (32 // 16) ** 2 + 1 if image else 12
    assert y.shape == (2, tokens, 64)


def test_same_seed_same_weights_and_sizes_change_the_model():
    a, _ = build_model("llama-tiny", 1, (8,), seed=3)
    b, _ = build_model("llama-tiny", 1, (8,), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    bigger, _ = build_model("llama-tiny", 1, (8,), layers=4)
    assert sum(p.numel() for p in bigger.parameters()) > sum(p.numel() for p in a.parameters())


@pytest.mark.parametrize("kwargs, shape, words", [
    ({"hidden": 60, "heads": 8}, (8,), "not a multiple"),
    ({"heads": 0}, (8,), "--heads is 0"),
    ({"layers": 2}, (3, 32, 32), "transformers models only"),
])
def test_bad_sizes_are_one_line(kwargs, shape, words):
    name = "resnet18" if shape == (3, 32, 32) else "llama-tiny"
    with pytest.raises(PlacewiseError, match=words):
        build_model(name, 1, shape, **kwargs)


def test_vit_image_size_must_fit_patches():
    with pytest.raises(PlacewiseError, match="multiple of its 16-pixel patches"):
        build_model("vit-tiny", 1, (3, 30, 32))
    with pytest.raises(PlacewiseError, match="3 H W"):
        build_model("vit-tiny", 1, (16,))


def test_sequence_over_positions_is_one_line():
    with pytest.raises(PlacewiseError, match="over its 512 positions"):
        build_model("bert-tiny", 1, (600,))


FACTORIES = {
    "raises": ("def make():\n    raise RuntimeError('no weights here')\n", "RuntimeError: no weights here"),
    "syntax": ("def make(:\n    pass\n", "syntax error"),
    "imports": ("import no_such_module_anywhere\ndef make():\n    pass\n", "cannot import"),
    "on_import": ("raise ValueError('bad config')\n", "ValueError: bad config while importing"),
    "needs": ("def make(width, batch_size):\n    pass\n", "needs argument\\(s\\) width"),
}


@pytest.mark.parametrize("case", sorted(FACTORIES))
def test_failing_user_factories_are_one_line(case, tmp_path, monkeypatch):
    source, words = FACTORIES[case]
    module = f"placewise_factory_{case}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PlacewiseError, match=words) as info:
        build_model(f"{module}:make", 2, (4,))
    assert "\n" not in str(info.value)


def test_factory_gets_batch_size_and_input_shape(tmp_path, monkeypatch):
    (tmp_path / "placewise_factory_sized.py").write_text(
        "import torch\n"
        "def make(batch_size, input_shape=None):\n"
        "    return torch.nn.Linear(input_shape[0], 2), torch.zeros(batch_size, input_shape[0])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model, (x,) = build_model("placewise_factory_sized:make", 3, (5,))
    assert x.shape == (3, 5) and model.in_features == 5
