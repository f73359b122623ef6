"""Cross-tokenizer alignment for distilling a causal LM into a student with another tokenizer.

Positions are paired by character offsets: where a student token and a teacher token begin at the same character,
the two models' predictions just before them are both predictions of "the token that begins there". Vocabularies
are paired by normalised surface text: each token's (starts a word, text), the same across WordPiece ("##ing"),
byte-level BPE ("Ġword") and SentencePiece ("▁word") spellings, grouped into shared buckets."""
from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from transformers import PreTrainedTokenizerBase

from distill.core.chat import TokenizedCorpus
from distill.core.loss_interface import TEACHER_INPUTS
from distill.losses.causal.cross_tokenizer import ALIGNED_KEYS

_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def word_starts(text: str, offsets: list[tuple[int, int]]) -> list[Optional[int]]:
    """Each token's first non-whitespace character in `text`, or None for an empty or whitespace-only span
    (special tokens have (0, 0)). Byte-level BPE spans include the leading space and WordPiece spans do not: this
    makes them comparable."""
    starts = []
    for start, end in offsets:
        span = text[start:end]
        stripped = span.lstrip()
        starts.append(start + len(span) - len(stripped) if stripped else None)
    return starts


def aligned_positions(student_starts: list[Optional[int]],
                      teacher_starts: list[Optional[int]]) -> tuple[list[int], list[int]]:
    """Pairs (student position s, teacher position t) whose next tokens s + 1 and t + 1 begin at the same character,
    in increasing order (starts are assumed non-decreasing, as offsets are). A character that begins several tokens
    of one side (a character split into bytes) counts with the first: the later ones begin mid-character."""
    teacher_at = _first_targets(teacher_starts)
    pairs = [(s, teacher_at[char]) for char, s in _first_targets(student_starts).items() if char in teacher_at]
    return [s for s, _ in pairs], [t for _, t in pairs]


def _first_targets(starts: list[Optional[int]]) -> dict[int, int]:
    """Character -> the first position whose next token begins there."""
    first: dict[int, int] = {}
    for position, char in enumerate(starts[1:]):
        if char is not None:
            first.setdefault(char, position)
    return first


def token_surfaces(tokenizer: PreTrainedTokenizerBase) -> dict[int, tuple[bool, str]]:
    """Each ordinary token id -> (starts a word, its text without word marker), for WordPiece, byte-level BPE and
    SentencePiece (Metaspace) fast tokenizers. Special and added tokens, whitespace-only tokens, byte-level tokens
    that are not UTF-8 on their own and SentencePiece byte-fallback tokens are left out."""
    config = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)
    skip = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    surface = _surface_reader(config)
    surfaces = {}
    for token, i in vocab.items():
        read = surface(token)
        if i not in skip and read is not None and read[1].strip():
            surfaces[i] = read
    return surfaces


def _surface_reader(config: dict):
    """The function token -> (starts a word, text) or None for the tokenizer described by `config`."""
    model = config["model"]
    if model["type"] == "WordPiece":
        prefix = model["continuing_subword_prefix"]
        return lambda token: (False, token[len(prefix):]) if token.startswith(prefix) else (True, token)
    types = {part["type"] for part in _parts([config["pre_tokenizer"], config["decoder"]])}
    if "ByteLevel" in types:
        return _byte_level_surface
    # Llama-2-style tokenizers spell Metaspace as a normalizer replacing " " with "▁" and a decoder undoing it
    if "Metaspace" in types or "▁" in json.dumps(config["decoder"], ensure_ascii=False):
        return _metaspace_surface
    raise ValueError(f"cannot read token surfaces of a {model['type']} tokenizer without ByteLevel or Metaspace")


def _parts(node) -> Iterator[dict]:
    """Each component of a (possibly nested Sequence) normalizer, pre-tokenizer or decoder config."""
    if isinstance(node, dict):
        if "type" in node:
            yield node
        for value in node.values():
            yield from _parts(value)
    elif isinstance(node, list):
        for value in node:
            yield from _parts(value)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table of byte-level BPE: printable Latin-1 bytes stand for themselves,
    the others are shifted to 256 onward."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


_UNICODE_TO_BYTE = {char: b for b, char in bytes_to_unicode().items()}


def _byte_level_surface(token: str) -> Optional[tuple[bool, str]]:
    try:
        text = bytes(_UNICODE_TO_BYTE[char] for char in token).decode("utf-8")
    except (KeyError, UnicodeDecodeError):
        return None
    return (True, text[1:]) if text.startswith(" ") else (False, text)


def _metaspace_surface(token: str) -> Optional[tuple[bool, str]]:
    if _BYTE_FALLBACK.fullmatch(token):
        return None
    text = token.replace("▁", " ")
    return (True, text[1:]) if text.startswith(" ") else (False, text)


def text_folding(tokenizer: PreTrainedTokenizerBase) -> tuple[bool, bool]:
    """(lowercases, strips accents): what the tokenizer's normalizer does to text before it is tokenized. BERT's
    normalizer strips accents when it lowercases unless told otherwise."""
    lower = strip = False
    for part in _parts(json.loads(tokenizer.backend_tokenizer.to_str())["normalizer"]):
        if part["type"] == "BertNormalizer":
            lower = lower or part["lowercase"]
            accents = part.get("strip_accents")
            strip = strip or (part["lowercase"] if accents is None else accents)
        lower = lower or part["type"] == "Lowercase"
        strip = strip or part["type"] == "StripAccents"
    return lower, strip


def _fold(text: str, lower: bool, strip: bool) -> str:
    if strip:
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
    return text.lower() if lower else text


@dataclass
class SharedVocab:
    """Token ids of each side grouped into `size` shared buckets: one bucket per normalised (starts a word, text)
    that both vocabularies have. Several ids of one side may share a bucket; each id appears once."""
    student_ids: torch.Tensor
    student_bucket: torch.Tensor
    teacher_ids: torch.Tensor
    teacher_bucket: torch.Tensor
    size: int
    student_vocab_size: int
    teacher_vocab_size: int

    def summary(self) -> str:
        return (f"{self.size} shared buckets: {len(self.student_ids)} of {self.student_vocab_size} student tokens "
                f"({len(self.student_ids) / self.student_vocab_size:.1%}), {len(self.teacher_ids)} of "
                f"{self.teacher_vocab_size} teacher tokens ({len(self.teacher_ids) / self.teacher_vocab_size:.1%})")


def shared_vocabulary(student_tokenizer: PreTrainedTokenizerBase,
                      teacher_tokenizer: PreTrainedTokenizerBase) -> SharedVocab:
    """The buckets of tokens whose normalised surfaces both vocabularies share, case- and accent-folded on both
    sides when either tokenizer folds its input. A token beginning with punctuation keys on its text alone:
    WordPiece splits punctuation into words of its own, where byte-level BPE writes "," after a word without a
    space."""
    folding = [any(pair) for pair in zip(text_folding(student_tokenizer), text_folding(teacher_tokenizer))]

    def keys(tokenizer):
        return {i: (starts or not text[0].isalnum(), _fold(text, *folding))
                for i, (starts, text) in token_surfaces(tokenizer).items()}

    student, teacher = keys(student_tokenizer), keys(teacher_tokenizer)
    bucket = {key: b for b, key in enumerate(sorted(set(student.values()) & set(teacher.values())))}

    def tensors(side):
        ids = sorted(i for i, key in side.items() if key in bucket)
        return torch.tensor(ids, dtype=torch.long), torch.tensor([bucket[side[i]] for i in ids], dtype=torch.long)

    return SharedVocab(*tensors(student), *tensors(teacher), len(bucket), len(student_tokenizer),
                       len(teacher_tokenizer))


def cross_tokenized(texts: list[str], student_tokenizer: PreTrainedTokenizerBase,
                    teacher_tokenizer: PreTrainedTokenizerBase, max_length: int) -> TokenizedCorpus:
    """Each text through both tokenizers (each truncated to `max_length` tokens): the student's ids as the corpus,
    the teacher's ids and the aligned position pairs as its extra columns."""
    student = student_tokenizer(texts, truncation=True, max_length=max_length, return_offsets_mapping=True)
    teacher = teacher_tokenizer(texts, truncation=True, max_length=max_length, return_offsets_mapping=True)
    pairs = [aligned_positions(word_starts(text, s_offsets), word_starts(text, t_offsets))
             for text, s_offsets, t_offsets in zip(texts, student["offset_mapping"], teacher["offset_mapping"])]
    full = [len(ids) for ids in student_tokenizer(texts, verbose=False)["input_ids"]]
    return TokenizedCorpus(student["input_ids"], full, columns={
        TEACHER_INPUTS[0]: teacher["input_ids"], ALIGNED_KEYS[0]: [s for s, _ in pairs],
        ALIGNED_KEYS[1]: [t for _, t in pairs]})
