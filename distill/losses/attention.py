"""Attention-map losses between mapped layers (TinyBERT). They need eager attention: with SDPA, transformers 5
returns no attention maps. Head counts must match, or teacher heads are averaged in groups, or both sides are
averaged over heads."""
import torch

from distill.core.config import LossConfig
from distill.core.errors import ConfigError
from distill.core.loss_interface import DistillLoss, LossInputs, LossSetup, register
from distill.losses.hidden import masked_mean

HEAD_MATCHES = ("exact", "group", "average")


def match_heads(student: torch.Tensor, teacher: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring (batch, heads, q, k) maps of both models to the same head count."""
    if mode == "average":
        return student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
    if mode == "group":
        b, h_t, q, k = teacher.shape
        h_s = student.shape[1]
        return student, teacher.view(b, h_s, h_t // h_s, q, k).mean(2)
    return student, teacher


def attention_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE between attention probabilities, over query rows of real tokens."""
    diff = (student.float() - teacher.float()) ** 2  # batch, heads, q, k
    return masked_mean(diff.transpose(1, 2), mask)


def attention_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """KL(teacher row || student row) per head and query, averaged over real query tokens and heads."""
    t, s = teacher.float(), student.float()
    kl = (t * (torch.log(t + eps) - torch.log(s + eps))).sum(-1)  # batch, heads, q
    return masked_mean(kl.transpose(1, 2), mask)


class _AttentionLoss(DistillLoss):
    needs_attentions = True
    options = ("head_match",)
    distance = staticmethod(attention_mse)

    @classmethod
    def check_options(cls, spec: LossConfig, where: str = "") -> None:
        if spec.head_match not in HEAD_MATCHES:
            raise ConfigError(f"{where}loss '{spec.name}': head_match must be one of {HEAD_MATCHES}, got "
                              f"'{spec.head_match}'")

    def __init__(self, spec: LossConfig, setup: LossSetup):
        super().__init__(spec, setup)
        heads_s = setup.student_config.num_attention_heads
        heads_t = setup.teacher_config.num_attention_heads
        if spec.head_match == "exact" and heads_s != heads_t:
            hint = "'group' or 'average'" if heads_t % heads_s == 0 else "'average'"
            raise ConfigError(
                f"loss '{spec.name}': student has {heads_s} attention heads and teacher {heads_t}; "
                f"set head_match to {hint}"
            )
        if spec.head_match == "group" and heads_t % heads_s != 0:
            raise ConfigError(
                f"loss '{spec.name}': head_match 'group' needs teacher heads ({heads_t}) divisible by student "
                f"heads ({heads_s}); use 'average'"
            )
        self.pairs = setup.layer_map.attention

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        s_maps, t_maps = inputs.student.attentions, inputs.teacher.attentions
        losses = []
        for s, t in self.pairs:
            student, teacher = match_heads(s_maps[s], t_maps[t], self.spec.head_match)
            losses.append(self.distance(student, teacher, inputs.attention_mask))
        return torch.stack(losses).mean()


@register("attention_mse")
class AttentionMSE(_AttentionLoss):
    distance = staticmethod(attention_mse)


@register("attention_kl")
class AttentionKL(_AttentionLoss):
    distance = staticmethod(attention_kl)
