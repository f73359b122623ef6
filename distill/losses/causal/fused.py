"""The fused chunked pass of the causal token losses: every token loss of a stage evaluated on the same chunks of
logits, each a mean over real target tokens.

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

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

IGNORE_INDEX = -100
TOPK_KEYS = ("teacher_topk_logprobs", "teacher_topk_indices")
"""The batch keys under which a teacher cache's collator places `TeacherTopK`'s tensors."""


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


@dataclass
class TeacherTopK:
    """The teacher's next-token distribution kept as its k most likely tokens per position (a teacher cache's
    form): log-probabilities at the loss temperature (float16 or float32) and their token ids (int32 or int64), both
    (batch, length, k) and aligned with the student's logits: position t holds the distribution over token t + 1."""
    logprobs: torch.Tensor
    indices: torch.Tensor

    @classmethod
    def from_batch(cls, batch: dict[str, torch.Tensor]) -> Optional[TeacherTopK]:
        return cls(*(batch[name] for name in TOPK_KEYS)) if TOPK_KEYS[0] in batch else None

    def as_batch(self) -> dict[str, torch.Tensor]:
        """The batch entries a collator adds for it."""
        return dict(zip(TOPK_KEYS, (self.logprobs, self.indices)))

    def rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 log-probabilities and int64 ids (len(positions), k) of the flat (batch * length) `positions`."""
        k = self.indices.shape[-1]
        return (self.logprobs.reshape(-1, k)[positions].float(), self.indices.reshape(-1, k)[positions].long())


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
