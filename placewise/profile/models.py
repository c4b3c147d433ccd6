"""Models by name, so `profile`, `train` and `serve-bench` build the same model from the same words.

Five kinds of name:
- `mlp`, `mlp:H` or `mlp:H1xH2`: the multilayer perceptron of data-parallel training (hidden widths
  H...; 64 inputs by default, as the digits data has, and 10 classes);
- `cnn` or `cnn:C1xC2`: a small convolutional classifier of 8x8 one-channel images (3x3 convolutions
  of widths C..., a max-pool, a hidden layer of 128; the CNN of data-parallel training on the digits);
- a torchvision classification model (`resnet18`, `resnet50`, `vgg16`, ...), random weights;
- a Hugging Face `transformers` architecture built from its config with random weights
  (`bert-base`, `bert-large`, `bert-tiny`, `gpt2`, `gpt2-medium`, `gpt2-tiny`); nothing is
  downloaded: the hub is switched offline before `transformers` is imported;
- `package.module:factory` for the user's own model: `factory()` returns an `nn.Module`, or a
  pair `(module, example_inputs)`.

Weights are drawn from a private random stream seeded by `seed`, so two builds with the same
arguments give the same weights and the caller's global RNG is left alone.
"""

from __future__ import annotations

import difflib
import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from placewise.errors import PlacewiseError

# Never reach the network for configs, weights or tokenizers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

DEFAULT_IMAGE_SHAPE = (3, 224, 224)
DEFAULT_SEQUENCE_LENGTH = 128
MLP_HIDDEN = (128,)
MLP_FEATURES, MLP_CLASSES = 64, 10  # scikit-learn's digits: 8x8 pixels, 10 classes
CNN_CHANNELS, CNN_IMAGE, CNN_HIDDEN = (32, 64), (1, 8, 8), 128  # the digits as 8x8 one-channel images


@dataclass(frozen=True)
class _Transformer:
    family: str  # "bert" or "gpt2"
    config: dict[str, Any]  # overrides of the family's config defaults


# The defaults of BertConfig() and GPT2Config() are bert-base and gpt2 (124M); the others resize them.
TRANSFORMERS: dict[str, _Transformer] = {
    "bert-base": _Transformer("bert", {}),
    "bert-large": _Transformer("bert", {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                                        "intermediate_size": 4096}),
    "bert-tiny": _Transformer("bert", {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                                       "intermediate_size": 512, "vocab_size": 1000}),
    "gpt2": _Transformer("gpt2", {}),
    "gpt2-medium": _Transformer("gpt2", {"n_embd": 1024, "n_layer": 24, "n_head": 16}),
    "gpt2-tiny": _Transformer("gpt2", {"n_embd": 128, "n_layer": 2, "n_head": 2, "vocab_size": 1000,
                                       "bos_token_id": 999, "eos_token_id": 999}),
}
_LAYER_KEY = {"bert": "num_hidden_layers", "gpt2": "n_layer"}


class TransformerBackbone(nn.Module):
    """A transformers encoder/decoder stack called with token ids, returning its last hidden state.

    Returning one tensor (rather than the library's output dataclass) keeps the traced graph's
    output plain, so pipeline stages and losses can consume it directly.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).last_hidden_state


def _widths(name: str, base: str, default: tuple[int, ...], what: str, example: str) -> tuple[int, ...] | None:
    """The widths W1xW2... of `base:W1xW2` (`default` for `base` alone); None when `name` is another model."""
    prefix, _, sizes = name.partition(":")
    if prefix != base:
        return None
    if not sizes:
        return default
    parts = sizes.split("x")
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise PlacewiseError(f"model {name!r}: {what} must be positive integers, e.g. {example}")
    return tuple(int(p) for p in parts)


def mlp_widths(name: str) -> tuple[int, ...] | None:
    """Hidden widths of `mlp`, `mlp:256` or `mlp:1024x1024`; None when `name` is not an MLP name."""
    return _widths(name, "mlp", MLP_HIDDEN, "hidden widths", "mlp:256 or mlp:512x512")


def cnn_widths(name: str) -> tuple[int, ...] | None:
    """Convolution widths of `cnn` or `cnn:32x64`; None when `name` is not a CNN name."""
    return _widths(name, "cnn", CNN_CHANNELS, "convolution widths", "cnn:32x64")


def build_mlp(hidden: Sequence[int], features: int, classes: int) -> nn.Sequential:
    """Linear and ReLU layers of the given hidden widths, drawn from the current random state."""
    layers: list[nn.Module] = []
    width = features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def build_cnn(channels: Sequence[int], image: Sequence[int] = CNN_IMAGE, classes: int = MLP_CLASSES) -> nn.Sequential:
    """One 3x3 convolution (padding 1) and ReLU per width, a 2x2 max-pool after the last, a hidden layer of
    CNN_HIDDEN and the classes, for images of shape `image` (C, H, W); drawn from the current random state.
    On the 8x8 digits it is a real task with a known good answer (about 98% test accuracy), small enough
    for a 2-core machine."""
    if len(image) != 3 or image[1] < 2 or image[2] < 2:
        raise PlacewiseError(f"model cnn: input shape {list(image)}; give channels, height and width, each "
                             f"side 2 or more (e.g. --input-shape 1 8 8)")
    layers: list[nn.Module] = []
    width = image[0]
    for c in channels:
        layers += [nn.Conv2d(width, c, 3, padding=1), nn.ReLU()]
        width = c
    layers += [nn.MaxPool2d(2), nn.Flatten(), nn.Linear(width * (image[1] // 2) * (image[2] // 2), CNN_HIDDEN),
               nn.ReLU(), nn.Linear(CNN_HIDDEN, classes)]
    return nn.Sequential(*layers)


def _torchvision_names() -> list[str]:
    import torchvision
    return sorted(torchvision.models.list_models(module=torchvision.models))


def model_names() -> list[str]:
    """Every built-in name (the MLP, torchvision classification models and the transformers configs)."""
    return ["mlp", "cnn", *sorted(TRANSFORMERS), *_torchvision_names()]


def _build_transformer(name: str, spec: _Transformer, layers: int | None) -> tuple[nn.Module, int]:
    import transformers
    overrides = dict(spec.config)
    if layers is not None:
        overrides[_LAYER_KEY[spec.family]] = layers
    if spec.family == "bert":
        config = transformers.BertConfig(**overrides)
        model = transformers.BertModel(config, add_pooling_layer=False)
    else:
        config = transformers.GPT2Config(**overrides)
        model = transformers.GPT2Model(config)
    return TransformerBackbone(model), config.vocab_size


def _import_factory(name: str) -> Callable[[], Any]:
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise PlacewiseError(f"model {name!r}: write a user model as package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise PlacewiseError(f"model {name!r}: cannot import {module_name} ({e}); check the module path and PYTHONPATH") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise PlacewiseError(f"model {name!r}: {module_name} has no callable {attr!r}; name a function or class that builds the model")
    return factory


def _unknown(name: str) -> PlacewiseError:
    close = difflib.get_close_matches(name, model_names(), n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return PlacewiseError(f"unknown model {name!r}; {hint}use mlp[:H1xH2...], cnn[:C1xC2...], a torchvision name (resnet18, vgg16, ...), "
                          f"a transformers config ({', '.join(sorted(TRANSFORMERS))}) or package.module:factory")


def _check_shape(name: str, batch_size: int, input_shape: Sequence[int] | None) -> None:
    if batch_size < 1:
        raise PlacewiseError(f"model {name!r}: batch size is {batch_size}; use 1 or more")
    if input_shape is not None and (not input_shape or any(int(d) < 1 for d in input_shape)):
        raise PlacewiseError(f"model {name!r}: input shape {list(input_shape)} has a size below 1; give positive sizes")


def build_model(name: str, batch_size: int = 8, input_shape: Sequence[int] | None = None, *,
                layers: int | None = None, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build a model by name with random weights and example inputs of `batch_size`.

    `input_shape` is the shape of one sample without the batch dimension: (3, 224, 224) for the
    torchvision models by default, (sequence length,) for the transformers (default 128). `layers`
    sets the number of transformer blocks (transformers only).
    """
    _check_shape(name, batch_size, input_shape)
    if layers is not None and layers < 1:
        raise PlacewiseError(f"model {name!r}: --layers is {layers}; use 1 or more")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name in TRANSFORMERS:
            if input_shape is not None and len(input_shape) != 1:
                raise PlacewiseError(f"model {name!r}: input shape {list(input_shape)}; a transformer takes one "
                                     "number, the sequence length (e.g. --input-shape 128)")
            model, vocab = _build_transformer(name, TRANSFORMERS[name], layers)
            seq = int(input_shape[0]) if input_shape else DEFAULT_SEQUENCE_LENGTH
            limit = getattr(model.model.config, "max_position_embeddings", None) or getattr(model.model.config, "n_positions")
            if seq > limit:
                raise PlacewiseError(f"model {name!r}: sequence length {seq} is over its {limit} positions; give a shorter --input-shape")
            return model, (torch.randint(0, vocab, (batch_size, seq)),)
        if layers is not None:
            raise PlacewiseError(f"model {name!r}: --layers applies to the transformers models only; leave it out")
        hidden = mlp_widths(name)
        if hidden is not None:
            if input_shape is not None and len(input_shape) != 1:
                raise PlacewiseError(f"model {name!r}: input shape {list(input_shape)}; an MLP takes one number, "
                                     f"its input features (e.g. --input-shape {MLP_FEATURES})")
            features = int(input_shape[0]) if input_shape else MLP_FEATURES
            return build_mlp(hidden, features, MLP_CLASSES), (torch.randn(batch_size, features),)
        channels = cnn_widths(name)
        if channels is not None:
            image = tuple(int(d) for d in input_shape) if input_shape else CNN_IMAGE
            return build_cnn(channels, image), (torch.randn(batch_size, *image),)
        if ":" in name:
            built = _import_factory(name)()
            if isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], nn.Module):
                model, inputs = built
                return model, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
            if not isinstance(built, nn.Module):
                raise PlacewiseError(f"model {name!r}: the factory returned a {type(built).__name__}; "
                                     "return an nn.Module or (nn.Module, example_inputs)")
            if input_shape is None:
                raise PlacewiseError(f"model {name!r}: the factory gives no example inputs; pass --input-shape "
                                     "(one sample's shape, without the batch)")
            return built, (torch.randn(batch_size, *map(int, input_shape)),)
        if name not in _torchvision_names():
            raise _unknown(name)
        import torchvision
        model = torchvision.models.get_model(name, weights=None)
        shape = tuple(int(d) for d in input_shape) if input_shape else DEFAULT_IMAGE_SHAPE
        return model, (torch.randn(batch_size, *shape),)
