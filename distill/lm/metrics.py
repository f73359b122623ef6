"""What a causal-LM run measures: perplexity over real target tokens (the LM head run a chunk of positions at a time,
so no full logits), the validation metric that selects its best epoch; the same over whole texts of any length,
through sliding windows."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from distill.core.evaluate import ValidationMetric
from distill.core.loss_interface import model_inputs
from distill.core.run import evaluation_loader
from distill.lm.sampling import SamplingConfig, complete, pack_completions
from distill.losses.causal.fused import IGNORE_INDEX, LogitSource, next_tokens, target_positions


@torch.no_grad()
def perplexity(model: PreTrainedModel, loader: DataLoader, accelerator: Accelerator, chunk_size: int = 256) -> float:
    """exp of the mean next-token negative log-likelihood over every real target token of the loader (labels not
    -100), gathered across processes. The LM head runs `chunk_size` positions at a time: no full logits."""
    was_training = model.training
    model.eval()
    nll = tokens = 0.0
    for batch in loader:
        outputs = model(**model_inputs(batch), output_hidden_states=True,
                        logits_to_keep=torch.empty(0, dtype=torch.long))
        sums, counts = example_nll(LogitSource.of(outputs, model.get_output_embeddings()), batch["labels"], chunk_size)
        sums, counts = accelerator.gather_for_metrics((sums, counts))
        nll, tokens = nll + sums.sum().item(), tokens + counts.sum().item()
    model.train(was_training)
    return math.exp(nll / max(tokens, 1))


def example_nll(source: LogitSource, labels: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example of the batch: the summed negative log-likelihood of its real next tokens, and their number."""
    targets, positions = next_tokens(labels).flatten(), target_positions(labels)
    sums = torch.zeros(len(labels), device=labels.device)
    for chunk in positions.split(chunk_size):
        nll = F.cross_entropy(source.rows(chunk, None), targets[chunk], reduction="none")
        sums.index_add_(0, chunk // labels.shape[1], nll)
    return sums, torch.bincount(positions // labels.shape[1], minlength=len(labels))


def sliding_windows(ids: list[int], max_length: int) -> list[dict[str, list[int]]]:
    """A text of any length as windows of at most `max_length` tokens, `max_length // 2` apart, each labelled only at
    the tokens that no earlier window scored (transformers' perplexity guide): every token but the first is predicted
    once, and from the second window on with at least `max_length // 2` tokens of context."""
    windows, scored = [], 0
    for start in range(0, len(ids), max(max_length // 2, 1)):
        end = min(start + max_length, len(ids))
        windows.append({"input_ids": ids[start:end], "labels": [IGNORE_INDEX] * (scored - start) + ids[scored:end]})
        scored = end
        if end == len(ids):
            break
    return windows


def whole_text_perplexity(model: PreTrainedModel, texts: list[list[int]], max_length: int, collate: Callable,
                          batch_size: int, accelerator: Accelerator) -> float:
    """`perplexity` over whole texts of any length (token ids, untruncated), through their `sliding_windows`."""
    windows = [window for ids in texts for window in sliding_windows(ids, max_length)]
    return perplexity(model, evaluation_loader(accelerator, windows, collate, batch_size), accelerator)


PERPLEXITY = ValidationMetric("perplexity", perplexity, higher_is_better=False)


@torch.no_grad()
def teacher_nll_of_completions(student: PreTrainedModel, teacher: PreTrainedModel, prompts: list[list[int]],
                               sampling: SamplingConfig, stops: set[int], pad_id: int, batch_size: int
                               ) -> tuple[dict[str, float], list[list[int]]]:
    """The student's greedy (or `sampling`) completions of `prompts`, scored by the teacher: its mean negative
    log-likelihood per completion token (lower: the student writes what the teacher would have written), with their
    `generation_scores`; and the completions."""
    was_training = teacher.training
    teacher.eval()
    nll = tokens = 0.0
    completions = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        written = complete(student, chunk, sampling, stops, pad_id)
        batch = {name: value.to(teacher.device) for name, value in pack_completions(chunk, written, pad_id).items()}
        # as in training: a sharded teacher's gathered weights were made under inference mode, and only there can
        # they be gathered into again
        with torch.inference_mode():
            outputs = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            sums, counts = example_nll(LogitSource(outputs.logits), batch["labels"], chunk_size=256)
        nll, tokens = nll + sums.sum().item(), tokens + counts.sum().item()
        completions += written
    teacher.train(was_training)
    return {"teacher_nll": nll / max(tokens, 1), **generation_scores(completions)}, completions


def generation_scores(completions: list[list[int]]) -> dict[str, float]:
    """What greedy completions show that perplexity does not: the share that loop (`loops`), their distinct-2, and
    their mean length in tokens."""
    return {"loop_share": sum(map(loops, completions)) / max(len(completions), 1),
            "completion_distinct_2": distinct_bigrams(completions),
            "completion_tokens": sum(map(len, completions)) / max(len(completions), 1)}


LOOP_SPAN = 4
"""The shortest span whose back-to-back repeat counts as a loop."""


def loops(tokens: list[int], span: int = LOOP_SPAN) -> bool:
    """Whether a completion loops: some span of at least `span` tokens is followed right away by itself
    (`A B C D A B C D`, or "is a story of the world is a story of the world"). A cycle is caught once it has gone
    round twice (a cycle shorter than `span` tokens: twice its smallest multiple that is not), while prose that uses
    a phrase twice apart, or doubles a short word ("very very good"), does not count."""
    for shift in range(span, len(tokens) // 2 + 1):
        run = 0
        for a, b in zip(tokens, tokens[shift:]):
            run = run + 1 if a == b else 0
            if run == shift:
                return True
    return False


def distinct_bigrams(completions: list[list[int]]) -> float:
    """distinct-2 (Li et al. 2016): the share of the completions' token bigrams that are distinct. A teacher finds a
    loop ("the story of the story of ...") likely, so a low teacher NLL from looping text shows here as a low value."""
    bigrams = [tuple(c[i:i + 2]) for c in completions for i in range(len(c) - 1)]
    return len(set(bigrams)) / max(len(bigrams), 1)
