"""Models by name, so `profile`, `train` and `serve-bench` build the same model from the same words.

Five kinds of name:
- `mlp`, `mlp:H` or `mlp:H1xH2`: the multilayer perceptron of data-parallel training (hidden widths
  H...; 64 inputs by default, as the digits data has, and 10 classes);
- `cnn` or `cnn:C1xC2`: a small convolutional classifier of 8x8 one-channel images (3x3 convolutions
  of widths C..., a max-pool, a hidden layer of 128; the CNN of data-parallel training on the digits);
- a torchvision classification model (`resnet18`, `resnet50`, `vgg16`, ...), random weights;
- a Hugging Face `transformers` architecture built from its config with random weights (BERT,
  GPT-2, Llama, Mistral, T5, BART, ViT: see TRANSFORMERS), resized by `layers`, `hidden` and
  `heads`; nothing is downloaded: the hub is switched offline before `transformers` is imported;
- `package.module:factory` for the user's own model: `factory()` (given `batch_size` and
  `input_shape` when it takes them) returns an `nn.Module`, or a pair `(module, example_inputs)`.

Weights are drawn from a private random stream seeded by `seed`, so two builds with the same
arguments give the same weights and the caller's global RNG is left alone.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
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
class _Family:
    """How to build one `transformers` architecture and which config keys the size options set."""

    config: str  # the transformers config class
    model: str  # the transformers model class
    layers: tuple[str, ...]  # keys set by `layers` (an encoder-decoder sets both stacks)
    hidden: tuple[str, ...]  # keys set by `hidden`
    heads: tuple[str, ...]  # keys set by `heads`
    ffn: tuple[str, ...]  # feed-forward widths, kept at `ffn_ratio` x hidden when `hidden` is given
    ffn_ratio: float = 4.0
    head_dim: str | None = None  # a key that must equal hidden // heads (T5's d_kv)
    kv_heads: str | None = None  # grouped-query heads: must divide `heads`
    image: bool = False  # takes (3, H, W) images instead of token ids
    decoder_ids: bool = False  # also needs decoder token ids (T5); BART derives them from the input
    model_kwargs: tuple[tuple[str, Any], ...] = ()


_LLAMA = dict(config="LlamaConfig", model="LlamaModel", layers=("num_hidden_layers",), hidden=("hidden_size",),
              heads=("num_attention_heads",), ffn=("intermediate_size",), ffn_ratio=2.6875,
              kv_heads="num_key_value_heads")
FAMILIES: dict[str, _Family] = {
    "bert": _Family("BertConfig", "BertModel", ("num_hidden_layers",), ("hidden_size",), ("num_attention_heads",),
                    ("intermediate_size",), model_kwargs=(("add_pooling_layer", False),)),
    "gpt2": _Family("GPT2Config", "GPT2Model", ("n_layer",), ("n_embd",), ("n_head",), ()),
    "llama": _Family(**_LLAMA),
    "mistral": _Family(**{**_LLAMA, "config": "MistralConfig", "model": "MistralModel", "ffn_ratio": 3.5}),
    "t5": _Family("T5Config", "T5Model", ("num_layers", "num_decoder_layers"), ("d_model",), ("num_heads",), ("d_ff",),
                  head_dim="d_kv", decoder_ids=True),
    "bart": _Family("BartConfig", "BartModel", ("encoder_layers", "decoder_layers"), ("d_model",),
                    ("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")),
    "vit": _Family("ViTConfig", "ViTModel", ("num_hidden_layers",), ("hidden_size",), ("num_attention_heads",),
                   ("intermediate_size",), image=True, model_kwargs=(("add_pooling_layer", False),)),
}


@dataclass(frozen=True)
class _Transformer:
    family: str  # a key of FAMILIES
    config: dict[str, Any]  # overrides of the family's config defaults


_SMALL_VOCAB = {"vocab_size": 1000}
# Config defaults are bert-base, gpt2 (124M), Llama-7B, Mistral-7B, t5-small, bart-large and
# vit-base-patch16-224; the others resize them. The 7B defaults are too big to build here, so the
# Llama and Mistral names are scaled down.
TRANSFORMERS: dict[str, _Transformer] = {
    "bert-base": _Transformer("bert", {}),
    "bert-large": _Transformer("bert", {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                                        "intermediate_size": 4096}),
    "bert-tiny": _Transformer("bert", {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                                       "intermediate_size": 512, **_SMALL_VOCAB}),
    "gpt2": _Transformer("gpt2", {}),
    "gpt2-medium": _Transformer("gpt2", {"n_embd": 1024, "n_layer": 24, "n_head": 16}),
    "gpt2-tiny": _Transformer("gpt2", {"n_embd": 128, "n_layer": 2, "n_head": 2, **_SMALL_VOCAB,
                                       "bos_token_id": 999, "eos_token_id": 999}),
    "llama-small": _Transformer("llama", {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8,
                                          "num_attention_heads": 8, "num_key_value_heads": 4}),
    "llama-tiny": _Transformer("llama", {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2,
                                         "num_attention_heads": 4, "num_key_value_heads": 2, **_SMALL_VOCAB}),
    "mistral-small": _Transformer("mistral", {"hidden_size": 512, "intermediate_size": 1792, "num_hidden_layers": 8,
                                              "num_attention_heads": 8, "num_key_value_heads": 2}),
    "mistral-tiny": _Transformer("mistral", {"hidden_size": 128, "intermediate_size": 448, "num_hidden_layers": 2,
                                             "num_attention_heads": 4, "num_key_value_heads": 2, **_SMALL_VOCAB}),
    "t5-small": _Transformer("t5", {}),
    "t5-tiny": _Transformer("t5", {"d_model": 128, "d_ff": 512, "d_kv": 32, "num_layers": 2, "num_decoder_layers": 2,
                                   "num_heads": 4, **_SMALL_VOCAB}),
    "bart-base": _Transformer("bart", {"d_model": 768, "encoder_layers": 6, "decoder_layers": 6,
                                       "encoder_attention_heads": 12, "decoder_attention_heads": 12,
                                       "encoder_ffn_dim": 3072, "decoder_ffn_dim": 3072}),
    "bart-tiny": _Transformer("bart", {"d_model": 128, "encoder_layers": 2, "decoder_layers": 2,
                                       "encoder_attention_heads": 4, "decoder_attention_heads": 4,
                                       "encoder_ffn_dim": 512, "decoder_ffn_dim": 512, **_SMALL_VOCAB}),
    "vit-base": _Transformer("vit", {}),
    "vit-tiny": _Transformer("vit", {"hidden_size": 192, "num_hidden_layers": 4, "num_attention_heads": 3,
                                     "intermediate_size": 768}),
}


@dataclass(frozen=True)
class Sizes:
    """Size options of a transformer (None keeps the named config's value)."""

    layers: int | None = None  # blocks (each stack of an encoder-decoder)
    hidden: int | None = None  # hidden (model) width; feed-forward widths follow it
    heads: int | None = None  # attention heads

    def check(self, name: str) -> None:
        for option, value in (("layers", self.layers), ("hidden", self.hidden), ("heads", self.heads)):
            if value is not None and value < 1:
                raise PlacewiseError(f"model {name!r}: --{option} is {value}; use 1 or more")

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.layers, self.hidden, self.heads))


class TransformerBackbone(nn.Module):
    """A transformers model called with token ids (or images), returning its last hidden state.

    Returning one tensor (rather than the library's output dataclass) keeps the traced graph's
    output plain, so pipeline stages and losses can consume it directly.
    """

    def __init__(self, model: nn.Module, image: bool = False, decoder_ids: bool = False) -> None:
        super().__init__()
        self.model = model
        self.image = image
        self.decoder_ids = decoder_ids

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.image:
            return self.model(pixel_values=inputs).last_hidden_state
        if self.decoder_ids:
            return self.model(input_ids=inputs, decoder_input_ids=inputs).last_hidden_state
        return self.model(input_ids=inputs).last_hidden_state


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


def _config_overrides(name: str, spec: _Transformer, sizes: Sizes, defaults: Any) -> dict[str, Any]:
    """The named config's values with the size options applied, checked for consistency."""
    family = FAMILIES[spec.family]
    overrides = dict(spec.config)
    value = lambda key: overrides.get(key, getattr(defaults, key))  # noqa: E731 - a local reader
    for keys, given in ((family.layers, sizes.layers), (family.hidden, sizes.hidden), (family.heads, sizes.heads)):
        if given is not None:
            overrides.update({k: given for k in keys})
    if sizes.hidden is not None:
        overrides.update({k: int(round(family.ffn_ratio * sizes.hidden)) for k in family.ffn})
    hidden, heads = value(family.hidden[0]), value(family.heads[0])
    if hidden % heads:
        raise PlacewiseError(f"model {name!r}: hidden size {hidden} is not a multiple of {heads} heads; "
                             "give --hidden and --heads that divide")
    if family.head_dim is not None and (sizes.hidden is not None or sizes.heads is not None):
        overrides[family.head_dim] = hidden // heads
    if family.kv_heads is not None and heads % value(family.kv_heads):
        overrides[family.kv_heads] = heads  # plain multi-head attention when the grouping no longer divides
    return overrides


def _build_transformer(name: str, spec: _Transformer, sizes: Sizes, image_size: tuple[int, int] | None
                       ) -> tuple[TransformerBackbone, Any]:
    import transformers
    family = FAMILIES[spec.family]
    config_class = getattr(transformers, family.config)
    overrides = _config_overrides(name, spec, sizes, config_class())
    if image_size is not None:
        overrides["image_size"] = image_size
    config = config_class(**overrides)
    model = getattr(transformers, family.model)(config, **dict(family.model_kwargs))
    return TransformerBackbone(model, family.image, family.decoder_ids), config


def _transformer_inputs(name: str, family: _Family, config: Any, batch_size: int,
                        input_shape: Sequence[int] | None) -> torch.Tensor:
    if family.image:
        return torch.randn(batch_size, config.num_channels, *_image_size(config.image_size))
    seq = int(input_shape[0]) if input_shape else DEFAULT_SEQUENCE_LENGTH
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and seq > limit:
        raise PlacewiseError(f"model {name!r}: sequence length {seq} is over its {limit} positions; give a shorter --input-shape")
    return torch.randint(0, config.vocab_size, (batch_size, seq))


def _image_size(size: Any) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _vit_image(name: str, input_shape: Sequence[int] | None, patch: int) -> tuple[int, int] | None:
    """The image size an image transformer is built for: its default, or --input-shape 3 H W."""
    if input_shape is None:
        return None
    if len(input_shape) != 3 or int(input_shape[0]) != 3:
        raise PlacewiseError(f"model {name!r}: input shape {list(input_shape)}; an image transformer takes "
                             "3 H W (e.g. --input-shape 3 224 224)")
    height, width = int(input_shape[1]), int(input_shape[2])
    if height % patch or width % patch:
        raise PlacewiseError(f"model {name!r}: image {height}x{width} is not a multiple of its {patch}-pixel patches; "
                             f"give sizes divisible by {patch}")
    return height, width


def _build_named_transformer(name: str, batch_size: int, input_shape: Sequence[int] | None,
                             sizes: Sizes) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    spec = TRANSFORMERS[name]
    family = FAMILIES[spec.family]
    image_size = None
    if family.image:
        patch = spec.config.get("patch_size", 16)
        image_size = _vit_image(name, input_shape, patch)
    elif input_shape is not None and len(input_shape) != 1:
        raise PlacewiseError(f"model {name!r}: input shape {list(input_shape)}; a transformer takes one "
                             "number, the sequence length (e.g. --input-shape 128)")
    model, config = _build_transformer(name, spec, sizes, image_size)
    return model, (_transformer_inputs(name, family, config, batch_size, input_shape),)


def _factory_failure(name: str, e: BaseException) -> PlacewiseError:
    text = str(e).strip().splitlines()
    detail = f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
    return PlacewiseError(f"model {name!r}: {detail}")


def _import_factory(name: str) -> Callable[..., Any]:
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise PlacewiseError(f"model {name!r}: write a user model as package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise PlacewiseError(f"model {name!r}: cannot import {module_name} ({e}); check the module path and PYTHONPATH") from None
    except SyntaxError as e:
        raise PlacewiseError(f"model {name!r}: {module_name} has a syntax error ({e.filename}, line {e.lineno}: "
                             f"{e.msg}); fix the module") from None
    except Exception as e:  # noqa: BLE001 - whatever the user's module raises on import is reported in one line
        raise PlacewiseError(f"{_factory_failure(name, e)} while importing {module_name}; fix the module") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise PlacewiseError(f"model {name!r}: {module_name} has no callable {attr!r}; name a function or class that builds the model")
    return factory


def call_factory(name: str, batch_size: int, input_shape: Sequence[int] | None) -> Any:
    """Import and call a user's `package.module:factory`. It may take `batch_size` and `input_shape`
    (passed when it names them); any other argument without a default is an error, and so is
    whatever the factory raises (one line, no traceback: it is the user's code, not ours)."""
    factory = _import_factory(name)
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C callable: call it bare
        parameters = {}
    given = {"batch_size": batch_size, "input_shape": None if input_shape is None else tuple(input_shape)}
    needed = [p.name for p in parameters.values() if p.default is inspect.Parameter.empty
              and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in given]
    if needed:
        raise PlacewiseError(f"model {name!r}: the factory needs argument(s) {', '.join(needed)}; give them defaults "
                             "(it may take batch_size and input_shape)")
    kwargs = {k: v for k, v in given.items() if k in parameters and v is not None}
    try:
        return factory(**kwargs)
    except Exception as e:  # noqa: BLE001 - the user's factory failing is bad input, reported in one line
        raise PlacewiseError(f"{_factory_failure(name, e)} raised by the factory; fix it") from None


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
                layers: int | None = None, hidden: int | None = None, heads: int | None = None,
                seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build a model by name with random weights and example inputs of `batch_size`.

    `input_shape` is the shape of one sample without the batch dimension: (3, 224, 224) for the
    torchvision models and image transformers by default, (sequence length,) for the other
    transformers (default 128). `layers`, `hidden` and `heads` resize a transformer (transformers
    only): its blocks, hidden width (feed-forward widths follow) and attention heads.
    """
    _check_shape(name, batch_size, input_shape)
    sizes = Sizes(layers, hidden, heads)
    sizes.check(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name in TRANSFORMERS:
            return _build_named_transformer(name, batch_size, input_shape, sizes)
        if sizes.given:
            given = [f"--{k}" for k in ("layers", "hidden", "heads") if getattr(sizes, k) is not None]
            verb = "applies" if len(given) == 1 else "apply"
            raise PlacewiseError(f"model {name!r}: {', '.join(given)} {verb} to the transformers models only; leave it out")
        hidden_widths = mlp_widths(name)
        if hidden_widths is not None:
            if input_shape is not None and len(input_shape) != 1:
                raise PlacewiseError(f"model {name!r}: input shape {list(input_shape)}; an MLP takes one number, "
                                     f"its input features (e.g. --input-shape {MLP_FEATURES})")
            features = int(input_shape[0]) if input_shape else MLP_FEATURES
            return build_mlp(hidden_widths, features, MLP_CLASSES), (torch.randn(batch_size, features),)
        channels = cnn_widths(name)
        if channels is not None:
            image = tuple(int(d) for d in input_shape) if input_shape else CNN_IMAGE
            return build_cnn(channels, image), (torch.randn(batch_size, *image),)
        if ":" in name:
            return _factory_model(name, call_factory(name, batch_size, input_shape), batch_size, input_shape)
        if name not in _torchvision_names():
            raise _unknown(name)
        import torchvision
        model = torchvision.models.get_model(name, weights=None)
        shape = tuple(int(d) for d in input_shape) if input_shape else DEFAULT_IMAGE_SHAPE
        return model, (torch.randn(batch_size, *shape),)


def _factory_model(name: str, built: Any, batch_size: int, input_shape: Sequence[int] | None
                   ) -> tuple[nn.Module, tuple[Any, ...]]:
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
