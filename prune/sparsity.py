"""Unstructured and N:M semi-structured sparsity of the Linear weights inside the transformer layers.

Masks (True = kept) are chosen by weight magnitude and applied with torch's pruning re-parametrisation
(weight = weight_orig * weight_mask), so they stay fixed while the model trains: a pruned weight only ever gets a
zero gradient through the mask. `make_permanent` folds the masks into plain weights, after which `save_pretrained`
writes the stock state-dict keys. Embeddings and the classifier / LM head are never touched. Module paths here are
relative to the model itself (e.g. `bert.encoder.layer.0.intermediate.dense`)."""
from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune
from transformers import PreTrainedModel

from distill.core.arch import layer_list, layer_list_path
from distill.core.errors import ConfigError

SCOPES = ("layer", "global")
PURPOSE = "sparsity"


def layer_linears(model: PreTrainedModel) -> dict[str, nn.Linear]:
    """Every Linear inside the transformer layers, by path from `model`."""
    prefix = layer_list_path(model, PURPOSE)
    return {f"{prefix}.{name}": module for name, module in layer_list(model, PURPOSE).named_modules()
            if isinstance(module, nn.Linear)}


def filter_paths(paths: list[str], patterns: list[str] | None) -> list[str]:
    """The paths that some regex in `patterns` finds (re.search); all paths when there are no patterns.
    A pattern that finds nothing is an error: it is almost always a typo."""
    if not patterns:
        return list(paths)
    compiled = [compile_pattern(pattern) for pattern in patterns]
    unmatched = [regex.pattern for regex in compiled if not any(regex.search(path) for path in paths)]
    if unmatched:
        example = f"; paths look like '{paths[0]}'" if paths else ""
        raise ConfigError(f"patterns {unmatched} match no Linear in the layers{example}")
    return [path for path in paths if any(regex.search(path) for regex in compiled)]


def compile_pattern(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"module pattern '{pattern}' is not a valid regular expression: {err}") from err


def selected_linears(model: PreTrainedModel, patterns: list[str] | None) -> dict[str, nn.Linear]:
    linears = layer_linears(model)
    return {path: linears[path] for path in filter_paths(list(linears), patterns)}


def effective_weight(linear: nn.Linear) -> torch.Tensor:
    """The weight the Linear computes with. With a mask applied, `linear.weight` is only refreshed by the next
    forward pass, so after an optimizer step it is stale; the product of the two parts never is."""
    if hasattr(linear, "weight_orig"):
        return linear.weight_orig * linear.weight_mask
    return linear.weight


def magnitude_scores(linear: nn.Linear) -> torch.Tensor:
    return effective_weight(linear).detach().abs().float()


def magnitude_masks(model: PreTrainedModel, sparsity: float, scope: str = "layer",
                    patterns: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Masks that prune the `sparsity` fraction of smallest-magnitude weights: of each Linear (`layer`), or of all
    selected weights together (`global`, one threshold, so Linears end up with different sparsities)."""
    if not 0 <= sparsity < 1:
        raise ConfigError(f"sparsity must be in [0, 1); got {sparsity}")
    if scope not in SCOPES:
        raise ConfigError(f"sparsity scope must be one of {', '.join(SCOPES)}; got '{scope}'")
    scores = {path: magnitude_scores(linear) for path, linear in selected_linears(model, patterns).items()}
    if scope == "layer":
        return {path: prune_smallest(score, round(sparsity * score.numel())) for path, score in scores.items()}
    return global_masks(scores, sparsity)


def prune_smallest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """A mask dropping exactly `count` entries, the smallest scores (ties broken arbitrarily)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.view(-1)[scores.view(-1).topk(count, largest=False).indices] = False
    return keep


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    device = next(iter(scores.values())).device
    flat = torch.cat([score.flatten().to(device) for score in scores.values()])
    keep = prune_smallest(flat, round(sparsity * flat.numel()))
    parts = keep.split([score.numel() for score in scores.values()])
    return {path: part.view_as(score).to(score.device) for (path, score), part in zip(scores.items(), parts)}


def nm_masks(model: PreTrainedModel, n: int = 2, m: int = 4,
             patterns: list[str] | None = None) -> dict[str, torch.Tensor]:
    """N:M masks: in every group of `m` consecutive weights along the input dimension, keep the `n` largest."""
    if not 1 <= n < m:
        raise ConfigError(f"N:M sparsity needs 1 <= n < m; got {n}:{m}")
    linears = selected_linears(model, patterns)
    indivisible = {path: linear.in_features for path, linear in linears.items() if linear.in_features % m}
    if indivisible:
        raise ConfigError(f"{n}:{m} sparsity needs in_features divisible by {m}; these are not: {indivisible}")
    return {path: nm_mask(magnitude_scores(linear), n, m) for path, linear in linears.items()}


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    groups = scores.reshape(scores.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.view_as(scores)


def apply_masks(model: PreTrainedModel, masks: dict[str, torch.Tensor]) -> None:
    """Fix the masks on the weights: weight = weight_orig * mask in every forward pass, also while training.
    A Linear that already carries a mask keeps both (their product)."""
    for path, mask in masks.items():
        linear = model.get_submodule(path)
        torch_prune.custom_from_mask(linear, "weight", mask.to(linear.weight.device))


def make_permanent(model: PreTrainedModel) -> None:
    """Fold every applied mask into a plain weight, so the state dict has the stock keys again."""
    for module in model.modules():
        for name in pruned_tensor_names(module):
            torch_prune.remove(module, name)


def pruned_tensor_names(module: nn.Module) -> list[str]:
    return [hook._tensor_name for hook in module._forward_pre_hooks.values()
            if isinstance(hook, torch_prune.BasePruningMethod)]


def sparsity_report(model: PreTrainedModel) -> list[dict]:
    """Per Linear in the layers: path, weights, zeros and sparsity; last, the same over all of them."""
    rows = [zero_count(path, effective_weight(linear)) for path, linear in layer_linears(model).items()]
    weights, zeros = sum(row["weights"] for row in rows), sum(row["zeros"] for row in rows)
    return rows + [{"path": "all layers", "weights": weights, "zeros": zeros, "sparsity": zeros / weights}]


def zero_count(path: str, weight: torch.Tensor) -> dict:
    zeros = int((weight == 0).sum())
    return {"path": path, "weights": weight.numel(), "zeros": zeros, "sparsity": zeros / weight.numel()}
