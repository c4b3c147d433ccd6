"""Data-parallel tasks for any model placewise builds: data, loss and accuracy, and losses that go down."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from placewise.errors import PlacewiseError
from placewise.run.data import BatchStream
from placewise.run.tasks import accuracy, make_task, mean_loss


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x).sum(dim=1)   # one number per sample: a regression


def regressor():
    """A user factory (package.module:factory) whose output has no class scores."""
    return Regressor(), torch.randn(4, 6)


def train_losses(task, steps: int, lr: float, batch_size: int = 32) -> list[float]:
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: one thread is faster than two contended ones
    opt = torch.optim.Adam(task.model.parameters(), lr=lr)
    stream = BatchStream(task.data.x_train, task.data.y_train, batch_size, seed=0, worker=0)
    losses = []
    for step in range(steps):
        x, y = stream.batch(step)
        opt.zero_grad()
        loss = task.loss(task.model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    torch.set_num_threads(threads)
    return losses


@pytest.mark.parametrize("spec, dataset, shape, x_shape, y_shape, lr", [
    ("cnn", "digits", None, (1, 8, 8), (), 3e-3),
    ("cnn:8", "synthetic", None, (1, 8, 8), (), 1e-2),
    ("gpt2-tiny", "synthetic", (16,), (16,), (16,), 3e-3),
    ("bert-tiny", "synthetic", (16,), (16,), (16,), 3e-3),
    ("tests.test_tasks:regressor", "synthetic", None, (6,), (), 1e-2),
])
def test_each_kind_of_model_gets_a_task_whose_loss_goes_down(spec, dataset, shape, x_shape, y_shape, lr):
    task = make_task(spec, dataset, seed=1, input_shape=shape)
    assert tuple(task.data.x_train.shape[1:]) == x_shape and tuple(task.data.y_train.shape[1:]) == y_shape
    losses = train_losses(task, 40, lr)
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses
    if spec.endswith(":regressor"):
        test = (task.model, task.data.x_test, task.data.y_test)
        assert task.hits is None and accuracy(*test) != accuracy(*test)  # NaN
        assert mean_loss(*test) >= 0
    else:
        assert 0.0 <= accuracy(task.model, task.data.x_test, task.data.y_test) <= 1.0


def test_token_task_predicts_the_previous_token():
    task = make_task("gpt2-tiny", "synthetic", seed=2, input_shape=(8,))
    x, y = task.data.x_train, task.data.y_train
    assert torch.equal(y[:, 1:], x[:, :-1]) and torch.equal(y[:, 0], x[:, 0])
    assert int(x.max()) < 128  # gpt2-tiny's 128 hidden values are read as scores over the tokens


def test_mlp_tasks_are_the_data_parallel_mlp_as_before():
    from placewise.run.dataparallel.model import build_model
    from placewise.run.data import digits, synthetic
    for dataset, data in (("digits", digits(seed=3)), ("synthetic", synthetic(seed=3))):
        task = make_task("mlp:32", dataset, seed=3)
        assert torch.equal(task.data.x_train, data.x_train) and torch.equal(task.data.y_test, data.y_test)
        reference = build_model("mlp:32", 64, 10, 3)
        assert all(torch.equal(a, b) for a, b in zip(task.model.state_dict().values(), reference.state_dict().values()))


def test_digits_become_images_of_a_torchvision_classifier():
    task = make_task("resnet18", "digits", seed=0, input_shape=(3, 16, 16))
    x = task.data.x_train
    assert tuple(x.shape[1:]) == (3, 16, 16) and torch.equal(x[:, 0], x[:, 2])
    assert task.data.y_train.max() == 9 and task.hits is not None
    out = task.model(x[:4])
    assert out.shape == (4, 1000) and task.loss(out, task.data.y_train[:4]).item() > 0


def test_synthetic_image_task_defaults_to_small_images():
    task = make_task("resnet18", "synthetic", seed=0)
    assert tuple(task.data.x_train.shape[1:]) == (3, 16, 16) and task.data.y_train.max() < 10


@pytest.mark.parametrize("spec, dataset, words", [
    ("gpt2-tiny", "digits", "--dataset digits needs a classifier"),
    ("mlp", "imagenet", "dataset 'imagenet' is unknown"),
    ("no-such-model", "synthetic", "unknown model"),
])
def test_tasks_that_do_not_fit_are_one_line(spec, dataset, words):
    with pytest.raises(PlacewiseError, match=words) as e:
        make_task(spec, dataset)
    assert "\n" not in str(e.value)
