"""Vocabulary pruning for WordPiece tokenizers (BERT family), as TextPruner does: keep only the tokens that a
corpus uses, plus every special and added token, and drop the other rows of the embedding matrix.

New ids keep the old order. The new tokenizer is the old backend tokenizer with its JSON edited (the WordPiece
vocabulary, the ids of added tokens, of the post-processor's special tokens and of the padding token), wrapped
again in the same tokenizer class with the same settings, so `save_pretrained` writes it and a plain
`AutoTokenizer.from_pretrained` reloads it. WordPiece matches the longest piece of the vocabulary first, so every
word of the corpus is split exactly as before. A word that needs a dropped piece is split into other kept pieces
where it can be ("spells" -> "spell ##s" when only "spell" and "##s" were seen), else becomes the unknown token:
`unknown_fraction` and `changed_fraction` measure both on a text set.

The model keeps the rows of the kept ids, in order: the input embedding, and the output layer of a language
model (still tied to the input embedding where it was). `config.vocab_size` and the special-token ids in the
config (and generation config) follow."""
from __future__ import annotations

import copy
import json
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch
from tokenizers import Tokenizer
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.core.errors import ConfigError

SUPPORTED_MODEL = "WordPiece"
ID_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id", "decoder_start_token_id")
"""Config (and generation config) fields holding token ids, each an int, a list of ints or None."""
OLD_FILE_SETTINGS = ("vocab", "vocab_file", "merges", "tokenizer_file", "tokenizer_object", "added_tokens_decoder",
                     "name_or_path")
"""`init_kwargs` that describe the old vocabulary or where it came from, not how to tokenize."""
ENCODE_CHUNK = 1024


@dataclass
class VocabReport:
    tokenizer: PreTrainedTokenizerBase
    """The pruned tokenizer, matching the pruned model."""
    kept_ids: list[int]
    """Old ids of the kept tokens; a token's new id is its position here."""
    original: int
    """Tokens in the old tokenizer."""

    @property
    def kept(self) -> int:
        return len(self.kept_ids)


def prune_vocabulary(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, corpus: list[str],
                     max_tokens: Optional[int] = None) -> VocabReport:
    """Keep the tokens `corpus` uses (with every special and added token), in `model` and in a new tokenizer; with
    `max_tokens`, only the corpus's most frequent tokens, so that at most that many are kept in all."""
    state = wordpiece_state(tokenizer)
    embedding = word_embedding(model)
    required = (referenced_ids(state) | set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
                | config_ids(model) | padding_row(embedding))
    counts = corpus_counts(tokenizer, corpus)
    kept = sorted(required | (set(counts) if max_tokens is None else
                              most_frequent(tokenizer, counts, max_tokens - len(required), required)))
    if kept[-1] >= embedding.num_embeddings:
        raise ConfigError(f"the tokenizer has id {kept[-1]} but the model has only {embedding.num_embeddings} "
                          "embedding rows: tokenizer and model do not belong together")
    new_id = {old: new for new, old in enumerate(kept)}
    pruned_tokenizer = wrapped_like(tokenizer, remapped_state(state, new_id))
    select_embedding_rows(model, kept, new_id)
    remap_config_ids(model, new_id)
    return VocabReport(pruned_tokenizer, kept, original=len(tokenizer))


def unknown_fraction(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> float:
    """Share of the tokens of `texts` (special tokens not added) that are the unknown token."""
    sequences = encoded(tokenizer, texts)
    total = sum(len(ids) for ids in sequences)
    unknown = sum(ids.count(tokenizer.unk_token_id) for ids in sequences)
    return unknown / total if total else 0.0


def changed_fraction(old: PreTrainedTokenizerBase, new: PreTrainedTokenizerBase, texts: list[str]) -> float:
    """Share of `texts` that `new` splits into other tokens than `old` did: those with a word that needs a
    dropped piece (it becomes the unknown token or is split into other kept pieces)."""
    pairs = zip(encoded(old, texts), encoded(new, texts))
    changed = sum(old.convert_ids_to_tokens(a) != new.convert_ids_to_tokens(b) for a, b in pairs)
    return changed / len(texts) if texts else 0.0


# ----- tokenizer ---------------------------------------------------------------------------------------------

def wordpiece_state(tokenizer: PreTrainedTokenizerBase) -> dict:
    """The backend tokenizer as JSON, after checking that it is a WordPiece one."""
    name = type(tokenizer).__name__
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"vocabulary pruning needs a fast (tokenizers-backed) WordPiece tokenizer; {name} is not "
                          "backed by the tokenizers library")
    state = json.loads(backend.to_str())
    kind = state["model"].get("type")
    if kind != SUPPORTED_MODEL:
        raise ConfigError(f"vocabulary pruning supports {SUPPORTED_MODEL} tokenizers (BERT family); {name} uses a "
                          f"{kind} model")
    return state


def encoded(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens, truncation or padding."""
    sequences = []
    for start in range(0, len(texts), ENCODE_CHUNK):
        chunk = texts[start:start + ENCODE_CHUNK]
        sequences.extend(tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"])
    return sequences


def corpus_counts(tokenizer: PreTrainedTokenizerBase, corpus: list[str]) -> Counter:
    """How often each token id occurs in the corpus."""
    if not corpus:
        raise ConfigError("the vocabulary corpus is empty: give texts whose tokens to keep")
    counts = Counter(token for sequence in encoded(tokenizer, corpus) for token in sequence)
    if not counts:
        raise ConfigError(f"the vocabulary corpus ({len(corpus)} texts) produced no tokens; are the texts empty?")
    return counts


def most_frequent(tokenizer: PreTrainedTokenizerBase, counts: Counter, room: int, required: set[int]) -> set[int]:
    """The corpus's single-character pieces first (with them, a word whose longer pieces were dropped is spelt out
    rather than unknown), then its other tokens by frequency, `room` in all."""
    single = [token for token in counts if token not in required
              and len(tokenizer.convert_ids_to_tokens(token).removeprefix("##")) == 1]
    if room < len(single):
        raise ConfigError(f"vocab.max_tokens leaves room for {max(room, 0)} corpus tokens, fewer than the "
                          f"{len(single)} single characters the corpus uses; raise it")
    rest = [token for token, _ in counts.most_common() if token not in required and token not in set(single)]
    return set(single) | set(rest[:room - len(single)])


def referenced_ids(state: dict) -> set[int]:
    """Ids the backend tokenizer itself uses: the unknown token, added tokens, post-processor and padding."""
    model = state["model"]
    ids = {model["vocab"][model["unk_token"]]} | {token["id"] for token in state["added_tokens"]}
    ids |= set(processor_ids(state["post_processor"]))
    if state.get("padding"):
        ids.add(state["padding"]["pad_id"])
    return ids


def processor_ids(processor: dict | None) -> list[int]:
    """The post-processor's special-token ids: TemplateProcessing's, BertProcessing's, a Sequence's members'."""
    if processor is None:
        return []
    kind = processor["type"]
    if kind == "TemplateProcessing":
        return [i for entry in processor["special_tokens"].values() for i in entry["ids"]]
    if kind == "BertProcessing":
        return [processor["sep"][1], processor["cls"][1]]
    if kind == "Sequence":
        return [i for member in processor["processors"] for i in processor_ids(member)]
    raise ConfigError(f"vocabulary pruning cannot renumber the token ids of a {kind} post-processor")


def remapped_state(state: dict, new_id: dict[int, int]) -> dict:
    """`state` with the vocabulary cut to the kept tokens and every id renumbered."""
    state = copy.deepcopy(state)
    vocab = state["model"]["vocab"]
    state["model"]["vocab"] = {token: new_id[old] for token, old in vocab.items() if old in new_id}
    for token in state["added_tokens"]:
        token["id"] = new_id[token["id"]]
    if state["post_processor"]:
        renumber_post_processor(state["post_processor"], new_id)
    if state.get("padding"):
        state["padding"]["pad_id"] = new_id[state["padding"]["pad_id"]]
    return state


def renumber_post_processor(processor: dict, new_id: dict[int, int]) -> None:
    """Edit, in place, the ids that `processor_ids` reads."""
    kind = processor["type"]
    if kind == "TemplateProcessing":
        for entry in processor["special_tokens"].values():
            entry["ids"] = [new_id[i] for i in entry["ids"]]
    elif kind == "BertProcessing":
        for key in ("sep", "cls"):
            processor[key][1] = new_id[processor[key][1]]
    else:
        for member in processor["processors"]:
            renumber_post_processor(member, new_id)


def wrapped_like(tokenizer: PreTrainedTokenizerBase, state: dict) -> PreTrainedTokenizerBase:
    """A tokenizer of the same class and settings as `tokenizer`, running the backend described by `state`."""
    settings = {key: value for key, value in tokenizer.init_kwargs.items() if key not in OLD_FILE_SETTINGS}
    return type(tokenizer)(tokenizer_object=Tokenizer.from_str(json.dumps(state)), **settings)


# ----- model -------------------------------------------------------------------------------------------------

def word_embedding(model: PreTrainedModel) -> nn.Embedding:
    embedding = model.get_input_embeddings()
    if type(embedding) is not nn.Embedding:
        raise ConfigError(f"vocabulary pruning needs the input embedding as a plain nn.Embedding; got "
                          f"{type(embedding).__name__} (prune the vocabulary before compressing the embeddings)")
    return embedding


def padding_row(embedding: nn.Embedding) -> set[int]:
    return set() if embedding.padding_idx is None else {embedding.padding_idx}


def config_ids(model: PreTrainedModel) -> set[int]:
    """Token ids named in the config and generation config."""
    ids = set()
    for config in id_configs(model):
        for key in ID_KEYS:
            value = getattr(config, key, None)
            ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return ids


def id_configs(model: PreTrainedModel) -> list:
    generation = getattr(model, "generation_config", None)
    return [model.config] + ([generation] if generation is not None else [])


@torch.no_grad()
def select_embedding_rows(model: PreTrainedModel, kept: list[int], new_id: dict[int, int]) -> None:
    """Keep the rows `kept` of the input embedding and of a vocabulary-sized output layer (re-tied if tied)."""
    old_in, old_out = model.get_input_embeddings(), model.get_output_embeddings()
    rows = torch.tensor(kept, device=old_in.weight.device)
    padding = None if old_in.padding_idx is None else new_id[old_in.padding_idx]
    new_in = nn.Embedding.from_pretrained(old_in.weight[rows], freeze=not old_in.weight.requires_grad,
                                          padding_idx=padding)
    model.set_input_embeddings(new_in)
    if old_out is not None and old_out.weight.shape[0] == old_in.num_embeddings:
        tied = old_out.weight is old_in.weight
        model.set_output_embeddings(selected_output_rows(old_out, rows, new_in.weight if tied else None))
    model.config.vocab_size = len(kept)
    if hasattr(model, "vocab_size"):
        model.vocab_size = len(kept)


def selected_output_rows(linear: nn.Module, rows: torch.Tensor, tied_weight: nn.Parameter | None) -> nn.Linear:
    """The output layer for the kept rows only; `tied_weight` (the new input embedding's) if it was tied."""
    if not isinstance(linear, nn.Linear):
        raise ConfigError(f"vocabulary pruning needs the output embedding as nn.Linear; got {type(linear).__name__}")
    new = nn.Linear(linear.in_features, len(rows), bias=linear.bias is not None,
                    dtype=linear.weight.dtype, device=linear.weight.device)
    new.weight = tied_weight if tied_weight is not None else nn.Parameter(linear.weight[rows])
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias[rows])
    return new


def remap_config_ids(model: PreTrainedModel, new_id: dict[int, int]) -> None:
    for config in id_configs(model):
        for key in ID_KEYS:
            value = getattr(config, key, None)
            if isinstance(value, list):
                setattr(config, key, [new_id[i] for i in value])
            elif value is not None:
                setattr(config, key, new_id[value])
