"""What data-parallel training trains a model on: for any model placewise can build, its data set, loss
and accuracy (`make_task`).

- `digits` (scikit-learn's 8x8 images: real, no download) for a classifier that fits them: an MLP of 64
  inputs sees the flattened images, as it always has; an image classifier with at least 10 outputs
  (`cnn`, torchvision models) sees them as images, the grey channel repeated to the model's channels and
  resized to its input size.
- `synthetic`: the model's own task, from its example input and output:
  - an MLP: Gaussian inputs labelled by a random linear teacher (`data.synthetic`, as it always was);
  - a classifier (float input, one row of class scores per sample): Gaussian inputs labelled by a random
    linear teacher over at most 10 classes;
  - a token model (integer input of shape (batch, positions), float output (batch, positions, H), as the
    transformers backbones): random tokens below H, and at each position the token before it as the
    class to predict from the output's H values (the first position: itself). The known solution
    attends one position back;
  - anything else: per-sample random targets to memorise, class labels when the output has a last
    dimension to read as scores, else regression targets (mean squared error): a loss that goes down.

Loss: cross-entropy over the output's last dimension for class targets, mean squared error otherwise
(the pipeline's `loss_fn`, so a pipeline worker's last stage computes the same). Accuracy: the share of
positions whose arg-max is the target, averaged per sample; None for regression targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from placewise.errors import PlacewiseError
from placewise.run.choices import DATASETS
from placewise.run.data import Dataset, digits, synthetic
from placewise.run.workload import loss_fn

SYNTHETIC_SAMPLES = 512
TEST_FRACTION = 0.25
# Small inputs when the user gives none: data-parallel runs on a few cores, not a 224x224 benchmark.
IMAGE_SHAPE = (3, 16, 16)
SEQUENCE_LENGTH = 32
TEACHER_CLASSES = 10
EVAL_CHUNK = 256


def hits(output: torch.Tensor, target: torch.Tensor) -> float:
    """Correct predictions of a batch, in samples: each sample's share of positions whose arg-max over the
    output's last dimension is the target, summed (for one class per sample: the number of correct ones)."""
    right = (output.detach().argmax(dim=-1) == target)
    if right.dim() > 1:
        return float(right.flatten(1).float().mean(dim=1).sum())
    return float(right.sum())


@dataclass
class Task:
    """A model (weights from the seed), its data, its loss and, for class targets, its accuracy. Sent to
    every rank without its `model` (`shipped`): each rank builds its own copy (`build`)."""
    spec: str
    data: Dataset
    input_shape: tuple[int, ...] | None     # what the model was built for (None: its own default)
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    hits: Callable[[torch.Tensor, torch.Tensor], float] | None
    model: nn.Module | None = field(default=None, repr=False, compare=False)

    def build(self, seed: int) -> nn.Module:
        """The model again, weights from `seed` (the same on every rank)."""
        return build_task_model(self.spec, self.input_shape, seed)[0]

    def shipped(self) -> "Task":
        """This task without its model, to send to the ranks (which build their own)."""
        return replace(self, model=None)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of `model` on (x, y) (`hits` per sample, averaged); NaN for regression targets."""
    if y.dtype != torch.int64:
        return float("nan")
    return sum(hits(out, t) for out, t in _outputs(model, x, y)) / len(y)


def mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return sum(float(loss_fn(out, t)) * len(t) for out, t in _outputs(model, x, y)) / len(y)


def _outputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """The model's outputs on (x, y), in chunks. Evaluated in eval mode (no dropout), except batch
    normalisation, which uses each chunk's statistics: the servers train parameters, not the running
    statistics each worker keeps for itself."""
    training = model.training
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    try:
        with torch.no_grad():
            for start in range(0, len(y), EVAL_CHUNK):
                yield model(x[start:start + EVAL_CHUNK]), y[start:start + EVAL_CHUNK]
    finally:
        model.train(training)


# ---- the model ---------------------------------------------------------------------------------------
def default_input_shape(spec: str) -> tuple[int, ...] | None:
    """The input shape a data-parallel run builds `spec` for when the user gives none."""
    from placewise.profile.models import CNN_IMAGE, TRANSFORMERS, cnn_widths, mlp_widths
    if mlp_widths(spec) is not None or (":" in spec and cnn_widths(spec) is None):
        return None  # the MLP's 64 features; a factory's own example inputs
    if cnn_widths(spec) is not None:
        return CNN_IMAGE
    if spec in TRANSFORMERS:
        return (SEQUENCE_LENGTH,)
    return IMAGE_SHAPE


def libraries(spec: str) -> tuple[str, ...]:
    """The modules building `spec` imports: worth importing once in the launcher's fork server (torchvision
    alone took 5.6 s per process on a busy 2-core machine)."""
    from placewise.profile.models import TRANSFORMERS, cnn_widths, mlp_widths
    if spec in TRANSFORMERS:
        return ("transformers",)
    if mlp_widths(spec) is not None or cnn_widths(spec) is not None or ":" in spec:
        return ()
    return ("torchvision",)


def build_task_model(spec: str, input_shape: Sequence[int] | None, seed: int,
                     batch_size: int = 2) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The model `spec` for inputs of `input_shape` (None: `default_input_shape`), weights from `seed`,
    and example inputs of `batch_size`."""
    from placewise.profile.models import build_model
    shape = tuple(input_shape) if input_shape else default_input_shape(spec)
    model, inputs = build_model(spec, batch_size=batch_size, input_shape=shape, seed=seed)
    if len(inputs) != 1:
        raise PlacewiseError(f"model {spec!r} takes {len(inputs)} inputs; data-parallel training feeds one tensor "
                             f"per sample (wrap the model in a factory that takes one)")
    return model, inputs


# ---- the data ----------------------------------------------------------------------------------------
def make_task(spec: str, dataset: str, seed: int = 0, input_shape: Sequence[int] | None = None) -> Task:
    """The task of `spec` on `dataset` (digits or synthetic): model, data, loss and accuracy."""
    if dataset not in DATASETS:
        raise PlacewiseError(f"dataset {dataset!r} is unknown; use one of {', '.join(DATASETS)}")
    shape = tuple(input_shape) if input_shape else None
    model, (example,) = build_task_model(spec, shape, seed)
    training = model.training
    model.eval()
    with torch.no_grad():
        output = model(example)
    model.train(training)
    if not isinstance(output, torch.Tensor):
        raise PlacewiseError(f"model {spec!r} returns {type(output).__name__}; data-parallel training needs one "
                             f"tensor out (wrap the model)")
    if dataset == "digits":
        data = _digits_for(spec, example, output, seed)
    else:
        data = _synthetic_for(spec, example, output, seed)
    classes = data.y_train.dtype == torch.int64
    return Task(spec, data, shape, loss_fn, hits if classes else None, model)


def _digits_for(spec: str, example: torch.Tensor, output: torch.Tensor, seed: int) -> Dataset:
    from placewise.profile.models import mlp_widths
    scores = output.dim() == 2 and output.shape[1] >= 10
    if mlp_widths(spec) is not None and example.dim() == 2 and example.shape[1] == 64 and scores:
        return digits(seed=seed)
    if example.is_floating_point() and example.dim() == 4 and scores:
        flat = digits(seed=seed)
        return Dataset("digits", _as_images(flat.x_train, example), flat.y_train,
                       _as_images(flat.x_test, example), flat.y_test)
    raise PlacewiseError(f"--dataset digits needs a classifier of 8x8 images (or an MLP of 64 inputs) with at least "
                         f"10 outputs; model {spec!r} takes {_describe(example)} and gives {_describe(output)}; use "
                         f"--dataset synthetic")


def _as_images(flat: torch.Tensor, example: torch.Tensor) -> torch.Tensor:
    """Flattened 8x8 digits as images of the example's (channels, height, width)."""
    channels, height, width = example.shape[1:]
    images = flat.reshape(-1, 1, 8, 8)
    if (height, width) != (8, 8):
        images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
    return images.expand(-1, channels, -1, -1).contiguous()


def _synthetic_for(spec: str, example: torch.Tensor, output: torch.Tensor, seed: int) -> Dataset:
    from placewise.profile.models import mlp_widths
    if mlp_widths(spec) is not None:
        return synthetic(seed=seed)
    g = torch.Generator().manual_seed(seed * 1_000_003 + 17)
    n = SYNTHETIC_SAMPLES
    if example.is_floating_point() and output.dim() == 2 and output.shape[1] >= 2:
        x = torch.randn(n, *example.shape[1:], generator=g)
        teacher = torch.randn(x[0].numel(), min(TEACHER_CLASSES, output.shape[1]), generator=g)
        y = (x.flatten(1) @ teacher).argmax(dim=1)
    elif not example.is_floating_point() and example.dim() == 2 and output.dim() == 3 \
            and output.shape[:2] == example.shape and output.is_floating_point():
        vocab = min(int(example.max()) + 1, output.shape[2])  # tokens the output can name as classes
        x = torch.randint(0, max(2, vocab), (n, example.shape[1]), generator=g, dtype=example.dtype)
        y = torch.cat([x[:, :1], x[:, :-1]], dim=1)   # the token before each position
    else:
        x = (torch.randn(n, *example.shape[1:], generator=g) if example.is_floating_point() else
             torch.randint(0, int(example.max()) + 1, (n, *example.shape[1:]), generator=g, dtype=example.dtype))
        if output.is_floating_point() and output.dim() >= 2 and output.shape[-1] >= 2:
            y = torch.randint(0, output.shape[-1], (n, *output.shape[1:-1]), generator=g)
        else:
            y = torch.randn(n, *output.shape[1:], generator=g)
    split = n - int(n * TEST_FRACTION)
    return Dataset("synthetic", x[:split], y[:split], x[split:], y[split:])


def _describe(t: torch.Tensor) -> str:
    return f"{'float' if t.is_floating_point() else 'integer'} tensors of shape {list(t.shape[1:])} per sample"
