"""Which units to keep, given per-layer scores and a target: a fraction or a count to remove, ranked within each
layer or globally. Global ranking compares layers on scores normalised per layer (L2, as Michel et al. 2019).
Every layer keeps at least one unit (removing whole layers is the layer-dropping stage's job)."""
from __future__ import annotations

from typing import Optional

import torch

from distill.core.errors import ConfigError

SCOPES = ("global", "layer")


def units_to_remove(sizes: list[int], fraction: Optional[float], count: Optional[int], what: str) -> int:
    total, removable = sum(sizes), sum(sizes) - len(sizes)
    if (fraction is None) == (count is None):
        raise ConfigError(f"{what}: give exactly one of fraction and count")
    if fraction is not None:
        if not 0 <= fraction < 1:
            raise ConfigError(f"{what}.fraction must be in [0, 1); got {fraction}")
        count = round(fraction * total)
    if count < 0 or count > removable:
        raise ConfigError(
            f"{what}: cannot remove {count} of {total}; each of the {len(sizes)} layers keeps at least one, "
            f"so at most {removable} can go"
        )
    return count


def select_kept(scores: list[torch.Tensor], remove: int, scope: str) -> list[list[int]]:
    """Per layer, the sorted indices of the units that stay."""
    if scope not in SCOPES:
        raise ConfigError(f"scope must be one of {', '.join(SCOPES)}; got '{scope}'")
    sizes = [len(s) for s in scores]
    if scope == "layer":
        per_layer = spread(remove, sizes)
        return [sorted(s.argsort(descending=True)[: n - r].tolist()) for s, n, r in zip(scores, sizes, per_layer)]
    normalised = [s.float() / s.float().norm().clamp_min(1e-30) for s in scores]
    flat = torch.cat([s.clone().index_fill_(0, s.argmax().view(1), float("inf")) for s in normalised])
    dropped = set(flat.argsort()[:remove].tolist())
    kept, offset = [], 0
    for n in sizes:
        kept.append([i for i in range(n) if offset + i not in dropped])
        offset += n
    return kept


def spread(remove: int, sizes: list[int]) -> list[int]:
    """`remove` split across layers in proportion to their sizes (largest remainders first), at most size-1 each."""
    total = sum(sizes)
    exact = [remove * n / total for n in sizes]
    counts = [min(int(e), n - 1) for e, n in zip(exact, sizes)]
    order = sorted(range(len(sizes)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    while sum(counts) < remove:  # terminates: callers check remove <= sum(sizes) - len(sizes)
        for i in order:
            if sum(counts) < remove and counts[i] < sizes[i] - 1:
                counts[i] += 1
    return counts
