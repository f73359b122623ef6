"""Prompt / completion data for causal LMs: each example is a prompt the model reads and a completion it learns to
write, tokenized so that only the completion's tokens are targets.

Two row formats (as TRL, torchtune and DistillKit take them):
- `prompt_completion`: a prompt and a completion column of text. With `chat_template` the prompt is the user's turn
  and the completion the assistant's answer, rendered by the tokenizer's chat template; without it they are joined
  as plain text and the completion ends with the eos token.
- `chat`: a column of message lists ({role, content}); the last message is the assistant's completion, every message
  before it the prompt, all rendered by the chat template.

A rendered prompt is the template's text up to and including the assistant's header (`add_generation_prompt`), so
that what a model generates after it is the completion."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from transformers import PreTrainedTokenizerBase

from distill.core.errors import ConfigError

FORMATS = ("text", "prompt_completion", "chat")


@dataclass
class PromptCompletion:
    """One example: the messages or text before the completion, and the completion's text."""
    prompt: list[dict] | str
    completion: str


def pairs_from_rows(rows: dict[str, list], corpus) -> list[PromptCompletion]:
    """The examples of a column-wise table in `corpus.format` (not `text`), rows with an empty completion left out."""
    if corpus.format == "prompt_completion":
        need = (corpus.prompt_column, corpus.completion_column)
    else:
        need = (corpus.messages_column,)
    for column in need:
        if column not in rows:
            raise ConfigError(f"data.format '{corpus.format}' reads column '{column}', which {corpus.source} lacks; "
                              f"columns: {', '.join(rows)}")
    if corpus.format == "prompt_completion":
        pairs = [PromptCompletion(user_turn(prompt) if corpus.chat_template else prompt, completion)
                 for prompt, completion in zip(rows[corpus.prompt_column], rows[corpus.completion_column])]
    else:
        pairs = [_split_messages(messages, i) for i, messages in enumerate(rows[corpus.messages_column])]
    return [pair for pair in pairs if pair.completion and pair.completion.strip()]


def uses_chat_template(corpus) -> bool:
    """Whether the corpus's examples are rendered by the tokenizer's chat template."""
    return corpus.format == "chat" or (corpus.format == "prompt_completion" and corpus.chat_template)


def user_turn(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def _split_messages(messages: list[dict], row: int) -> PromptCompletion:
    if not messages or messages[-1].get("role") != "assistant":
        raise ConfigError(f"data.format 'chat': row {row} does not end with an assistant message (the completion "
                          "learned); its roles: " + ", ".join(str(m.get("role")) for m in messages or []))
    return PromptCompletion(list(messages[:-1]), messages[-1]["content"])


def check_chat_template(tokenizer: PreTrainedTokenizerBase, what: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{what} needs the tokenizer's chat template, and this tokenizer has none: set "
                          "data.chat_template=false (prompt and completion joined as plain text) or use a chat model's "
                          "tokenizer")


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: list[dict] | str) -> list[int]:
    """The token ids a model reads before writing the completion."""
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return _template_ids(tokenizer, prompt, add_generation_prompt=True)


def example_ids(tokenizer: PreTrainedTokenizerBase, pair: PromptCompletion) -> tuple[list[int], int]:
    """The whole example's token ids and how many of them are the prompt's. Refused, naming the example, when the
    rendered prompt is not a prefix of the rendered example (a template that rewrites earlier turns)."""
    prompt = prompt_ids(tokenizer, pair.prompt)
    if isinstance(pair.prompt, str):
        completion = tokenizer(pair.completion, add_special_tokens=False)["input_ids"]
        full = prompt + completion + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    else:
        full = _template_ids(tokenizer, [*pair.prompt, {"role": "assistant", "content": pair.completion}],
                             add_generation_prompt=False)
    if full[:len(prompt)] != prompt:
        raise ConfigError("the chat template renders this prompt differently alone and followed by its completion, so "
                          f"the completion's tokens cannot be told apart: {str(pair.prompt)[:80]!r}")
    return full, len(prompt)


def _template_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class TokenizedCorpus:
    """A corpus's token ids truncated to `max_length`, each example's length before truncation, its prompt's length
    (None for plain text: every token a target), and how many examples were left out because the prompt alone
    fills `max_length`."""
    ids: list[list[int]]
    full_lengths: list[int]
    prompt_lengths: Optional[list[int]] = None
    dropped: int = 0
    columns: dict[str, list] = field(default_factory=dict)
    """More per-example columns the splits carry (a teacher's own tokenization, aligned positions)."""
    whole: Optional[list[list[int]]] = None
    """Plain text: each text's token ids untruncated (what packing and the whole-text perplexity read)."""


def tokenize_pairs(tokenizer: PreTrainedTokenizerBase, pairs: list[PromptCompletion], max_length: int,
                   uses_template: bool) -> TokenizedCorpus:
    """Each example's ids and prompt length, the completion cut at `max_length` tokens; an example whose prompt
    leaves no room for a completion token is dropped (counted)."""
    if uses_template:
        check_chat_template(tokenizer, "data.format 'chat' or 'prompt_completion' with chat_template")
    out = TokenizedCorpus([], [], [], 0)
    for pair in pairs:
        ids, prompt_length = example_ids(tokenizer, pair)
        if prompt_length >= max_length:
            out.dropped += 1
            continue
        out.ids.append(ids[:max_length])
        out.prompt_lengths.append(prompt_length)
        out.full_lengths.append(len(ids))
    if not out.ids:
        raise ConfigError(f"every one of the {len(pairs)} examples has a prompt of at least data.max_length="
                          f"{max_length} tokens: raise data.max_length")
    return out

