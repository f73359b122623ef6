"""A tiny random Llama for lm-evaluation-harness, with a word-level tokenizer that adds no special tokens (lm-eval
scores a continuation as the tokens that encoding the context with it adds), and a log-likelihood computed by hand."""
from __future__ import annotations

import torch
from tokenizers import processors

from tests.conftest import make_tokenizer, tiny_causal_lm
from tests.helpers.lm_runs import WORDS

TASK_WORDS = ["positive", "negative", "is", "this", "review", "or", "question", "answer", "action", "comedy"]


def plain_tokenizer():
    tokenizer = make_tokenizer(WORDS + TASK_WORDS)
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    tokenizer.eos_token = "[SEP]"
    return tokenizer


def tiny_lm_for_eval():
    tokenizer = plain_tokenizer()
    return tiny_causal_lm(len(tokenizer), tied=True), tokenizer


@torch.no_grad()
def continuation_log_likelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """The summed log-probability of the tokens `continuation` adds to `context`, and whether each is the greedy
    choice."""
    start = len(tokenizer(context)["input_ids"])
    ids = tokenizer(context + continuation)["input_ids"]
    logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    targets = torch.tensor(ids[start:])
    rows = logprobs[start - 1:len(ids) - 1]
    return float(rows.gather(1, targets[:, None]).sum()), bool((rows.argmax(-1) == targets).all())
