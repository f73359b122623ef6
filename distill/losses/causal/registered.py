"""The registered causal token losses (`next_token_ce`, `forward_kl`, `reverse_kl`, `jsd`, `total_variation`,
`topk_kl`), each a row loss of `divergences` run through the fused pass of `fused` (CE, forward KL and top-k KL with
the tail bucket with their logit gradients in closed form), and the same losses as plain functions of logit
sources."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from distill.core.config import LossConfig
from distill.core.errors import ConfigError
from distill.core.loss_interface import DistillLoss, LossInputs, LossSetup, register
from distill.losses.causal.divergences import (
    Divergence,
    check_topk_ids,
    forward_kl,
    generalized_jsd,
    kl_rows,
    reverse_kl,
    sparse_kl_rows,
    topk_kl,
    total_variation,
)
from distill.losses.causal.fused import (
    ClosedForm,
    LogitSource,
    RowLoss,
    SoftenedStudent,
    TeacherTopK,
    TokenRows,
    fused_means,
    token_mean,
)


def scaled_divergence(divergence: Divergence, temperature: float) -> RowLoss:
    """`divergence` of the student's rows from the teacher's at `temperature`, times T^2 (forward KL in closed
    form)."""
    closed_form = forward_kl_closed_form(temperature) if divergence is forward_kl else None
    return RowLoss(lambda rows: divergence(rows.student, rows.teacher, temperature) * temperature ** 2, closed_form)


def scaled_topk_kl(temperature: float, tail: bool) -> RowLoss:
    """`topk_kl` to the cached top-k at `temperature`, times T^2 (in closed form with the tail bucket)."""
    return RowLoss(lambda rows: topk_kl(rows.student, *rows.topk, temperature, tail) * temperature ** 2,
                   topk_kl_closed_form(temperature) if tail else None)


def cross_entropy_closed_form(rows: TokenRows, softened: SoftenedStudent) -> tuple[torch.Tensor, torch.Tensor]:
    """-log q(target) per row; gradient q - onehot(target)."""
    on_target = (torch.arange(len(rows.targets), device=rows.targets.device), rows.targets)
    gradient = softened.probs(1.0).clone()
    gradient[on_target] -= 1
    return -softened.log_probs(1.0)[on_target], gradient


cross_entropy_rows = RowLoss(lambda rows: F.cross_entropy(rows.student, rows.targets, reduction="none"),
                             cross_entropy_closed_form)


def forward_kl_closed_form(temperature: float) -> ClosedForm:
    """T^2 KL(p || q) per row, p and q the teacher's and the student's distributions at T; gradient T (q - p)."""
    def closed_form(rows: TokenRows, softened: SoftenedStudent) -> tuple[torch.Tensor, torch.Tensor]:
        log_p = F.log_softmax(rows.teacher if temperature == 1 else rows.teacher / temperature, -1)
        values = kl_rows(log_p, softened.log_probs(temperature)) * temperature ** 2
        return values, (softened.probs(temperature) - log_p.exp()).mul_(temperature)
    return closed_form


def topk_kl_closed_form(temperature: float) -> ClosedForm:
    """`topk_kl` with the tail bucket, times T^2. With w the slot weights (p̂ summed per token), S the slots' tokens,
    p_rest = 1 - sum(w) and q_rest the student's mass outside S, the gradient is

        T (q (sum(w) + p_rest) - p̂ - p_rest q 1[token not in S] / q_rest)."""
    def closed_form(rows: TokenRows, softened: SoftenedStudent) -> tuple[torch.Tensor, torch.Tensor]:
        logprobs, indices = rows.topk
        check_topk_ids(indices, softened.logits.shape[-1])
        q, weights = softened.probs(temperature), logprobs.exp()
        values = sparse_kl_rows(logprobs, softened.log_probs(temperature).gather(-1, indices), indices)
        mass = weights.sum(-1, keepdim=True)
        if indices.shape[-1] >= q.shape[-1]:  # as in topk_kl: no rest
            gradient = q * mass
        else:
            p_rest = (1 - mass).clamp_min(0)
            outside = q.scatter(-1, indices, 0.0)
            q_rest = outside.sum(-1, keepdim=True)
            log_q_rest = q_rest.clamp_min(torch.finfo(q.dtype).tiny).log()
            values += (torch.special.xlogy(p_rest, p_rest) - p_rest * log_q_rest).squeeze(-1)
            gradient = q * (mass + p_rest)
            gradient -= outside.mul_(torch.where(q_rest > 0, p_rest / q_rest, 0.0))
        gradient.scatter_add_(-1, indices, -weights)
        return values * temperature ** 2, gradient.mul_(temperature)
    return closed_form


def distill_tokens(divergence: Divergence, student: LogitSource, teacher: LogitSource, labels: torch.Tensor,
                   temperature: float = 1.0, chunk_size: int = 256, vocab_size: Optional[int] = None) -> torch.Tensor:
    """`divergence` between the student's and the teacher's next-token distributions at `temperature`, times T^2,
    averaged over real target tokens; both logits cut to the first `vocab_size` token ids."""
    return token_mean(scaled_divergence(divergence, temperature), student, labels, teacher=teacher,
                      chunk_size=chunk_size, vocab_size=vocab_size)


def distill_topk(student: LogitSource, teacher: TeacherTopK, labels: torch.Tensor, temperature: float = 1.0,
                 tail: bool = True, chunk_size: int = 256, vocab_size: Optional[int] = None) -> torch.Tensor:
    """`topk_kl` to the teacher's cached top-k at `temperature`, times T^2, averaged over real target tokens."""
    return token_mean(scaled_topk_kl(temperature, tail), student, labels, topk=teacher, chunk_size=chunk_size,
                      vocab_size=vocab_size)


def next_token_ce(student: LogitSource, labels: torch.Tensor, chunk_size: int = 256,
                  vocab_size: Optional[int] = None) -> torch.Tensor:
    """Cross-entropy of each real next token, averaged over them (what transformers' causal LMs report as `loss`)."""
    return token_mean(cross_entropy_rows, student, labels, chunk_size=chunk_size, vocab_size=vocab_size)


# ----- registered losses --------------------------------------------------------------------------------------
class _TokenLoss(DistillLoss):
    """A loss on each real target token's logits; a stage's token losses run as one pass (`token_losses`)."""
    reads_lm_head = True
    group = "causal_tokens"
    options = ("chunk_size",)

    def __init__(self, spec: LossConfig, setup: LossSetup):
        super().__init__(spec, setup)
        self.check_options(spec)
        self.vocab_size = setup.vocab_size

    @classmethod
    def check_options(cls, spec: LossConfig, where: str = "") -> None:
        if spec.chunk_size < 1:
            raise ConfigError(f"{where}loss '{spec.name}': chunk_size is a number of positions, at least 1; "
                              f"got {spec.chunk_size}")

    def row_loss(self, inputs: LossInputs) -> RowLoss:
        """This loss's value per row of a chunk, with the current temperature."""
        raise NotImplementedError

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        return token_losses({self.spec.name: self}, {self.spec.name: 1.0}, inputs)[0]

    @classmethod
    def run_group(cls, losses: dict[str, DistillLoss], inputs: LossInputs
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return token_losses(losses, {name: loss.weight for name, loss in losses.items()}, inputs)


def token_losses(losses: dict[str, _TokenLoss], weights: dict[str, float],
                 inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`losses` in one pass over the chunks of target positions (`fused_means`), `chunk_size` positions at a time:
    the smallest of the losses' options, so that no loss holds more logits at once than it asked for. Their weighted
    (by `weights`) sum, and each loss's own detached value."""
    first = next(iter(losses.values()))  # built from one stage's setup: they share its vocabulary cut
    reads_teacher = any(loss.needs_teacher for loss in losses.values())
    # a cross-tokenizer batch's cached rows follow the teacher's positions, which only `aligned_topk_kl` reads
    reads_cache = any(isinstance(loss, TopKKL) for loss in losses.values())
    return fused_means({name: loss.row_loss(inputs) for name, loss in losses.items()}, weights,
                       LogitSource.of(inputs.student, inputs.student_head), inputs.labels,
                       LogitSource.of(inputs.teacher, inputs.teacher_head) if reads_teacher else None,
                       TeacherTopK.from_batch(inputs.batch or {}) if reads_cache else None,
                       min(loss.spec.chunk_size for loss in losses.values()), first.vocab_size)


@register("next_token_ce")
class NextTokenCE(_TokenLoss):
    needs_teacher = False

    def row_loss(self, inputs: LossInputs) -> RowLoss:
        return cross_entropy_rows


class _TokenDivergence(_TokenLoss):
    options = ("chunk_size", "temperature")
    divergence = staticmethod(forward_kl)

    def row_loss(self, inputs: LossInputs) -> RowLoss:
        return scaled_divergence(self.divergence, self.temperature)


@register("forward_kl")
class ForwardKL(_TokenDivergence):
    divergence = staticmethod(forward_kl)


@register("reverse_kl")
class ReverseKL(_TokenDivergence):
    divergence = staticmethod(reverse_kl)


@register("total_variation")
class TotalVariation(_TokenDivergence):
    divergence = staticmethod(total_variation)


@register("jsd")
class GeneralizedJSD(_TokenDivergence):
    options = ("chunk_size", "temperature", "beta")

    @classmethod
    def check_options(cls, spec: LossConfig, where: str = "") -> None:
        super().check_options(spec, where)
        if not 0 <= spec.beta <= 1:
            raise ConfigError(f"{where}loss '{spec.name}': beta is a mixing weight in 0..1 (0: forward KL, "
                              f"1: reverse KL); got {spec.beta}")

    def divergence(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        return generalized_jsd(student, teacher, temperature, self.spec.beta)


@register("topk_kl")
class TopKKL(_TokenLoss):
    """KL to the teacher's cached top-k (the batch's `TOPK_KEYS`, from a teacher cache): no teacher model runs."""
    needs_teacher = False
    options = ("chunk_size", "temperature", "topk_tail")

    def row_loss(self, inputs: LossInputs) -> RowLoss:
        if TeacherTopK.from_batch(inputs.batch or {}) is None:
            raise ValueError("loss 'topk_kl' reads the teacher's top-k from the batch (a teacher cache's collator "
                             "adds it); this batch has none")
        return scaled_topk_kl(self.temperature, self.spec.topk_tail)
