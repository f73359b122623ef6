"""Losses on the prediction layer: hard-label CE, temperature-softened KL, MSE on logits."""
import torch
import torch.nn.functional as F

from .base import DistillLoss, LossInputs, register


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, times T^2 (Hinton et al.), batch mean."""
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * t * t


def logit_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student_logits.float(), teacher_logits.float())


@register("ce")
class HardLabelCE(DistillLoss):
    needs_teacher = False

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        return F.cross_entropy(inputs.student.logits.float(), inputs.labels)


@register("kl")
class SoftLabelKL(DistillLoss):
    def forward(self, inputs: LossInputs) -> torch.Tensor:
        return soft_kl(inputs.student.logits, inputs.teacher.logits, self.temperature)


@register("logit_mse")
class LogitMSE(DistillLoss):
    def forward(self, inputs: LossInputs) -> torch.Tensor:
        return logit_mse(inputs.student.logits, inputs.teacher.logits)
