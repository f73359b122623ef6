"""Distillation losses, each registered by name. A recipe's `losses:` list picks them with weights."""
from .base import (LOSSES, LossInputs, LossSetup, DistillLoss, TeacherTopK, build_losses, check_loss, register,
                   require_loss)
# importing the families registers the built-in losses
from . import response, hidden, attention, feature, relation, early_exit, causal  # noqa: F401

__all__ = ["LOSSES", "LossInputs", "LossSetup", "DistillLoss", "TeacherTopK", "build_losses", "check_loss",
           "register", "require_loss"]
