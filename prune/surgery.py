"""Shrinking Linears in place: keep chosen output rows or input columns, copying their weights."""
from __future__ import annotations

import torch
from torch import nn

from prune.remote_modeling import resized_linear, set_submodule


def keep_outputs(root: nn.Module, path: str, index: torch.Tensor) -> None:
    old = root.get_submodule(path)
    new = resized_linear(old, old.in_features, len(index))
    with torch.no_grad():
        new.weight.copy_(old.weight[index])
        if old.bias is not None:
            new.bias.copy_(old.bias[index])
    set_submodule(root, path, new)


def keep_inputs(root: nn.Module, path: str, index: torch.Tensor) -> None:
    old = root.get_submodule(path)
    new = resized_linear(old, len(index), old.out_features)
    with torch.no_grad():
        new.weight.copy_(old.weight[:, index])
        if old.bias is not None:
            new.bias.copy_(old.bias)
    set_submodule(root, path, new)


def unit_rows(units: list[int], size: int) -> torch.Tensor:
    """Row indices of whole units (heads) of `size` rows each."""
    return torch.tensor([unit * size + r for unit in units for r in range(size)], dtype=torch.long)
