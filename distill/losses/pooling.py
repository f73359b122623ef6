"""One vector per example from a layer's (batch, seq, width) hidden states, for losses and heads that work on
whole examples (relation losses, early-exit heads)."""
import torch

from distill.core.config import LossConfig
from distill.core.errors import ConfigError

POOLINGS = ("cls", "mean")


def check_pooling(spec: LossConfig, where: str = "") -> None:
    if spec.pooling not in POOLINGS:
        raise ConfigError(f"{where}loss '{spec.name}': pooling must be one of {', '.join(POOLINGS)}; "
                          f"got '{spec.pooling}'")


def pool(states: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(batch, seq, width) -> (batch, width): the first token's state, or the mean over real tokens."""
    if how == "cls":
        return states[:, 0]
    weights = mask.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(1) / weights.sum(1).clamp_min(1)
