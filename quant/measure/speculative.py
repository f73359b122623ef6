"""Speculative decoding at batch 1, greedy, run for real: the target alone, or with a draft model proposing `k`
tokens that the target checks in one pass, in transformers (assisted generation: `generate(assistant_model=...)`)
or in llama.cpp (llama-cpp-python's `Llama(draft_model=...)`, the draft a second GGUF model). Either way the target
keeps its own greedy token wherever the draft's differs, so the output is the target's own (the benchmark checks it
token for token).

What a run counts: the target's passes (forward calls) and the tokens the draft proposed. Each target pass makes the
draft tokens it accepts plus one token of its own, so accepted = made - passes; over the tokens a run makes, the
acceptance is accepted / proposed."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from transformers import PreTrainedModel

from distill.core.errors import ConfigError
from distill.core.models import cache_keyword, resolve_model
from quant.export.gguf import greedy_ids

logger = logging.getLogger(__name__)


@dataclass
class Generated:
    """One greedy generation: its tokens, its wall time, the target's passes and the draft's proposals."""

    tokens: list[int]
    seconds: float
    target_passes: int
    proposed: int

    @property
    def accepted(self) -> int:
        return len(self.tokens) - self.target_passes


def check_k(ks: list[int]) -> None:
    if not ks or min(ks) < 1:
        raise ConfigError(f"k (draft tokens per target pass) must be at least 1; got {ks}")


@contextlib.contextmanager
def forward_calls(model: Optional[torch.nn.Module]) -> Iterator[list[int]]:
    """A one-item list that counts `model`'s forward calls inside the block (stays 0 for no model)."""
    calls = [0]
    if model is None:
        yield calls
        return

    def count(*_) -> None:
        calls[0] += 1

    handle = model.register_forward_hook(count)
    try:
        yield calls
    finally:
        handle.remove()


def torch_speculative(target: PreTrainedModel, draft: Optional[PreTrainedModel], prompt: list[int],
                      new_tokens: int, k: int = 1) -> Generated:
    """`new_tokens` greedy tokens of `target`, with `draft` proposing exactly `k` tokens per target pass: transformers
    reads the assistant's settings from the draft's generation config, whose defaults change k as it goes and stop
    a proposal early where the draft is unsure. No end-of-text token stops it (as in llama.cpp's `generate`), and
    no logits processor runs (`min_new_tokens` would add one to every position of both models)."""
    options = {}
    if draft is not None:
        draft.generation_config.update(num_assistant_tokens=k, num_assistant_tokens_schedule="constant",
                                       assistant_confidence_threshold=0.0)
        options["assistant_model"] = draft
    ids = torch.tensor([prompt])
    with forward_calls(target) as passes, forward_calls(draft) as proposed, torch.inference_mode():
        start = time.perf_counter()
        output = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=0, **options)
        seconds = time.perf_counter() - start
    return Generated(output[0, len(prompt):].tolist(), seconds, passes[0], proposed[0])  # a token per draft forward


class GgufDraft:
    """A GGUF model (a `llama_cpp.Llama`) as llama-cpp-python's draft model, its `LlamaDraftModel` interface: called
    with the target's tokens so far, it returns its greedy continuation of `k` tokens. It keeps its own KV cache over
    the prefix it shares with the tokens it is shown, so each call evaluates only what the target accepted since."""

    def __init__(self, llm, k: int):
        check_k([k])
        self.llm, self.k = llm, k
        self.calls = self.proposed = 0

    def __call__(self, input_ids: np.ndarray, /, **kwargs) -> np.ndarray:
        ids, llm = input_ids.tolist(), self.llm
        kept, limit = 0, min(llm.n_tokens, len(ids) - 1)  # at least one token is evaluated, for fresh logits
        while kept < limit and llm.input_ids[kept] == ids[kept]:
            kept += 1
        llm.n_tokens = kept  # eval() drops the cache beyond it
        llm.eval(ids[kept:])
        proposal = [llm.sample(temp=0.0, top_k=1)]
        while len(proposal) < self.k:
            llm.eval(proposal[-1:])
            proposal.append(llm.sample(temp=0.0, top_k=1))
        self.calls += 1
        self.proposed += len(proposal)
        return np.array(proposal, dtype=np.intc)


def gguf_speculative(target, draft, prompt: list[int], new_tokens: int, k: int = 1) -> Generated:
    """`new_tokens` greedy tokens of the GGUF `target` (a `llama_cpp.Llama` that keeps every position's logits), with
    the GGUF `draft` (another) proposing `k` tokens per target pass. The prompt's pass comes before any proposal; each
    proposal is followed by one target pass."""
    proposer = None
    if draft is not None:
        draft.reset()
        proposer = GgufDraft(draft, k)
    target.draft_model = proposer
    try:
        start = time.perf_counter()
        tokens = greedy_ids(target, prompt, new_tokens)
        seconds = time.perf_counter() - start
    finally:
        target.draft_model = None
    if proposer is None:
        return Generated(tokens, seconds, len(tokens), 0)
    return Generated(tokens, seconds, 1 + proposer.calls, proposer.proposed)


def pass_seconds(model, prefix: list[int], size: int, repeats: int) -> float:
    """The median wall time of one pass of `model` (transformers or llama.cpp) over `size` more tokens after `prefix`
    (in its cache): for the target, what checking `size` - 1 proposals costs (a draft proposes one token a pass). A
    pass of several tokens is not free on a CPU, and a speed-up must pay for it."""
    times = []
    if isinstance(model, torch.nn.Module):
        name = cache_keyword(model)
        with torch.inference_mode():
            cache = model(torch.tensor([prefix]), use_cache=True)[name]
            for _ in range(repeats):
                cache.crop(len(prefix) - cache.get_seq_length())  # a negative count: the tokens to drop
                start = time.perf_counter()
                model(torch.tensor([prefix[:size]]), use_cache=True, **{name: cache})
                times.append(time.perf_counter() - start)
        return float(np.median(times))
    model.reset()
    model.eval(prefix)
    for _ in range(repeats):
        model.n_tokens = len(prefix)  # eval() drops the cache beyond it
        start = time.perf_counter()
        model.eval(prefix[:size])
        times.append(time.perf_counter() - start)
    return float(np.median(times))


# ----- checks before any work ---------------------------------------------------------------------------------------
def gguf_vocabulary(path: str) -> list[str]:
    from gguf import GGUFReader

    return GGUFReader(path).fields["tokenizer.ggml.tokens"].contents()


def check_gguf_vocabularies(draft: str, target: str) -> None:
    """A GGUF draft must carry the GGUF target's vocabulary, token for token."""
    a, b = gguf_vocabulary(draft), gguf_vocabulary(target)
    if a != b:
        differ = sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
        raise ConfigError(f"GGUF draft {draft} and GGUF target {target} have different vocabularies (sizes {len(a)} "
                          f"and {len(b)}, {differ} ids differ): a draft must propose the target's own token ids")


def parameter_count(model: str) -> int:
    """Parameters of a GGUF file or of a model folder's safetensors files, from their headers alone."""
    if model.endswith(".gguf"):
        from gguf import GGUFReader

        return sum(int(tensor.n_elements) for tensor in GGUFReader(model).tensors)
    from safetensors import safe_open

    total = 0
    for file in Path(resolve_model(model)).glob("*.safetensors"):
        with safe_open(str(file), "pt") as tensors:
            total += sum(math.prod(tensors.get_slice(name).get_shape()) for name in tensors.keys())
    return total


def warn_if_larger(draft: str, target: str) -> None:
    sizes = parameter_count(draft), parameter_count(target)
    if sizes[0] >= sizes[1]:
        logger.warning("draft %s has %.1fM parameters, its target %s %.1fM: a draft that large cannot make decoding "
                       "faster", draft, sizes[0] / 1e6, target, sizes[1] / 1e6)
