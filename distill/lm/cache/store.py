"""Offline distillation cache: a causal-LM teacher's top-k log-probabilities at every token of a corpus (and, if
asked, tokens sampled from the rest of its distribution), computed once, so that distillation runs never load the
teacher.

A cache is a folder:
  manifest.json            what it was built from (`CacheKey`: teacher config and weights, tokenizer, corpus, k,
                           samples, temperature), its shards with their SHA-256, example and token counts, sizes
                           in bytes
  shard-00000.safetensors  `logprobs` (tokens, k + samples) float16 and `indices` (tokens, k + samples) uint16 (int32
                           when the vocabulary has more than 65536 tokens): the rows of the shard's examples,
                           concatenated;
                           `offsets` (examples + 1,) int64: example j of the shard is rows offsets[j]:offsets[j+1]

Alignment: an example of n tokens has n rows, one per token position. Row t is the teacher's distribution over
token t+1 given tokens 0..t (its logits at position t), that is `log_softmax(logits / temperature)` over the full
vocabulary, of which the row keeps the k largest: the mass left out is 1 - sum(exp(row)). Row t therefore lines up
with position t of the student's logits, as the labels of a causal LM do before its shift.

Sampled rows (`samples` > 0): after the top k, the row holds `samples` tokens drawn with replacement from the
teacher's distribution outside its top k, each with log-probability log(rest / samples), rest being the mass outside
the top k; a token drawn twice appears twice. The row's expected value is the whole distribution, so a forward-KL
gradient through it is unbiased (the top k alone says nothing of the tail's shape), and it leaves no mass out:
reading renormalises it to sum to 1, undoing the float16 rounding.

A build (`build`) writes into `<folder>.tmp` and renames it into place when complete, so a folder with a manifest is
always whole. After each shard, `progress.json` there records the shards done; a rerun with the same key resumes after
them.

This module holds the format, its reader (`TeacherCache`) and the collator that adds cached rows to batches."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from safetensors import safe_open
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.core.collate import IndexedRowsCollator
from distill.core.errors import ConfigError
from distill.core.fingerprint import config_sha256, file_sha256, token_ids_sha256, tokenizer_sha256, weights_sha256
from distill.core.intact import check_intact
from distill.losses.causal.fused import TOPK_KEYS

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
LOGPROB_DTYPE = torch.float16
ALIGNMENT = ("row t of an example: the teacher's log-probabilities of token t+1 given tokens 0..t (its logits at "
             "position t / temperature, log_softmax over the full vocabulary), top k only")

Examples = Sequence[Sequence[int]]


@dataclass(frozen=True)
class CacheKey:
    """What a cache was built from. A run may use a cache only if its own key is equal, field by field; a field
    that a run's expected key leaves None is not compared (a run that never loads the teacher cannot hash its
    weights, and `topk_kl` works with any k)."""
    teacher_config_sha256: str
    teacher_weights_sha256: Optional[str]
    tokenizer_sha256: str
    corpus_sha256: str
    k: Optional[int]
    samples: Optional[int]
    temperature: float

    @classmethod
    def of(cls, teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: Examples, k: int,
           samples: int, temperature: float) -> CacheKey:
        return cls(config_sha256(teacher.config), weights_sha256(teacher), tokenizer_sha256(tokenizer),
                   token_ids_sha256(examples), k, samples, float(temperature))

class TeacherCache:
    """A built cache, read lazily: `cache[i]` is example i's (log-probabilities (n, k + samples) float32, indices
    (n, k + samples) int64), n its number of tokens, aligned as the module docstring says."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder, self.manifest = folder, manifest
        key = manifest["key"]
        self.k, self.samples, self.temperature = key["k"], key["samples"], key["temperature"]
        self._shards: dict[int, tuple] = {}  # shard number -> (open safetensors file, offsets), opened on first use

    @classmethod
    def open(cls, path: str | Path, expect: Optional[CacheKey] = None, verify: bool = False) -> TeacherCache:
        """Refuse (ConfigError) an incomplete cache, one whose key differs from `expect` (naming the field and
        both values), and one whose shards are missing or of the wrong size; with `verify`, also one whose shard
        SHA-256 differs from the manifest's (a full read of the cache)."""
        folder = Path(path)
        manifest = read_manifest(folder)
        if expect is not None:
            check_key(folder, manifest["key"], expect)
        check_shards(folder, manifest["shards"], verify)
        return cls(folder, manifest)

    def __len__(self) -> int:
        return self.manifest["examples"]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} of a cache of {len(self)}")
        handle, offsets = self._shard(index // self.manifest["shard_examples"])
        local = index % self.manifest["shard_examples"]
        rows = slice(offsets[local], offsets[local + 1])
        logprobs = handle.get_slice("logprobs")[rows].float()
        if self.samples:
            logprobs = logprobs - logprobs.logsumexp(-1, keepdim=True)
        return logprobs, handle.get_slice("indices")[rows].long()

    def batch(self, indices: Sequence[int], attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The cached rows of examples `indices`, placed as `pad_rows` does."""
        return pad_rows([self[i] for i in indices], attention_mask)

    def sizes(self) -> dict:
        """Examples, tokens and bytes on disk: in all, per token, and per token without the shards' offsets and
        headers ((k + samples) * (2 + bytes per index))."""
        return {"examples": len(self), "tokens": self.manifest["tokens"], **self.manifest["bytes"]}

    def _shard(self, number: int) -> tuple:
        if number not in self._shards:
            handle = safe_open(self.folder / self.manifest["shards"][number]["file"], framework="pt")
            self._shards[number] = handle, handle.get_tensor("offsets").tolist()
        return self._shards[number]


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        unfinished = folder.with_name(folder.name + ".tmp")
        hint = f" (an unfinished build is in {unfinished}: rerun the build to resume it)" if unfinished.exists() else ""
        raise ConfigError(f"no complete teacher cache at {folder}: {MANIFEST} is missing{hint}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"teacher cache manifest {path} is not valid JSON: {err}") from err
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"teacher cache {folder} has format version {manifest.get('format_version')}; this code "
                          f"reads version {FORMAT_VERSION}: rebuild it")
    return manifest


def check_key(folder: Path, cached: dict, expect: CacheKey) -> None:
    """Each field both sides know must be equal (a served teacher's cache knows no weights)."""
    for field in fields(CacheKey):
        wanted = getattr(expect, field.name)
        if wanted is not None and cached[field.name] is not None and cached[field.name] != wanted:
            raise ConfigError(
                f"teacher cache {folder} was built with another {field.name}: the cache has {cached[field.name]!r}, "
                f"this run has {wanted!r}; rebuild the cache (recipes/build_teacher_cache.py) or use the matching one"
            )


def check_shards(folder: Path, shards: list[dict], verify: bool) -> None:
    for shard in shards:
        path = folder / shard["file"]
        if not path.is_file():
            raise ConfigError(f"teacher cache {folder}: shard {shard['file']} is missing")
        if path.stat().st_size != shard["bytes"]:
            raise ConfigError(f"teacher cache {folder}: shard {shard['file']} has {path.stat().st_size} bytes, the "
                              f"manifest says {shard['bytes']}")
        check_intact(path)  # a garbled header of the right size would fail mid-training otherwise
        if verify and file_sha256(path) != shard["sha256"]:
            raise ConfigError(f"teacher cache {folder}: shard {shard['file']} is corrupt (its SHA-256 differs from the "
                              "manifest's)")


def complete_cache_matches(folder: Path, key: CacheKey) -> bool:
    if not (folder / MANIFEST).is_file():
        return False
    try:
        TeacherCache.open(folder, expect=key)
    except ConfigError:
        return False
    return True

def pad_rows(rows: list[tuple[torch.Tensor, torch.Tensor]], attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """`teacher_topk_logprobs` (B, L, k) float32 and `teacher_topk_indices` (B, L, k) int64 aligned with a padded
    batch whose `attention_mask` is (B, L): the rows of example i fill its real positions in order (row t at its
    t-th real token, so left or right padding both work); padded positions hold 0, which losses must mask out
    (labels == -100). An example whose row count differs from its real tokens was cached from other token ids."""
    mask = attention_mask.bool()
    k = rows[0][0].shape[1]
    logprobs = torch.zeros(*mask.shape, k)
    indices = torch.zeros(*mask.shape, k, dtype=torch.long)
    for i, (values, ids) in enumerate(rows):
        if len(values) != int(mask[i].sum()):
            raise ValueError(f"batch row {i} has {int(mask[i].sum())} real tokens but its cached example has "
                             f"{len(values)} rows: the batch was not tokenized as the cached corpus was")
        logprobs[i, mask[i]] = values
        indices[i, mask[i]] = ids
    return dict(zip(TOPK_KEYS, (logprobs, indices)))


class CachedTeacherCollator(IndexedRowsCollator):
    """Collates examples of the cached corpus that carry their example index as `cache_index`: `collate` pads
    the rest (a `DataCollatorWithPadding`, say), and the batch gains the cached teacher rows (`pad_rows`), laid out
    by the batch's `mask_key` (the teacher's own attention mask when the batch carries the teacher's tokenization)."""

    def __init__(self, cache: TeacherCache, collate: Callable[[list[dict]], dict], mask_key: str = "attention_mask"):
        super().__init__(lambda indices, batch: cache.batch(indices, batch[mask_key]), collate)
