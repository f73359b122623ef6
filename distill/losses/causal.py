"""Token-level losses for causal LMs: forward KL, reverse KL and generalized JSD to the teacher, KL to a teacher's
cached top-k, and next-token CE, each a mean over real target tokens. A stage mixes them through its loss list
(for example `forward_kl` with weight 0.5 and `next_token_ce` with weight 0.5).

Causal shift: the logits at position t predict token t + 1, so position t counts when `labels[t + 1] != -100`
(padding and prompt tokens carry -100; the last position never counts).

One pass, gradients in forward: all the token losses of a stage walk together through the real target positions,
`chunk_size` at a time (the smallest of their `chunk_size` options). For each chunk the student's logits are computed
once, the teacher's once without gradient, every loss is evaluated on them, and the gradient of the chunk's weighted
sum with respect to the student's final states and its head's trainable parameters is taken at once and added up
(CE, forward KL and top-k KL with the tail bucket give their gradient with respect to the logits in closed form,
from one softmax per chunk that they share; other losses go through autograd); the returned total hands those sums
to backward. So only one chunk's float32 logits (chunk_size x vocabulary, a few copies) exist at a time, nothing
is recomputed, and memory beyond the models is O(chunk_size x vocabulary) plus one gradient buffer the size of the
final states and one the size of the head's trainable weights. Given the LM heads
(`LossInputs.student_head` / `teacher_head`), the models' (batch, length, vocabulary) logits never exist at all.
Without heads the losses read the models' logits, in whatever precision the models produced them. The teacher gets
no gradient."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from ..config import ConfigError, LossConfig
from .base import DistillLoss, LossInputs, LossSetup, TeacherTopK, register

IGNORE_INDEX = -100

Divergence = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
"""(student logits, teacher logits, temperature) -> one value per row, on float32 (rows, vocabulary) logits."""


@dataclass
class LogitSource:
    """A model's next-token logits, produced for a few positions at a time: final hidden states (batch, length,
    hidden) put through `head`, or, without a head, the logits themselves (batch, length, vocabulary)."""
    states: torch.Tensor
    head: Optional[nn.Module] = None

    @classmethod
    def of(cls, output: ModelOutput, head: Optional[nn.Module]) -> LogitSource:
        return cls(output.hidden_states[-1], head) if head is not None else cls(output.logits)

    def flat_states(self) -> torch.Tensor:
        """The states as (batch * length, hidden or vocabulary) rows."""
        return self.states.reshape(-1, self.states.shape[-1])

    def project(self, states: torch.Tensor, vocab_size: Optional[int]) -> torch.Tensor:
        """float32 logits of `states` rows, cut to `vocab_size` token ids."""
        logits = states if self.head is None else self.head(states)
        return logits[:, :vocab_size].float()

    def rows(self, positions: torch.Tensor, vocab_size: Optional[int]) -> torch.Tensor:
        """float32 logits (len(positions), vocabulary) of the flat (batch * length) `positions`, cut to
        `vocab_size` token ids."""
        return self.project(self.flat_states()[positions], vocab_size)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The head's parameters that take gradients (with tied embeddings, the input embedding; with LoRA, the
        adapters)."""
        return [] if self.head is None else [param for param in self.head.parameters() if param.requires_grad]


# ----- divergences per position -------------------------------------------------------------------------------
def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of each row, from log-probabilities."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def forward_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) per row on logits softened at `temperature`: mass-covering."""
    t = temperature
    return kl_rows(F.log_softmax(teacher / t, -1), F.log_softmax(student / t, -1))


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(student || teacher) per row on logits softened at `temperature`: mode-seeking."""
    t = temperature
    return kl_rows(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1))


def generalized_jsd(student: torch.Tensor, teacher: torch.Tensor, temperature: float, beta: float) -> torch.Tensor:
    """The generalized JSD of GKD (Agarwal et al. 2024) per row, with p the teacher and q the student,
    divided by beta * (1 - beta):

        (beta KL(p || m) + (1 - beta) KL(q || m)) / (beta (1 - beta)),   m = beta p + (1 - beta) q.

    The undivided form vanishes at both ends; divided, it is continuous in beta and tends to forward KL(p || q)
    as beta -> 0 and to reverse KL(q || p) as beta -> 1, which is what beta = 0 and beta = 1 compute (exactly, not
    through the mixture). Inside (0, 1) it is TRL's `generalized_jsd_loss` divided by beta (1 - beta)."""
    if beta == 0:
        return forward_kl(student, teacher, temperature)
    if beta == 1:
        return reverse_kl(student, teacher, temperature)
    log_p, log_q = F.log_softmax(teacher / temperature, -1), F.log_softmax(student / temperature, -1)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
    return (beta * kl_rows(log_p, log_m) + (1 - beta) * kl_rows(log_q, log_m)) / (beta * (1 - beta))


def sparse_kl_rows(log_p: torch.Tensor, log_q: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """KL over each row's slots: sum of p (log p_token - log q), p_token the weight of the slot's token summed over
    the slots that repeat it (so that repeats count as one token of their total weight, and the value is a KL of
    distributions, never below 0 with the rest bucket); a slot of weight 0 (log p = -inf) counts nothing."""
    p = log_p.exp()
    return torch.where(p > 0, p * (token_weights(p, indices).log() - log_q), 0.0).sum(-1)


def token_weights(weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Each slot's token's weight summed over the row's slots that hold the same token (by sorting, O(slots))."""
    sorted_ids, order = indices.sort(-1)
    group = F.pad((sorted_ids[..., 1:] != sorted_ids[..., :-1]).long().cumsum(-1), (1, 0))
    totals = torch.zeros_like(weights).scatter_add_(-1, group, weights.gather(-1, order))
    return torch.empty_like(weights).scatter_(-1, order, totals.gather(-1, group))


def check_topk_ids(indices: torch.Tensor, vocabulary: int) -> None:
    if indices.numel() and indices.max() >= vocabulary:
        raise ValueError(f"the teacher's top-k holds token id {int(indices.max())}, beyond the {vocabulary} token ids "
                         f"compared; cache the teacher's logits cut to {vocabulary} ids")


def topk_kl(student: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_indices: torch.Tensor,
            temperature: float, tail: bool) -> torch.Tensor:
    """KL(teacher || student) per row against the teacher's cached log-probabilities (already at `temperature`) at
    token ids `teacher_indices`: its top k, distinct, and perhaps tokens sampled from the rest (a sampled cache, whose
    slots may repeat a token and hold the whole mass; `distill.cache`). With `tail`, over the slots plus one bucket
    for the rest of the vocabulary (the teacher's mass left out of the slots, the student's own mass outside those
    tokens); when k covers the vocabulary there is no rest. Without `tail`, both renormalised over the k tokens.

    Through a sampled row the gradient with respect to the student's logits is (student probabilities - slot
    weights summed per token), whose expectation is the full forward-KL gradient; the value itself is the KL to the
    sampled estimate (repeats merged), not to the full distribution."""
    vocabulary = student.shape[-1]
    check_topk_ids(teacher_indices, vocabulary)
    log_q = F.log_softmax(student / temperature, -1)
    log_q_top = log_q.gather(-1, teacher_indices)
    if not tail:
        return kl_rows(F.log_softmax(teacher_logprobs, -1), F.log_softmax(log_q_top, -1))
    kl = sparse_kl_rows(teacher_logprobs, log_q_top, teacher_indices)
    if teacher_indices.shape[-1] >= vocabulary:  # a top k of the whole vocabulary; sampled slots leave no rest
        return kl
    p_rest = (1 - teacher_logprobs.exp().sum(-1)).clamp_min(0)  # a cache's rounding can push the sum past 1
    log_q_rest = log_q.scatter(-1, teacher_indices, float("-inf")).logsumexp(-1)
    return kl + torch.special.xlogy(p_rest, p_rest) - p_rest * log_q_rest


# ----- one pass over target tokens, chunk by chunk ----------------------------------------------------------------
def next_tokens(labels: torch.Tensor) -> torch.Tensor:
    """The token each position predicts: `labels` shifted left by one, -100 at the last position."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat (batch * length) indices of the positions whose next token is a real target."""
    return (next_tokens(labels) != IGNORE_INDEX).flatten().nonzero().squeeze(1)


@dataclass
class TokenRows:
    """What the losses see of one chunk of target positions: the student's float32 logits, the teacher's (None when
    no loss of the pass reads a teacher model), the teacher's cached top-k log-probabilities and ids (None without a
    cache), and the target token ids."""
    student: torch.Tensor
    teacher: Optional[torch.Tensor]
    topk: Optional[tuple[torch.Tensor, torch.Tensor]]
    targets: torch.Tensor


class SoftenedStudent:
    """The student's log-probabilities and probabilities over one chunk's rows at each temperature asked for,
    computed once each, without autograd: what the closed forms of a pass's losses share."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits
        self._log_probs: dict[float, torch.Tensor] = {}
        self._probs: dict[float, torch.Tensor] = {}

    def log_probs(self, temperature: float) -> torch.Tensor:
        if temperature not in self._log_probs:
            scaled = self.logits if temperature == 1 else self.logits / temperature
            self._log_probs[temperature] = F.log_softmax(scaled, -1)
        return self._log_probs[temperature]

    def probs(self, temperature: float) -> torch.Tensor:
        if temperature not in self._probs:
            self._probs[temperature] = self.log_probs(temperature).exp()
        return self._probs[temperature]


ClosedForm = Callable[[TokenRows, SoftenedStudent], tuple[torch.Tensor, torch.Tensor]]
"""(a chunk's rows, the student softened) -> (one value per row, the gradient of their sum with respect to the
student's logits), computed without autograd."""


class RowLoss:
    """One chunk's rows -> one loss value per row; a loss is the mean of its values over the target positions. The
    values are differentiable by autograd; with a `closed_form`, a training pass takes the values and their gradient
    from it instead: a few passes over the (rows, vocabulary) logits where autograd's graph of the same operations
    takes several times as many."""

    def __init__(self, values: Callable[[TokenRows], torch.Tensor], closed_form: Optional[ClosedForm] = None):
        self.values, self.closed_form = values, closed_form

    def __call__(self, rows: TokenRows) -> torch.Tensor:
        return self.values(rows)


class _GradientsFromForward(torch.autograd.Function):
    """Returns `value`; its backward hands `inputs` the `gradients` computed in forward, times the incoming
    gradient (so loss scaling, gradient accumulation and weighting by a caller all apply)."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, gradients: list[torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        ctx.gradients = gradients
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        # scaled in place and let go of, so that the buffers become the gradients without a copy: one backward only
        gradients, ctx.gradients = ctx.gradients, None
        return None, None, *(gradient.mul_(grad_output) for gradient in gradients)


class _ChunkGradients:
    """The gradient of the student's chunk losses with respect to its final states and its head's trainable
    parameters, summed chunk by chunk in forward: states are fed to the head from a detached copy, so that each
    chunk's graph ends at that copy and is freed once its gradient is taken."""

    def __init__(self, student: LogitSource):
        self.states = student.states
        self.params = student.trainable_parameters()
        self.detached = student.flat_states().detach()
        self.state_sum = torch.zeros_like(self.detached) if self.states.requires_grad else None
        self.param_sums = [torch.zeros_like(param) for param in self.params]

    @classmethod
    def needed(cls, student: LogitSource) -> Optional[_ChunkGradients]:
        """None when nothing asks for gradients: grad mode is off, or neither the states nor the head take any."""
        takes_gradients = student.states.requires_grad or student.trainable_parameters()
        return cls(student) if torch.is_grad_enabled() and takes_gradients else None

    def leaf_rows(self, chunk: torch.Tensor) -> torch.Tensor:
        return self.detached[chunk].requires_grad_(self.state_sum is not None)

    def add(self, logits: torch.Tensor, logit_gradient: torch.Tensor, rows: torch.Tensor, chunk: torch.Tensor) -> None:
        """Add the gradient that `logit_gradient` on the chunk's `logits` (made from its state `rows`) gives."""
        wrt = ([rows] if self.state_sum is not None else []) + self.params
        gradients = list(torch.autograd.grad(logits, wrt, logit_gradient, allow_unused=True, materialize_grads=True))
        if self.state_sum is not None:
            self.state_sum[chunk] += gradients.pop(0)
        for total, gradient in zip(self.param_sums, gradients):
            total += gradient

    def attach(self, value: torch.Tensor, scale: float) -> torch.Tensor:
        """`value`, differentiable: its gradient is the sums so far times `scale`."""
        inputs, sums = [], []
        if self.state_sum is not None:
            inputs.append(self.states)
            sums.append(self.state_sum.view_as(self.states))
        inputs += self.params
        sums += self.param_sums
        return _GradientsFromForward.apply(value, [total.mul_(scale) for total in sums], *inputs)


def fused_means(row_losses: dict[str, RowLoss], weights: dict[str, float], student: LogitSource, labels: torch.Tensor,
                teacher: Optional[LogitSource] = None, topk: Optional[TeacherTopK] = None, chunk_size: int = 256,
                vocab_size: Optional[int] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Each of `row_losses` averaged over real target tokens, all from the same chunks of student (and teacher)
    logits, cut to the first `vocab_size` token ids: their weighted sum, differentiable with respect to the student's
    states and head (when grad mode is on and they take gradients), and each loss's own detached value."""
    positions, targets = target_positions(labels), next_tokens(labels).flatten()
    count = max(len(positions), 1)
    gradients = _ChunkGradients.needed(student)

    def chunk_sums(chunk: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each loss's detached sum over the `chunk` of positions, its gradients added; the chunk's logits die on
        return, before the next chunk's exist."""
        states = gradients.leaf_rows(chunk) if gradients else student.flat_states()[chunk]
        logits = student.project(states, vocab_size)
        with torch.no_grad():
            teacher_logits = teacher.rows(chunk, vocab_size) if teacher is not None else None
        rows = TokenRows(logits.detach(), teacher_logits, topk.rows(chunk) if topk is not None else None,
                         targets[chunk])
        if not gradients:
            with torch.no_grad():
                return {name: loss(rows).sum() for name, loss in row_losses.items()}
        # unnormalised sums: gradients through a half-precision head keep their magnitude (divided by count later)
        values, logit_gradient = sums_and_logit_gradient(row_losses, weights, rows)
        gradients.add(logits, logit_gradient, states, chunk)
        return values

    sums = {name: torch.zeros((), device=labels.device) for name in row_losses}
    for chunk in positions.split(chunk_size):
        sums = {name: sums[name] + value for name, value in chunk_sums(chunk).items()}
    means = {name: total / count for name, total in sums.items()}
    weighted = sum(weights[name] * mean for name, mean in means.items())
    return (gradients.attach(weighted, 1 / count) if gradients else weighted), means


def sums_and_logit_gradient(row_losses: dict[str, RowLoss], weights: dict[str, float], rows: TokenRows
                            ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each loss's detached sum over the chunk's `rows`, and the gradient of their weighted sum with respect to the
    student's logits: in closed form where a loss has one, by autograd for the others."""
    sums, gradient = {}, None
    softened = SoftenedStudent(rows.student)
    with torch.no_grad():
        for name, loss in row_losses.items():
            if loss.closed_form is not None:
                values, loss_gradient = loss.closed_form(rows, softened)
                sums[name] = values.sum()
                loss_gradient.mul_(weights[name])
                gradient = loss_gradient if gradient is None else gradient.add_(loss_gradient)
    by_autograd = [name for name, loss in row_losses.items() if loss.closed_form is None]
    if by_autograd:
        leaf = rows.student.detach().requires_grad_()
        leaf_rows = TokenRows(leaf, rows.teacher, rows.topk, rows.targets)
        leaf_sums = {name: row_losses[name](leaf_rows).sum() for name in by_autograd}
        (leaf_gradient,) = torch.autograd.grad(sum(weights[name] * leaf_sums[name] for name in by_autograd), leaf)
        sums.update({name: value.detach() for name, value in leaf_sums.items()})
        gradient = leaf_gradient if gradient is None else gradient.add_(leaf_gradient)
    return {name: sums[name] for name in row_losses}, gradient


def token_mean(row_loss: RowLoss, student: LogitSource, labels: torch.Tensor, **options) -> torch.Tensor:
    """One loss of `fused_means`, alone."""
    return fused_means({"loss": row_loss}, {"loss": 1.0}, student, labels, **options)[0]


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


def token_losses(losses: dict[str, _TokenLoss], weights: dict[str, float],
                 inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`losses` in one pass over the chunks of target positions (`fused_means`), `chunk_size` positions at a time:
    the smallest of the losses' options, so that no loss holds more logits at once than it asked for. Their weighted
    (by `weights`) sum, and each loss's own detached value."""
    first = next(iter(losses.values()))  # built from one stage's setup: they share its vocabulary cut
    reads_teacher = any(loss.needs_teacher for loss in losses.values())
    return fused_means({name: loss.row_loss(inputs) for name, loss in losses.items()}, weights,
                       LogitSource.of(inputs.student, inputs.student_head), inputs.labels,
                       LogitSource.of(inputs.teacher, inputs.teacher_head) if reads_teacher else None,
                       inputs.teacher_topk, min(loss.spec.chunk_size for loss in losses.values()), first.vocab_size)


@register("next_token_ce")
class NextTokenCE(_TokenLoss):
    needs_teacher = False

    def row_loss(self, inputs: LossInputs) -> RowLoss:
        return cross_entropy_rows


class _TokenDivergence(_TokenLoss):
    divergence = staticmethod(forward_kl)

    def row_loss(self, inputs: LossInputs) -> RowLoss:
        return scaled_divergence(self.divergence, self.temperature)


@register("forward_kl")
class ForwardKL(_TokenDivergence):
    divergence = staticmethod(forward_kl)


@register("reverse_kl")
class ReverseKL(_TokenDivergence):
    divergence = staticmethod(reverse_kl)


@register("jsd")
class GeneralizedJSD(_TokenDivergence):
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
    """KL to the teacher's cached top-k (`LossInputs.teacher_topk`): no teacher model runs."""
    needs_teacher = False

    def row_loss(self, inputs: LossInputs) -> RowLoss:
        if inputs.teacher_topk is None:
            raise ValueError("loss 'topk_kl' reads the teacher's top-k (LossInputs.teacher_topk), from a teacher "
                             "cache; this batch has none")
        return scaled_topk_kl(self.temperature, self.spec.topk_tail)
