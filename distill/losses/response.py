"""Losses on the prediction layer: hard-label CE, temperature-softened KL, MSE on logits, and KL to peer students
(mutual learning). With several teachers, `kl` targets the mixture of their softened distributions and
`logit_mse` their weighted mean logits (`EnsembleOutput`, which `distill.encoder.multi_teacher` produces)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import ModelOutput

from distill.core.loss_interface import IGNORED_LABEL, DistillLoss, LossInputs, register


@dataclass
class EnsembleOutput(SequenceClassifierOutput):
    """`logits` is the weighted mean of the teachers' logits; hidden states and attentions are the first
    teacher's."""
    member_logits: Optional[torch.Tensor] = None
    """Every teacher's logits: (teachers, batch, classes)."""
    weights: Optional[torch.Tensor] = None
    """The normalised teacher weights: (teachers,)."""


def mixture_log_probs(member_logits: torch.Tensor, weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """log(sum_i w_i softmax(z_i / T)): the log of the weighted mixture of the teachers' softened distributions,
    (teachers, batch, classes) -> (batch, classes)."""
    log_probs = torch.log_softmax(member_logits.float() / temperature, dim=-1)
    return torch.logsumexp(log_probs + weights.float().log().view(-1, 1, 1), dim=0)


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, times T^2 (Hinton et al.), batch mean."""
    return kl_to_soft_target(student_logits, F.log_softmax(teacher_logits.float() / temperature, dim=-1), temperature)


def kl_to_soft_target(student_logits: torch.Tensor, target_log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(target || student softened at T), times T^2, batch mean; the target is given as log-probabilities."""
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    kl = F.kl_div(log_p_student, target_log_probs, reduction="batchmean", log_target=True)
    return kl * t * t


def teacher_log_probs(teacher: ModelOutput, temperature: float) -> torch.Tensor:
    """The teacher's distribution softened at T; for several teachers, the weighted mixture of theirs."""
    if isinstance(teacher, EnsembleOutput):
        return mixture_log_probs(teacher.member_logits, teacher.weights, temperature)
    return F.log_softmax(teacher.logits.float() / temperature, dim=-1)


def logit_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student_logits.float(), teacher_logits.float())


def hard_label_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the labelled examples; zero (with a gradient path) for a batch of unlabelled ones only, where
    `cross_entropy` would give NaN."""
    if not (labels != IGNORED_LABEL).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORED_LABEL)


@register("ce")
class HardLabelCE(DistillLoss):
    needs_teacher = False

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        return hard_label_ce(inputs.student.logits, inputs.labels)


@register("kl")
class SoftLabelKL(DistillLoss):
    options = ("temperature",)

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        t = self.temperature
        return kl_to_soft_target(inputs.student.logits, teacher_log_probs(inputs.teacher, t), t)


@register("logit_mse")
class LogitMSE(DistillLoss):
    def forward(self, inputs: LossInputs) -> torch.Tensor:
        return logit_mse(inputs.student.logits, inputs.teacher.logits)


@register("peer_kl")
class PeerKL(DistillLoss):
    """Deep mutual learning (Zhang et al. 2018): the mean over the other students of the softened KL from their
    predictions to this student's. Their logits are targets only: no gradient flows back into them."""
    needs_teacher = False
    needs_peers = True
    options = ("temperature",)

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        t = self.temperature
        return torch.stack([soft_kl(inputs.student.logits, peer.detach(), t) for peer in inputs.peer_logits]).mean()
