"""Causal-LM token losses: hand values on tiny tensors (shift, -100 masking, temperature), the JSD's ends, the top-k
cache's estimators, chunked == unchunked for values and gradients, the vocabulary check, and a few training steps
on tiny Llamas."""
import logging
import math
from functools import partial

import pytest
import torch
from transformers import PretrainedConfig
from transformers.modeling_outputs import CausalLMOutput

from distill.core.config import LossConfig, StageConfig
from distill.core.errors import ConfigError
from distill.core.loss_interface import LossInputs, LossSetup, build_losses, check_stages
from distill.lm.vocab import common_vocab_size
from distill.losses.causal.divergences import forward_kl, generalized_jsd, reverse_kl, topk_kl, total_variation
from distill.losses.causal.fused import LogitSource, SoftenedStudent, TeacherTopK, TokenRows
from distill.losses.causal.registered import (
    cross_entropy_rows,
    distill_tokens,
    distill_topk,
    next_token_ce,
    scaled_divergence,
    scaled_topk_kl,
    token_losses,
)
from tests.conftest import make_tokenizer, tiny_causal_lm

# one sequence of 4 positions over 3 tokens: position 0 predicts labels[1] = 0, position 1 predicts -100 (a prompt
# or padding token), position 2 predicts labels[3] = 2, and position 3 has nothing to predict. The logits at
# positions 1 and 3 are extreme, so that counting them would change every value.
LABELS = torch.tensor([[1, 0, -100, 2]])
STUDENT = torch.tensor([[[1.0, 0.0, -1.0], [40.0, -40.0, 0.0], [0.0, 2.0, 0.0], [-40.0, 40.0, 0.0]]])
TEACHER = torch.tensor([[[0.0, 0.0, 2.0], [-40.0, 40.0, 0.0], [1.0, 1.0, -1.0], [40.0, 0.0, -40.0]]])
REAL = [0, 2]


def softmax(row, temperature=1.0):
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def hand_mean(divergence, temperature=1.0):
    """Mean over the real positions of divergence(teacher probs, student probs), times T^2."""
    values = [divergence(softmax(TEACHER[0, i].tolist(), temperature), softmax(STUDENT[0, i].tolist(), temperature))
              for i in REAL]
    return sum(values) / len(values) * temperature ** 2


def dense(divergence, temperature=1.0, chunk_size=1024, **kwargs):
    return distill_tokens(divergence, LogitSource(STUDENT), LogitSource(TEACHER), LABELS, temperature, chunk_size,
                          **kwargs).item()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_and_reverse_kl_hand_values_over_real_next_tokens(temperature):
    expected_forward = hand_mean(kl, temperature)
    expected_reverse = hand_mean(lambda p, q: kl(q, p), temperature)
    assert dense(forward_kl, temperature) == pytest.approx(expected_forward, rel=1e-5)
    assert dense(reverse_kl, temperature) == pytest.approx(expected_reverse, rel=1e-5)
    assert expected_forward != pytest.approx(expected_reverse, rel=1e-2)


def test_next_token_ce_hand_value():
    expected = -(math.log(softmax(STUDENT[0, 0].tolist())[0]) + math.log(softmax(STUDENT[0, 2].tolist())[2])) / 2
    assert next_token_ce(LogitSource(STUDENT), LABELS).item() == pytest.approx(expected, rel=1e-5)


def test_jsd_hand_value_and_its_ends_are_the_kl_forms():
    beta = 0.3

    def jsd(p, q):
        m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
        return (beta * kl(p, m) + (1 - beta) * kl(q, m)) / (beta * (1 - beta))

    def jsd_at(b, temperature=1.0):
        return dense(lambda s, t, temp: generalized_jsd(s, t, temp, b), temperature)

    assert jsd_at(beta, 2.0) == pytest.approx(hand_mean(jsd, 2.0), rel=1e-5)
    assert jsd_at(0.0) == dense(forward_kl)
    assert jsd_at(1.0) == dense(reverse_kl)
    assert jsd_at(1e-4) == pytest.approx(dense(forward_kl), rel=1e-3)
    assert jsd_at(1 - 1e-4) == pytest.approx(dense(reverse_kl), rel=1e-3)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_total_variation_hand_value_is_one_minus_the_overlap(temperature):
    """TV(p, q) = sum |p - q| / 2 = 1 - sum min(p, q): one minus speculative sampling's acceptance chance."""
    expected = hand_mean(lambda p, q: sum(abs(pi - qi) for pi, qi in zip(p, q)) / 2, temperature)
    overlap = hand_mean(lambda p, q: 1 - sum(min(pi, qi) for pi, qi in zip(p, q)), temperature)
    assert dense(total_variation, temperature) == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(overlap, rel=1e-9)
    assert expected != pytest.approx(hand_mean(kl, temperature), rel=1e-2)


def test_logits_are_cut_to_the_shared_vocabulary():
    wider_teacher = torch.cat([TEACHER, torch.full((1, 4, 2), 5.0)], -1)
    cut = distill_tokens(forward_kl, LogitSource(STUDENT), LogitSource(wider_teacher), LABELS, vocab_size=3)
    assert cut.item() == pytest.approx(dense(forward_kl), rel=1e-6)


def topk_of(logits, k, temperature=1.0):
    values, indices = torch.log_softmax(logits / temperature, -1).topk(k, -1)
    return TeacherTopK(values.half(), indices.int())


@pytest.mark.parametrize("tail", [True, False])
def test_topk_over_the_whole_vocabulary_is_forward_kl(tail):
    teacher = TeacherTopK(torch.log_softmax(TEACHER / 2.0, -1), torch.arange(3).expand(1, 4, 3))
    value = distill_topk(LogitSource(STUDENT), teacher, LABELS, 2.0, tail=tail)
    assert value.item() == pytest.approx(dense(forward_kl, 2.0), rel=1e-5)
    shuffled = topk_of(TEACHER, 3, 2.0)  # sorted by probability, in float16
    assert distill_topk(LogitSource(STUDENT), shuffled, LABELS, 2.0, tail=tail).item() == pytest.approx(
        value.item(), rel=1e-3)


def test_topk_with_tail_bucket_and_renormalised_hand_values():
    teacher = topk_of(TEACHER, 1)
    tail_expected = []
    for i in REAL:
        p, q = softmax(TEACHER[0, i].tolist()), softmax(STUDENT[0, i].tolist())
        top = max(range(3), key=lambda v: p[v])
        tail_expected.append(kl([p[top], 1 - p[top]], [q[top], 1 - q[top]]))
    with_tail = distill_topk(LogitSource(STUDENT), teacher, LABELS, tail=True)
    assert with_tail.item() == pytest.approx(sum(tail_expected) / 2, rel=1e-3)  # float16 cache
    # renormalised over one token, both distributions are certain
    assert distill_topk(LogitSource(STUDENT), teacher, LABELS, tail=False).item() == pytest.approx(0.0, abs=1e-7)

    two = topk_of(TEACHER, 2)
    expected = []
    for i in REAL:
        p, q = softmax(TEACHER[0, i].tolist()), softmax(STUDENT[0, i].tolist())
        kept = sorted(range(3), key=lambda v: -p[v])[:2]
        expected.append(kl([p[v] / sum(p[u] for u in kept) for v in kept],
                           [q[v] / sum(q[u] for u in kept) for v in kept]))
    renormalised = distill_topk(LogitSource(STUDENT), two, LABELS, tail=False)
    assert renormalised.item() == pytest.approx(sum(expected) / 2, rel=1e-3)


def test_topk_through_sampled_rows_has_the_forward_kl_gradient_on_average():
    """A sampled cache's rows (top k, then draws from the rest at weight rest / draws, repeats allowed): the
    gradient is student probabilities minus the weights summed per token, so with many draws it nears the full
    forward-KL gradient; a zero-weight slot (a row with nothing outside its top k) counts nothing."""
    from distill.lm.cache.build import Draws

    generator = torch.Generator().manual_seed(0)
    student = torch.randn(1, 4, 30, generator=generator, requires_grad=True)
    teacher = torch.randn(1, 4, 30, generator=generator) * 2
    labels = torch.tensor([[1, 2, 3, 4]])
    logprobs = torch.log_softmax(teacher, -1).flatten(0, 1)
    top = logprobs.topk(3, -1)
    weights, drawn = Draws(50_000, seed=0, shard=0, device=torch.device("cpu")).rows(logprobs, top.indices)
    sampled = TeacherTopK(torch.cat([top.values, weights], -1)[None], torch.cat([top.indices, drawn], -1)[None])
    gradient, = torch.autograd.grad(distill_topk(LogitSource(student), sampled, labels), student)
    full, = torch.autograd.grad(distill_tokens(forward_kl, LogitSource(student), LogitSource(teacher), labels),
                                student)
    torch.testing.assert_close(gradient, full, atol=2e-3, rtol=0)
    assert not torch.allclose(gradient, torch.autograd.grad(
        distill_topk(LogitSource(student), TeacherTopK(top.values[None], top.indices[None]), labels), student)[0],
        atol=2e-3)  # the top 3 with a tail bucket has another gradient

    zero_weight = TeacherTopK(torch.tensor([[[0.0, float("-inf")]] * 4]), torch.tensor([[[5, 7]] * 4]))
    value = distill_topk(LogitSource(student), zero_weight, labels)
    assert value.item() == pytest.approx(-torch.log_softmax(student[0, :3], -1)[:, 5].mean().item(), rel=1e-6)
    assert torch.isfinite(torch.autograd.grad(value, student)[0]).all()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_closed_forms_give_autograds_values_and_gradients(temperature):
    """CE, forward KL and top-k KL with the tail bucket (on a top 3 and on sampled slots with a repeated token and a
    zero weight) train from values and gradients in closed form: they equal autograd's on the same rows."""
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(5, 11, generator=generator) * 3, torch.randn(5, 11, generator=generator) * 3
    targets = torch.randint(0, 11, (5,), generator=generator)
    top = torch.log_softmax(teacher / temperature, -1).topk(3, -1)
    # two draws of token 10 at weight 0.1 each, then a zero-weight slot repeating the top token
    sampled = (torch.cat([top.values, torch.full((5, 2), math.log(0.1)), torch.full((5, 1), float("-inf"))], -1),
               torch.cat([top.indices, torch.full((5, 2), 10), top.indices[:, :1]], -1))
    cases = {"ce": (cross_entropy_rows, None), "forward_kl": (scaled_divergence(forward_kl, temperature), None),
             "topk": (scaled_topk_kl(temperature, True), (top.values, top.indices)),
             "sampled": (scaled_topk_kl(temperature, True), sampled)}
    for name, (row_loss, topk) in cases.items():
        leaf = student.clone().requires_grad_()
        values = row_loss(TokenRows(leaf, teacher, topk, targets))
        (expected,) = torch.autograd.grad(values.sum(), leaf)
        closed_values, gradient = row_loss.closed_form(TokenRows(student, teacher, topk, targets),
                                                       SoftenedStudent(student))
        torch.testing.assert_close(closed_values, values.detach(), msg=name)
        torch.testing.assert_close(gradient, expected, msg=name)


def test_topk_kl_merges_repeated_slots_into_one_token_of_their_total_weight():
    student = torch.tensor([[0.5, -1.0, 2.0, 0.0, 1.0]])
    q = torch.softmax(student, -1)[0]
    # token 2 drawn twice (0.2 each), token 4 once (0.2), and a slot of weight 0: the estimate is {0: .4, 2: .4, 4: .2}
    slots = torch.tensor([[0.4, 0.2, 0.2, 0.2, 0.0]]).log(), torch.tensor([[0, 2, 4, 2, 1]])
    merged = {0: 0.4, 2: 0.4, 4: 0.2}
    expected = sum(p * math.log(p / q[token]) for token, p in merged.items())
    assert topk_kl(student, *slots, 1.0, tail=True).item() == pytest.approx(expected, rel=1e-5)
    assert expected > 0


def test_topk_refuses_ids_beyond_the_compared_vocabulary():
    teacher = topk_of(TEACHER, 2)
    with pytest.raises(ValueError, match="token id 2, beyond the 2 token ids compared"):
        distill_topk(LogitSource(STUDENT), teacher, LABELS, vocab_size=2)


def random_case(seed=0, batch=2, length=13, hidden=8, vocab=37):
    generator = torch.Generator().manual_seed(seed)
    states_s = torch.randn(batch, length, hidden, generator=generator, requires_grad=True)
    states_t = torch.randn(batch, length, hidden, generator=generator)
    head_s, head_t = torch.nn.Linear(hidden, vocab), torch.nn.Linear(hidden, vocab, bias=False)
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[0, :4] = -100  # a prompt
    labels[1, 9:] = -100  # padding
    return states_s, head_s, states_t, head_t, labels


def unchunked(divergence, states_s, head_s, states_t, head_t, labels, temperature):
    """The same divergence on every real position's logits at once: no chunks, no checkpointing."""
    keep = labels[:, 1:] != -100
    student, teacher = head_s(states_s[:, :-1][keep]).float(), head_t(states_t[:, :-1][keep]).float()
    return divergence(student, teacher, temperature).mean() * temperature ** 2


@pytest.mark.parametrize("divergence", [forward_kl, reverse_kl, lambda s, t, temp: generalized_jsd(s, t, temp, 0.3)])
def test_chunked_equals_unchunked_in_value_and_gradients(divergence):
    states_s, head_s, states_t, head_t, labels = random_case()
    reference = unchunked(divergence, states_s, head_s, states_t, head_t, labels, 2.0)
    reference_grads = torch.autograd.grad(reference, [states_s, head_s.weight, head_s.bias])
    for chunk_size in [1, 4, 7, 16, 1000]:  # 7 divides neither the length nor the 17 real positions
        value = distill_tokens(divergence, LogitSource(states_s, head_s), LogitSource(states_t, head_t), labels,
                               2.0, chunk_size)
        grads = torch.autograd.grad(value, [states_s, head_s.weight, head_s.bias])
        assert value.item() == pytest.approx(reference.item(), rel=1e-6, abs=1e-7)
        for grad, expected in zip(grads, reference_grads):
            torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)


def test_chunked_ce_and_topk_equal_one_chunk():
    states_s, head_s, states_t, head_t, labels = random_case(seed=1)
    topk = topk_of(head_t(states_t).detach(), 5)
    losses = [lambda chunk: next_token_ce(LogitSource(states_s, head_s), labels, chunk),
              lambda chunk: distill_topk(LogitSource(states_s, head_s), topk, labels, 1.0, True, chunk)]
    for loss in losses:
        whole = loss(1000)
        whole_grad, = torch.autograd.grad(whole, [states_s])
        for chunk_size in [3, 5]:
            value = loss(chunk_size)
            assert value.item() == pytest.approx(whole.item(), rel=1e-6)
            torch.testing.assert_close(torch.autograd.grad(value, [states_s])[0], whole_grad, rtol=1e-5, atol=1e-7)


# ----- one pass for all token losses, gradients taken in forward -------------------------------------------------
class LoRAHead(torch.nn.Module):
    """A frozen LM head plus a trainable low-rank update, as a LoRA wrapper makes it."""

    def __init__(self, hidden, vocab):
        super().__init__()
        self.base = torch.nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
        self.down, self.up = torch.nn.Parameter(torch.randn(2, hidden)), torch.nn.Parameter(torch.randn(vocab, 2))

    def forward(self, states):
        return self.base(states) + states @ self.down.T @ self.up.T


class TinyLM(torch.nn.Module):
    """Embedding -> one mixing layer -> LM head (tied to the embedding, untied with a bias, or LoRA-wrapped)."""

    def __init__(self, head_kind, hidden=8, vocab=37):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.mix = torch.nn.Embedding(vocab, hidden), torch.nn.Linear(hidden, hidden)
        self.head = {"tied": lambda: torch.nn.Linear(hidden, vocab, bias=False),
                     "bias": lambda: torch.nn.Linear(hidden, vocab),
                     "lora": lambda: LoRAHead(hidden, vocab)}[head_kind]()
        if head_kind == "tied":
            self.head.weight = self.embed.weight

    def forward(self, ids):
        states = torch.tanh(self.mix(self.embed(ids)))
        return CausalLMOutput(logits=self.head(states), hidden_states=(states,))


def lm_batch(seed, batch=2, length=11, vocab=37):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt
    labels[1, 8:] = -100  # padding
    return ids, labels


SETUP = LossSetup(PretrainedConfig(), PretrainedConfig(), None)  # token losses read neither model's config

MIXES = {
    "forward_kl+ce": [LossConfig(name="forward_kl", weight=0.7, temperature=2.0),
                      LossConfig(name="next_token_ce", weight=0.3)],
    "jsd": [LossConfig(name="jsd", beta=0.3, temperature=1.5)],
    "total_variation+forward_kl": [LossConfig(name="total_variation"), LossConfig(name="forward_kl", weight=0.5)],
    "topk_tail": [LossConfig(name="topk_kl", topk_tail=True), LossConfig(name="next_token_ce", weight=0.5)],
    "topk_renormalised": [LossConfig(name="topk_kl", topk_tail=False, temperature=2.0)],
    "topk_tail_t2": [LossConfig(name="topk_kl", topk_tail=True, temperature=2.0)],
}


def naive_total(specs, student_logits, teacher_logits, topk, labels):
    """The losses on every real position's full logits at once, and each loss's value."""
    keep = (labels[:, 1:] != -100).flatten()
    flat = lambda tensor: tensor[:, :-1].reshape(-1, tensor.shape[-1])[keep]
    student, teacher, targets = flat(student_logits), flat(teacher_logits), labels[:, 1:].flatten()[keep]
    values = {}
    for spec in specs:
        t = spec.temperature
        if spec.name == "next_token_ce":
            values[spec.name] = torch.nn.functional.cross_entropy(student, targets)
        elif spec.name == "topk_kl":
            rows = topk_kl(student, flat(topk.logprobs).float(), flat(topk.indices).long(), t, spec.topk_tail)
            values[spec.name] = rows.mean() * t ** 2
        else:
            divergence = {"forward_kl": forward_kl, "total_variation": total_variation}.get(
                spec.name, partial(generalized_jsd, beta=spec.beta))
            values[spec.name] = divergence(student, teacher, t).mean() * t ** 2
    return sum(spec.weight * values[spec.name] for spec in specs), values


def fused_case(mix, head_kind, chunk_size, seed=0):
    """The fused total and parts of a mix on a TinyLM, and the naive ones, both as functions of the student."""
    specs = [LossConfig(**{**vars(spec), "chunk_size": chunk_size}) for spec in MIXES[mix]]
    student, teacher = TinyLM(head_kind), TinyLM("bias")
    teacher.requires_grad_(False)
    ids, labels = lm_batch(seed)
    teacher_out = teacher(ids)
    topk = topk_of(teacher_out.logits, 5, specs[0].temperature)
    losses = build_losses(specs, SETUP)
    out = student(ids)
    inputs = LossInputs(out, teacher_out, labels, None, batch=topk.as_batch(), student_head=student.head,
                        teacher_head=teacher.head)
    fused = token_losses(dict(losses), {name: loss.weight for name, loss in losses.items()}, inputs)
    naive = naive_total(specs, out.logits, teacher_out.logits, topk, labels)
    return student, losses, inputs, fused, naive


def student_gradients(student, total):
    params = [param for param in student.parameters() if param.requires_grad]
    return torch.autograd.grad(total, params, retain_graph=True)


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("head_kind", ["tied", "bias", "lora"])
def test_fused_losses_and_gradients_equal_full_logits(mix, head_kind):
    student, losses, inputs, (total, parts), (naive, naive_parts) = fused_case(mix, head_kind, chunk_size=3)
    torch.testing.assert_close(total, naive, rtol=1e-5, atol=1e-6)
    for name, value in parts.items():
        torch.testing.assert_close(value, naive_parts[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(value, losses[name](inputs).detach(), rtol=1e-5, atol=1e-6)  # each loss alone
    # every trainable parameter: the states' path (embedding, mixing layer) and the head's (tied, bias, LoRA)
    for grad, expected in zip(student_gradients(student, total), student_gradients(student, naive)):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mix", ["forward_kl+ce", "topk_tail"])
def test_fused_chunk_sizes_agree(mix):
    results = []
    for chunk_size in [1, 3, 1000]:  # 1000: one chunk longer than the 16 real positions
        student, _, _, (total, parts), _ = fused_case(mix, "tied", chunk_size)
        results.append((total.detach(), parts, student_gradients(student, total)))
    for total, parts, grads in results[1:]:
        torch.testing.assert_close(total, results[0][0], rtol=1e-6, atol=1e-7)
        for name in parts:
            torch.testing.assert_close(parts[name], results[0][1][name], rtol=1e-6, atol=1e-7)
        for grad, expected in zip(grads, results[0][2]):
            torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)


def test_fused_pass_takes_the_smallest_chunk_size(monkeypatch):
    specs = [LossConfig(name="forward_kl", chunk_size=5), LossConfig(name="next_token_ce", chunk_size=3)]
    losses = build_losses(specs, SETUP)
    student, teacher = TinyLM("tied"), TinyLM("bias")
    ids, labels = lm_batch(0)
    seen = []
    project = LogitSource.project
    monkeypatch.setattr(LogitSource, "project", lambda self, states, vocab: seen.append(len(states)) or
                        project(self, states, vocab))
    inputs = LossInputs(student(ids), teacher(ids), labels, None, student_head=student.head, teacher_head=teacher.head)
    token_losses(dict(losses), {"forward_kl": 1.0, "next_token_ce": 1.0}, inputs)
    assert max(seen) == 3  # the 16 real positions: student and teacher rows, 3 at a time


def test_gradient_accumulation_over_two_micro_batches_equals_one_batch():
    losses = build_losses(MIXES["forward_kl+ce"], SETUP)
    weights = {name: loss.weight for name, loss in losses.items()}
    student, teacher = TinyLM("tied"), TinyLM("bias").requires_grad_(False)
    ids, labels = lm_batch(0)
    labels[0, 8:] = -100  # both examples: 7 real targets, so the batch mean is the mean of the two
    ids, labels = torch.cat([ids, ids.flip(0)]), torch.cat([labels, labels.flip(0)])

    def backward(rows, scale):
        inputs = LossInputs(student(ids[rows]), teacher(ids[rows]), labels[rows], None, student_head=student.head,
                            teacher_head=teacher.head)
        (token_losses(dict(losses), weights, inputs)[0] * scale).backward()

    backward(slice(0, 4), 1.0)
    whole = [param.grad.clone() for param in student.parameters()]
    student.zero_grad()
    backward(slice(0, 2), 0.5)
    backward(slice(2, 4), 0.5)
    for param, expected in zip(student.parameters(), whole):
        torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-7)


def test_without_grad_mode_the_pass_builds_no_graph():
    student, teacher = TinyLM("tied"), TinyLM("bias")
    ids, labels = lm_batch(0)
    losses = build_losses(MIXES["forward_kl+ce"], SETUP)
    with torch.no_grad():
        inputs = LossInputs(student(ids), teacher(ids), labels, None, student_head=student.head,
                            teacher_head=teacher.head)
        total, _ = token_losses(dict(losses), {"forward_kl": 1.0, "next_token_ce": 1.0}, inputs)
    assert not total.requires_grad


# ----- the vocabulary check ---------------------------------------------------------------------------------------
WORDS = ["the", "film", "was", "good", "bad"]


def test_identical_vocabularies_pass_without_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert common_vocab_size(make_tokenizer(WORDS), make_tokenizer(WORDS), 10, 10) == 10
    assert not caplog.records


@pytest.mark.parametrize("student_words, student_logits, teacher_logits, shared", [
    (WORDS, 16, 10, 10),  # the student's embedding padded beyond the tokenizer's 10 tokens
    (WORDS[:3], 8, 10, 8),  # a truncated student vocabulary
    (WORDS + ["dull"], 11, 10, 10),  # a padded student vocabulary
])
def test_prefix_vocabularies_are_cut_to_the_shared_ids_with_a_warning(caplog, student_words, student_logits,
                                                                      teacher_logits, shared):
    with caplog.at_level(logging.WARNING):
        size = common_vocab_size(make_tokenizer(student_words), make_tokenizer(WORDS), student_logits, teacher_logits)
    assert size == shared
    assert (f"student vocabulary (tokenizer {len(student_words) + 5}, logits {student_logits}) and teacher "
            f"vocabulary (tokenizer 10, logits {teacher_logits})") in caplog.text
    assert f"first {shared} token ids" in caplog.text


def test_other_vocabularies_are_a_config_error_suggesting_hidden_states():
    with pytest.raises(ConfigError, match="vocabularies differ.*set student_tokenizer and use the cross-tokenizer losses"):
        common_vocab_size(make_tokenizer(WORDS[::-1]), make_tokenizer(WORDS), 10, 10)


# ----- registered losses and training -------------------------------------------------------------------------
@pytest.mark.parametrize("spec, message", [
    (dict(name="jsd", beta=1.5), r"loss 'jsd': beta is a mixing weight in 0..1 .*got 1.5"),
    (dict(name="forward_kl", chunk_size=0), "loss 'forward_kl': chunk_size is a number of positions, at least 1"),
])
def test_option_errors_are_found_by_check_stages(spec, message):
    with pytest.raises(ConfigError, match=rf"stages\[0\]: {message}"):
        check_stages([StageConfig(losses=[LossConfig(**spec)])])


def test_topk_loss_needs_the_cache_in_its_inputs():
    student = tiny_causal_lm(12, tied=True)
    loss = build_losses([LossConfig(name="topk_kl")], LossSetup(student.config, None, None))["topk_kl"]
    inputs = LossInputs(CausalLMOutput(logits=STUDENT), None, LABELS, torch.ones(1, 4))
    with pytest.raises(ValueError, match="reads the teacher's top-k"):
        loss(inputs)
    inputs.batch = topk_of(TEACHER, 2).as_batch()
    assert loss(inputs).item() == pytest.approx(distill_topk(LogitSource(STUDENT), topk_of(TEACHER, 2),
                                                             LABELS).item())


def test_a_few_steps_through_the_lm_heads_lower_the_loss():
    vocab = 24
    teacher, student = tiny_causal_lm(vocab, tied=False), tiny_causal_lm(vocab, tied=True).train()
    losses = build_losses([LossConfig(name="forward_kl", temperature=2.0, chunk_size=7),
                           LossConfig(name="next_token_ce", weight=0.5, chunk_size=7)],
                          LossSetup(student.config, teacher.config, None, vocab_size=vocab))
    ids = torch.randint(4, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, 8:] = -100
    no_logits = torch.empty(0, dtype=torch.long)  # logits_to_keep: the models compute none
    with torch.no_grad():
        teacher_out = teacher(ids, output_hidden_states=True, logits_to_keep=no_logits)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    totals = []
    for _ in range(6):
        out = student(ids, output_hidden_states=True, logits_to_keep=no_logits)
        assert out.logits.shape == (2, 0, vocab)
        inputs = LossInputs(out, teacher_out, labels, torch.ones_like(ids), student_head=student.lm_head,
                            teacher_head=teacher.lm_head)
        total = sum(loss.weight * loss(inputs) for loss in losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert all(later < earlier for earlier, later in zip(totals, totals[1:]))
    assert totals[-1] < 0.85 * totals[0]

    with torch.no_grad():  # reading the heads gives what the models' own logits give
        full = student(ids, output_hidden_states=True)
        through_head = losses["next_token_ce"](LossInputs(full, None, labels, None, student_head=student.lm_head))
        from_logits = losses["next_token_ce"](LossInputs(full, None, labels, None))
    assert through_head.item() == pytest.approx(from_logits.item(), rel=1e-6)
