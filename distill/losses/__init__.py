"""Distillation losses, each registered by name. A recipe's `losses:` list picks them with weights."""
from .base import (LOSSES, LossInputs, LossSetup, DistillLoss, build_losses, check_loss, register,
                   require_loss)
from . import response, hidden, attention, feature, relation, early_exit  # noqa: F401  (registers the built-in losses)

__all__ = ["LOSSES", "LossInputs", "LossSetup", "DistillLoss", "build_losses", "check_loss", "register", "require_loss"]
