"""Tiny causal LMs with real structure, for checks that a broken conversion or quantizer must fail: a random init of a
small model predicts every token almost uniformly, so any corruption of its weights leaves its perplexity and most of
its greedy choices where they were. These models are trained (seconds on a CPU) on text whose next word follows from
the words before it, so their predictions are confident."""
from __future__ import annotations

import copy
import math
import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from tests.conftest import save_smollm2_tokenizer_lm


def cycle_lines(words: list[str], count: int, seed: int = 0, lengths: tuple[int, int] = (6, 12)) -> list[str]:
    """`count` windows (of `lengths` words, inclusive) of one fixed cycle in which every word appears twice, each time
    followed by another word: the next word depends on the two before it, so attention matters as well as the
    embedding."""
    rng = random.Random(seed)
    while True:
        cycle = rng.sample(words, len(words)) + rng.sample(words, len(words))
        if len({(cycle[i - 2], cycle[i - 1]) for i in range(len(cycle))}) == len(cycle):  # no ambiguous context
            break
    lines = []
    for _ in range(count):
        start, length = rng.randrange(len(cycle)), rng.randint(*lengths)
        lines.append(" ".join((cycle * (2 + lengths[1] // len(cycle)))[start:start + length]))
    return lines


def train_causal_lm(model: PreTrainedModel, texts: list[list[int]], steps: int, lr: float = 1e-2) -> PreTrainedModel:
    """`steps` seeded full-batch AdamW steps of next-token cross-entropy on the token ids `texts`; returns `model` in
    eval mode. Only the tokens of `texts` keep their embedding (and output) rows, the others become zero: their logits
    are then exactly 0, so training a copy of the model restricted to the used tokens, with one extra logit
    log(unused tokens) standing for them all, is training the whole model, and costs nothing per vocabulary token."""
    used = sorted({token for ids in texts for token in ids})
    vocab = model.config.vocab_size
    config = copy.deepcopy(model.config)
    config.vocab_size, config.pad_token_id = len(used), None
    torch.manual_seed(0)
    small = type(model)(config)
    small.load_state_dict(rows_of(model.state_dict(), small.state_dict(), used))
    position = {token: i for i, token in enumerate(used)}
    texts = [[position[token] for token in ids] for ids in texts]
    width = max(len(ids) for ids in texts)
    inputs = torch.tensor([ids + [0] * (width - len(ids)) for ids in texts])
    labels = torch.tensor([ids[1:] + [-100] * (width - len(ids) + 1) for ids in texts])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in texts])
    rest = math.log(vocab - len(used))
    optimizer = torch.optim.AdamW(small.parameters(), lr=lr, weight_decay=0.0)
    small.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small train several times faster on one thread than on two busy cores
    try:
        for _ in range(steps):
            logits = small(input_ids=inputs, attention_mask=mask).logits
            logits = torch.cat([logits, logits.new_full((*logits.shape[:2], 1), rest)], -1)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.load_state_dict(rows_of(small.state_dict(), model.state_dict(), used))
    return model.eval()


def rows_of(source: dict, target: dict, used: list[int]) -> dict:
    """`source`'s tensors in `target`'s shapes: vocabulary tensors (the only ones whose shapes differ) cut to the
    `used` rows, or widened from them with zero rows elsewhere."""
    out = {}
    for name, value in source.items():
        if value.shape == target[name].shape:
            out[name] = value
        elif len(used) == target[name].shape[0]:
            out[name] = value[used]
        else:
            out[name] = value.new_zeros(target[name].shape)
            out[name][used] = value
    return out


def save_trained_smollm2_lm(folder: Path, lines: list[str], steps: int = 60) -> Path:
    """The 2-layer Llama of `save_smollm2_tokenizer_lm` (SmolLM2's tokenizer, which llama.cpp's converter knows),
    trained on `lines`."""
    save_smollm2_tokenizer_lm(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    train_causal_lm(model, [tokenizer(line)["input_ids"] for line in lines], steps).save_pretrained(folder)
    return folder
