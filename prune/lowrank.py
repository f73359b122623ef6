"""Low-rank factorization of the Linears inside the transformer layers by truncated SVD.

W (out x in) ~ U_r S_r V_r^T becomes two Linears: in -> r with weight sqrt(S_r) V_r^T and no bias, then r -> out
with weight U_r sqrt(S_r) and the original bias. That is the pair `remote_modeling.low_rank_linear` builds, so
`saving.save_compressed` records the ranks and the checkpoint reloads with `from_pretrained`. Module paths here are
relative to `model.base_model` (e.g. `encoder.layer.0.intermediate.dense`), as in `config.compression`."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers import PreTrainedModel

from distill.core.arch import arch_of, layer_list
from distill.core.errors import ConfigError
from prune.remote_modeling import low_rank_linear, set_submodule
from prune.sparsity import effective_weight, filter_paths

PURPOSE = "low-rank factorization"


@torch.no_grad()
def factorize(model: PreTrainedModel, rank: int | None = None, rank_fraction: float | None = None,
              energy: float | None = None, patterns: list[str] | None = None) -> dict[str, int]:
    """Replace each selected Linear by its rank-r factorization, r chosen by exactly one of: a fixed `rank`, a
    `rank_fraction` of min(in, out), or the smallest rank keeping an `energy` fraction of the sum of squared
    singular values. A Linear is left as it is when rank r would not save parameters: r * (in + out) >= in * out.
    Returns the rank of every factorized Linear, by path from the base model."""
    choose_rank = rank_rule(rank, rank_fraction, energy)
    ranks = {}
    for path, linear in factorizable_linears(model, patterns).items():
        r = choose_rank(effective_weight(linear))
        if saves_parameters(linear, r):
            set_submodule(model.base_model, path, factorized_linear(linear, r))
            ranks[path] = r
    return ranks


def rank_rule(rank: int | None, rank_fraction: float | None,
              energy: float | None) -> Callable[[torch.Tensor], int]:
    """The rank to use for a weight matrix, from whichever one of the three options is given."""
    given = [name for name, value in (("rank", rank), ("rank_fraction", rank_fraction), ("energy", energy))
             if value is not None]
    if len(given) != 1:
        raise ConfigError(f"give exactly one of rank, rank_fraction, energy; got {', '.join(given) or 'none'}")
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"rank must be a positive integer; got {rank!r}")
        return lambda weight: rank
    if rank_fraction is not None:
        if not 0 < rank_fraction <= 1:
            raise ConfigError(f"rank_fraction must be in (0, 1]; got {rank_fraction}")
        return lambda weight: max(1, round(rank_fraction * min(weight.shape)))
    if not 0 < energy <= 1:
        raise ConfigError(f"energy must be in (0, 1]; got {energy}")
    return lambda weight: energy_rank(weight, energy)


def energy_rank(weight: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep `energy` of the sum of squared singular values."""
    squares = torch.linalg.svdvals(weight.detach().float()).double().square()
    kept = squares.cumsum(0) / squares.sum()
    # cumsum and sum may round differently, leaving kept[-1] just below 1.0; the min keeps energy=1.0 in range
    return min(int(torch.searchsorted(kept, energy)) + 1, len(squares))


def factorizable_linears(model: PreTrainedModel, patterns: list[str] | None) -> dict[str, nn.Linear]:
    """Linears inside the layers, by path from the base model, except halves of already factorized pairs."""
    layers_path, layers = arch_of(model, PURPOSE).layers, layer_list(model, PURPOSE)
    pairs = {name for name, module in layers.named_modules() if is_low_rank_pair(module)}
    linears = {f"{layers_path}.{name}": module for name, module in layers.named_modules()
               if isinstance(module, nn.Linear) and name.rpartition(".")[0] not in pairs}
    selected = filter_paths(list(linears), patterns)
    if not selected:
        raise ConfigError("no Linear in the layers is left to factorize; are they all factorized already?")
    return {path: linears[path] for path in selected}


def is_low_rank_pair(module: nn.Module) -> bool:
    return (isinstance(module, nn.Sequential) and len(module) == 2
            and all(isinstance(part, nn.Linear) for part in module))


def saves_parameters(linear: nn.Linear, rank: int) -> bool:
    return rank * (linear.in_features + linear.out_features) < linear.in_features * linear.out_features


@torch.no_grad()
def factorized_linear(linear: nn.Linear, rank: int) -> nn.Sequential:
    """`linear` as the pair in -> rank -> out holding its truncated SVD, sqrt(S) on each side. A sparsity mask
    applied to `linear` is folded in: the pair computes with the masked weight."""
    u, s, vh = torch.linalg.svd(effective_weight(linear).detach().float(), full_matrices=False)
    root = s[:rank].sqrt()
    pair = low_rank_linear(linear, rank)
    pair[0].weight.copy_((root[:, None] * vh[:rank]).to(linear.weight.dtype))
    pair[1].weight.copy_((u[:, :rank] * root).to(linear.weight.dtype))
    if linear.bias is not None:
        pair[1].bias.copy_(linear.bias)
    return pair
