"""The models of benchmarks/fusion.py: each builder returns (model, inputs, targets), random weights, nothing downloaded."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def mlp_20m() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """~20M parameters: 1024 -> 4 x 2048 hidden -> 1000 classes, batch 16."""
    widths = [1024, 2048, 2048, 2048, 2048, 2048]
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], 1000))
    return nn.Sequential(*layers), torch.randn(16, widths[0]), torch.randint(0, 1000, (16,))


def resnet18_small() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """torchvision resnet18 (11.7M parameters, 10 classes) on 32x32 images, batch 16."""
    import torchvision

    return torchvision.models.resnet18(num_classes=10), torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))


class TransformerBlock(nn.Module):
    """One nn.TransformerEncoderLayer (d_model 768, ff 3072: 7.1M parameters) plus a classifier head."""

    def __init__(self, d_model: int = 768) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d_model, 12, 4 * d_model, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d_model, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(dim=1))


def transformer_block() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    return TransformerBlock(), torch.randn(8, 32, 768), torch.randint(0, 10, (8,))


def resnet50_small() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """torchvision resnet50 (25.6M parameters, 1000 classes) on 64x64 images, batch 8: the gradients outweigh the activations."""
    import torchvision

    return torchvision.models.resnet50(), torch.randn(8, 3, 64, 64), torch.randint(0, 1000, (8,))


class GPT2Logits(nn.Module):
    """transformers' GPT-2 small (GPT2Config(): 124M parameters, tied embeddings), random weights, nothing downloaded."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.lm = GPT2LMHeadModel(GPT2Config(use_cache=False))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(ids).logits.flatten(0, 1)


def gpt2_small() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Batch 1, sequence 64 (as in issue 19's figures), next-token targets."""
    ids = torch.randint(0, 50257, (1, 65))
    return GPT2Logits(), ids[:, :-1], ids[0, 1:]


MODELS: dict[str, Callable[[], tuple[nn.Module, torch.Tensor, torch.Tensor]]] = {
    "mlp": mlp_20m,
    "resnet18": resnet18_small,
    "resnet50": resnet50_small,
    "transformer": transformer_block,
    "gpt2": gpt2_small,
}
