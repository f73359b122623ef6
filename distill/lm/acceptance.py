"""How good a draft model is for speculative decoding with a target model, measured offline: the draft proposes k
tokens, the target checks them in one forward pass and keeps the longest accepted prefix plus one token of its own,
so the speed-up follows from the tokens each target pass yields.

Greedy decoding: the draft's proposals agree with the target's greedy path up to their first difference, and up to
there the draft saw exactly the target's tokens, so one teacher-forced pass of the draft over the target's greedy
continuation says, at every position, whether its proposal would be accepted. `greedy_tokens_per_pass` replays the
decoding loop on those matches: exact, not an estimate.

Sampled decoding (the speculative sampling rule of Leviathan et al. 2023 and Chen et al. 2023): a proposal is
accepted with probability sum_x min(p(x), q(x)) = 1 - TV(p, q), p the target's and q the draft's next-token
distribution. `acceptance_rate` is its mean over the positions of the target's continuations, alpha; with k proposals
a target pass then yields (1 - alpha^(k+1)) / (1 - alpha) tokens in expectation, taking the positions' rates as equal."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import PreTrainedModel

from distill.core.errors import ConfigError
from distill.core.models import load_tokenizer, vocabulary_difference
from distill.lm.sampling import SamplingConfig, complete


def check_draft_tokenizer(draft: str, target: str) -> None:
    """A draft must propose the target's own token ids: the same tokenizer vocabulary, id for id."""
    differ = vocabulary_difference(load_tokenizer(draft), load_tokenizer(target))
    if differ:
        raise ConfigError(f"draft {draft} and target {target} tokenize differently ({differ}): a draft must propose "
                          "the target's own token ids, which cross-tokenizer distillation cannot give it")


def greedy_tokens_per_pass(matches: list[list[bool]], k: int) -> float:
    """Tokens per target pass when the draft proposes `k` tokens, from each continuation's per-position matches."""
    if k < 1:
        raise ValueError(f"k must be at least 1; got {k}")
    tokens = passes = 0
    for row in matches:
        position = 0
        while position < len(row):
            accepted = 0
            while accepted < k and position + accepted < len(row) and row[position + accepted]:
                accepted += 1
            made = min(accepted + 1, len(row) - position)  # the accepted proposals and the target's own next token
            tokens += made
            position += made
            passes += 1
    return tokens / max(passes, 1)


def expected_tokens_per_pass(alpha: float, k: int) -> float:
    """Leviathan et al.'s expected tokens per target pass at acceptance rate `alpha` with `k` proposals."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def greedy_continuation(model: PreTrainedModel, prompt: list[int], new_tokens: int) -> list[int]:
    """The model's `new_tokens` most likely next tokens, end of text included (a serving engine stops there; the
    draft is scored on the same path either way). One prompt at a time, so no padding enters."""
    return complete(model, [prompt], SamplingConfig(temperature=0.0, max_new_tokens=new_tokens), stop_ids=set(),
                    pad_id=0)[0]


LogitsOf = Callable[[list[int]], torch.Tensor]
"""A draft as the scorer sees it: a row of token ids -> its next-token logits at every position (any runtime)."""


def model_logits(model: PreTrainedModel) -> LogitsOf:
    device = next(model.parameters()).device
    return lambda ids: model(torch.tensor([ids], device=device)).logits[0]


@dataclass
class TargetPaths:
    """The target's greedy continuation of each prompt (prompt and continuation as one row of ids) and its logits
    at the positions that predict the continuation: what every draft is scored against, computed once."""
    ids: list[list[int]]
    starts: list[int]
    logits: list[torch.Tensor]


@torch.inference_mode()
def target_paths(target: PreTrainedModel, prompts: list[list[int]], new_tokens: int) -> TargetPaths:
    """`target`'s greedy paths from `prompts`, `new_tokens` each (`TargetPaths`)."""
    paths, logits_of = TargetPaths([], [], []), model_logits(target)
    for prompt in prompts:
        row = prompt + greedy_continuation(target, prompt, new_tokens)
        paths.ids.append(row)
        paths.starts.append(len(prompt) - 1)  # the logits that predict each continuation token
        paths.logits.append(logits_of(row)[len(prompt) - 1:-1].float().cpu())
    return paths


@torch.inference_mode()
def draft_agreement(paths: TargetPaths, draft: LogitsOf) -> tuple[list[list[bool]], float]:
    """Per path, whether the draft's greedy proposal equals the target's greedy token at each position of the
    target's continuation; and the mean over those positions of 1 - TV(target, draft)."""
    matches, rates = [], []
    for row, start, target_logits in zip(paths.ids, paths.starts, paths.logits):
        logits = draft(row)[start:-1].double().cpu()
        p = torch.softmax(target_logits.double(), -1)
        q = torch.softmax(logits[:, :p.shape[-1]], -1)  # a draft's padded embedding rows are never target tokens
        matches.append((q.argmax(-1) == torch.tensor(row[start + 1:])).tolist())
        rates.append(torch.minimum(p, q).sum(-1))
    return matches, float(torch.cat(rates).mean()) if rates else 0.0


def paths_acceptance(paths: TargetPaths, draft: LogitsOf, ks: list[int]) -> dict:
    """metrics of `draft` as the paths' target's draft: per k, greedy tokens per target pass (exact) and the
    sampled rule's expected tokens per pass; the sampled acceptance rate alpha; the greedy match share."""
    matches, alpha = draft_agreement(paths, draft)
    flat = [m for row in matches for m in row]
    return {"alpha": alpha, "greedy_match": sum(flat) / max(len(flat), 1), "prompts": len(paths.ids),
            "new_tokens": max((len(row) for row in matches), default=0),
            "per_k": {k: {"greedy_tokens_per_pass": greedy_tokens_per_pass(matches, k),
                          "sampled_tokens_per_pass": expected_tokens_per_pass(alpha, k)} for k in ks}}


def acceptance(target: PreTrainedModel, draft: PreTrainedModel, prompts: list[list[int]], new_tokens: int,
               ks: list[int]) -> dict:
    """`paths_acceptance` of `draft` on `target`'s greedy paths from `prompts`."""
    return paths_acceptance(target_paths(target, prompts, new_tokens), model_logits(draft), ks)
