"""Completions of a batch of prompts, written token by token with the model's KV cache: greedy, or sampled at a
temperature and top-p from a `torch.Generator` of the caller's, so that the same generator state draws the same
tokens (a resumed run's on-policy batches equal an uninterrupted run's). What on-policy distillation, teacher-written
data and the evaluation of completions share."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from transformers import PreTrainedModel

from distill.core.errors import ConfigError
from distill.core.models import cache_keyword


@dataclass
class SamplingConfig:
    """How a model writes completions."""
    temperature: float = 1.0
    """Sampling temperature; 0 writes greedily (the most likely token each time)."""
    top_p: float = 1.0
    """Nucleus sampling: draw from the smallest set of tokens whose probability reaches top_p; 1 draws from all."""
    max_new_tokens: int = 64
    """The most tokens written after each prompt (fewer when the model writes its end-of-sequence token)."""


def check_sampling(cfg, where: str) -> None:
    """Config-only checks of sampling settings (a `SamplingConfig` or a config with the same three fields)."""
    if cfg.temperature < 0:
        raise ConfigError(f"{where}.temperature must be >= 0 (0: greedy); got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        raise ConfigError(f"{where}.top_p must be in (0, 1]; got {cfg.top_p}")
    if cfg.max_new_tokens < 1:
        raise ConfigError(f"{where}.max_new_tokens must be at least 1; got {cfg.max_new_tokens}")


def pick_tokens(logits: torch.Tensor, cfg: SamplingConfig, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One token id per row of float `logits` (rows, vocabulary)."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / cfg.temperature, -1)
    if cfg.top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        # keep each token whose preceding mass is below top_p: the nucleus, always at least the top token
        outside = (sorted_probs.cumsum(-1) - sorted_probs) >= cfg.top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(outside, 0.0))
    # multinomial on the CPU: the same generator draws the same tokens whatever the device
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)


@torch.no_grad()
def complete(model: PreTrainedModel, prompts: list[list[int]], cfg: SamplingConfig, stop_ids: set[int],
             pad_id: int, generator: Optional[torch.Generator] = None) -> list[list[int]]:
    """Each prompt's completion token ids, ending with the first of `stop_ids` written (kept) or after
    `cfg.max_new_tokens`. Prompts are left-padded into one batch; positions count from each prompt's first token."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    width = max(len(ids) for ids in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + list(ids) for ids in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=device)
    written = torch.empty(len(prompts), 0, dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    cache_name = cache_keyword(model)
    past, step_ids = None, input_ids
    for _ in range(cfg.max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, -step_ids.shape[1]:]
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **{cache_name: past})
        past = out[cache_name]
        tokens = pick_tokens(out.logits[:, -1], cfg, generator).masked_fill(done, pad_id)
        written = torch.cat([written, tokens[:, None]], 1)
        done |= torch.isin(tokens, stops)
        if done.all():
            break
        step_ids, mask = tokens[:, None], torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    model.train(was_training)
    return [until_stop(row, stop_ids) for row in written.tolist()]


def until_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    """`tokens` up to and including the first of `stop_ids`."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i + 1]
    return tokens


def stop_tokens(tokenizer) -> set[int]:
    """The ids that end a completion: eos, and a chat template's end-of-turn token when it has one."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for name in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        token = tokenizer.convert_tokens_to_ids(name)
        if isinstance(token, int) and token != tokenizer.unk_token_id and name in tokenizer.get_vocab():
            ids.add(token)
    return ids


def pack_completions(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                     ignore_index: int = -100) -> dict[str, torch.Tensor]:
    """A right-padded training batch of each prompt followed by its completion: `labels` are the completion's
    tokens, `ignore_index` at the prompt and the padding."""
    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, ignore_index)
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        input_ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        labels[i, len(prompt):len(row)] = input_ids[i, len(prompt):len(row)]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def real_rows(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Each row's real token ids: those its attention mask keeps."""
    return [[token for token, keep in zip(ids, mask) if keep]
            for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist())]


def batch_prompts(batch: dict[str, torch.Tensor], ignore_index: int = -100) -> list[list[int]]:
    """Each row's prompt: its tokens before the first target (`labels` not `ignore_index`)."""
    prompts = []
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        first = next((i for i, label in enumerate(labels) if label != ignore_index), len(ids))
        prompts.append(ids[:first])
    return prompts
