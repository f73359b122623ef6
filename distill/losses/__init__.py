"""The loss families, each registered by name in `distill.core.loss_interface.LOSSES` when this package is imported:
response (`ce`, `kl`, `logit_mse`, `peer_kl`), hidden states, attention maps, FitNets hints, relations, early exits, and
the causal token losses. A stage's `losses:` list picks them with weights."""
from distill.core.loss_interface import LOSSES
from distill.losses import attention, causal, early_exit, feature, hidden, relation, response  # noqa: F401

__all__ = ["LOSSES"]
