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

A build writes into `<folder>.tmp` and renames it into place when complete, so a folder with a manifest is always
whole. After each shard, `progress.json` there records the shards done; a rerun with the same key resumes after
them."""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, fields
from itertools import accumulate
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from accelerate import PartialState
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from distill.core.collate import IndexedRowsCollator
from distill.core.errors import ConfigError
from distill.core.fingerprint import config_sha256, file_sha256, token_ids_sha256, tokenizer_sha256, weights_sha256
from distill.core.intact import check_intact
from distill.core.io import save_file_atomic, write_json_atomic
from distill.core.jobs import Job, register_job
from distill.core.run import joined_processes
from distill.core.sources import corpus_token_ids, load_causal_lm, load_tokenizer, resolve_model
from distill.lm.config import CacheConfig
from distill.lm.served import Endpoint, ServedTeacher
from distill.losses.causal.fused import TOPK_KEYS

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
LOGPROB_DTYPE = torch.float16
ALIGNMENT = ("row t of an example: the teacher's log-probabilities of token t+1 given tokens 0..t (its logits at "
             "position t / temperature, log_softmax over the full vocabulary), top k only")

logger = logging.getLogger(__name__)
Examples = Sequence[Sequence[int]]
OnShard = Optional[Callable[[int], None]]


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


# ----- building ---------------------------------------------------------------------------------------------------
ShardRows = Callable[[int, list[Sequence[int]], tqdm], tuple[torch.Tensor, torch.Tensor]]
"""(shard number, the shard's examples, progress bar) -> the shard's rows: (tokens, slots) log-probabilities and ids."""


def build_cache(teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: Examples, folder: str | Path,
                k: int, temperature: float = 1.0, shard_examples: int = 1024, batch_size: int = 8,
                on_shard: OnShard = None, samples: int = 0, sample_seed: int = 0,
                processes: Optional[PartialState] = None) -> Path:
    """Run `teacher` (on its device, in eval mode, without gradients) over `examples` (lists of token ids, such as
    a tokenized dataset's `input_ids` column) and write the cache to `folder`: per token its top `k` and `samples`
    draws from the rest (the module docstring). A complete cache with the same key already there is kept as it
    is; a different one is replaced. `on_shard(i)` is called after shard i is written. With `processes` (a launch of
    several), each process computes every n-th shard."""
    check_settings(k, temperature, shard_examples, batch_size, samples)
    vocab_size = teacher.config.get_text_config().vocab_size
    check_corpus_and_k(k, vocab_size, [len(ids) for ids in examples], samples)
    key = CacheKey.of(teacher, tokenizer, examples, k, samples, temperature)
    teacher.eval()

    def rows(index: int, part: list[Sequence[int]], bar: tqdm) -> tuple[torch.Tensor, torch.Tensor]:
        draws = Draws(samples, sample_seed, index, teacher.device)
        return shard_rows(teacher, part, k, temperature, draws, batch_size, bar)

    source = {"teacher": {"name": teacher.name_or_path, "vocab_size": vocab_size}}
    return write_cache(folder, key, examples, vocab_size, rows, source, tokenizer, shard_examples, on_shard,
                       processes, sample_seed=sample_seed)


def write_cache(folder: str | Path, key: CacheKey, examples: Examples, vocab_size: int, rows: ShardRows,
                source: dict, tokenizer: PreTrainedTokenizerBase, shard_examples: int, on_shard: OnShard = None,
                processes: Optional[PartialState] = None, **plan_extra) -> Path:
    """Write the cache of `examples` whose shards `rows` computes into `folder`, through `<folder>.tmp`, resuming the
    shards an interrupted build of the same plan left there. Process i of n computes shards i, i + n, ...; the main
    process then writes the manifest and renames the folder, so the result does not depend on n."""
    folder = Path(folder)
    processes = processes or joined_processes()
    if complete_cache_matches(folder, key):
        return folder
    # token ids below 65536 fit 2 bytes instead of 4: a third of each row's bytes
    plan = {"format_version": FORMAT_VERSION, "key": asdict(key),
            "indices_dtype": "uint16" if vocab_size <= 1 << 16 else "int32",
            "shard_examples": shard_examples, "examples": len(examples), **plan_extra}
    tmp = folder.with_name(folder.name + ".tmp")
    if processes.is_main_process:
        start_build(tmp, plan)
    processes.wait_for_everyone()
    count = math.ceil(len(examples) / shard_examples)
    mine = range(processes.process_index, count, processes.num_processes)
    done = finished_shards(tmp, mine)
    with tqdm(total=sum(min(shard_examples, len(examples) - i * shard_examples) for i in mine),
              initial=sum(record["examples"] for record in done.values()), desc="teacher cache",
              disable=not processes.is_local_main_process) as bar:
        for index in mine:
            if index in done:
                continue
            part = [examples[i] for i in range(index * shard_examples, min((index + 1) * shard_examples,
                                                                             len(examples)))]
            logprobs, indices = rows(index, part, bar)
            write_shard(tmp, index, [len(ids) for ids in part], logprobs,
                        indices.to(getattr(torch, plan["indices_dtype"])))
            if on_shard:
                on_shard(index)
    processes.wait_for_everyone()
    if processes.is_main_process:
        shards = [json.loads((tmp / shard_record(index)).read_text()) for index in range(count)]
        write_json_atomic(manifest(plan, shards, source, tokenizer), tmp / MANIFEST)
        for index in range(count):
            (tmp / shard_record(index)).unlink()
        (tmp / PROGRESS).unlink()
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    processes.wait_for_everyone()
    return folder


def check_settings(k: int, temperature: float, shard_examples: int, batch_size: int, samples: int) -> None:
    if k < 1:
        raise ConfigError(f"k must be at least 1; got {k}")
    if samples < 0:
        raise ConfigError(f"samples must be 0 (top k only) or more; got {samples}")
    if temperature <= 0:
        raise ConfigError(f"temperature must be positive; got {temperature}")
    if shard_examples < 1 or batch_size < 1:
        raise ConfigError(f"shard_examples and batch_size must be at least 1; got {shard_examples} and {batch_size}")


def check_corpus_and_k(k: int, vocab_size: int, lengths: list[int], samples: int) -> None:
    if k > vocab_size:
        raise ConfigError(f"k={k} exceeds the teacher's vocabulary of {vocab_size} tokens")
    if samples and k == vocab_size:
        raise ConfigError(f"k={k} keeps the teacher's whole vocabulary: there is no rest to draw samples from; set "
                          "samples: 0")
    if not lengths:
        raise ConfigError("the corpus has no examples")
    if 0 in lengths:
        raise ConfigError(f"example {lengths.index(0)} of the corpus has no tokens")


def start_build(tmp: Path, plan: dict) -> None:
    """Keep `tmp` if an interrupted build of the same plan left it, else start it afresh with the plan recorded."""
    progress = tmp / PROGRESS
    recorded = json.loads(progress.read_text()) if progress.is_file() else None
    if recorded != plan:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_json_atomic(plan, progress)


def shard_record(index: int) -> str:
    return f"shard-{index:05d}.json"


def finished_shards(tmp: Path, indices: Sequence[int]) -> dict[int, dict]:
    """Of shards `indices`, those an interrupted build finished: their record is written (after the shard) and the
    shard file still has the recorded SHA-256."""
    done = {}
    for index in indices:
        record = tmp / shard_record(index)
        if record.is_file():
            shard = json.loads(record.read_text())
            path = tmp / shard["file"]
            if path.is_file() and file_sha256(path) == shard["sha256"]:
                done[index] = shard
    return done


class Draws:
    """`count` tokens per row drawn from the teacher's distribution outside its top k, by a generator seeded from
    the build's seed and the shard's number."""

    def __init__(self, count: int, seed: int, shard: int, device: torch.device):
        self.count = count
        self.generator = torch.Generator(device).manual_seed(seed * 1_000_003 + shard)

    def rows(self, logprobs: torch.Tensor, top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, count) log-weights log(rest / count) and drawn ids, from full (rows, vocabulary) `logprobs` whose
        top-k ids are `top`."""
        rest = logprobs.exp().scatter(-1, top, 0.0)
        mass = rest.sum(-1, keepdim=True)
        # a row whose top k holds all of its mass has nothing to draw from: its draws get weight 0
        drawn = torch.multinomial(torch.where(mass > 0, rest, 1.0), self.count, replacement=True,
                                  generator=self.generator)
        return (mass / self.count).log().expand(-1, self.count), drawn


@torch.no_grad()
def shard_rows(teacher: PreTrainedModel, part: list[Sequence[int]], k: int, temperature: float, draws: Draws,
               batch_size: int, bar: tqdm) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of each example of `part`, concatenated in order: (tokens, k + samples) log-probabilities and
    indices."""
    order = sorted(range(len(part)), key=lambda i: len(part[i]))  # batches of similar lengths pad less
    rows: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(part)
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        logprobs, indices = batch_rows(teacher, [part[i] for i in chosen], k, temperature, draws)
        for row, i in enumerate(chosen):
            rows[i] = logprobs[row, :len(part[i])], indices[row, :len(part[i])]
        bar.update(len(chosen))
    return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])


def batch_rows(teacher: PreTrainedModel, batch: list[Sequence[int]], k: int, temperature: float, draws: Draws
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, k + samples) log-probabilities (float16) and indices of right-padded `batch`: the top k, then the
    draws; rows past an example's length are padding. Padded positions hold id 0: the attention mask hides them and
    their rows are dropped."""
    input_ids = torch.zeros(len(batch), max(len(ids) for ids in batch), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(batch):
        input_ids[row, :len(ids)] = torch.as_tensor(ids)
        attention_mask[row, :len(ids)] = 1
    logits = teacher(input_ids=input_ids.to(teacher.device), attention_mask=attention_mask.to(teacher.device)).logits
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    values, indices = logprobs.topk(k, dim=-1)
    if draws.count:
        flat = logprobs.flatten(0, 1)
        weights, drawn = draws.rows(flat, indices.flatten(0, 1))
        values = torch.cat([values, weights.view(*values.shape[:2], -1)], -1)
        indices = torch.cat([indices, drawn.view(*indices.shape[:2], -1)], -1)
    return values.to(LOGPROB_DTYPE).cpu(), indices.cpu()


def write_shard(folder: Path, index: int, lengths: list[int], logprobs: torch.Tensor, indices: torch.Tensor) -> dict:
    path = folder / f"shard-{index:05d}.safetensors"
    offsets = torch.tensor([0, *accumulate(lengths)], dtype=torch.int64)
    save_file_atomic({"logprobs": logprobs, "indices": indices, "offsets": offsets}, path)
    record = {"file": path.name, "examples": len(lengths), "tokens": sum(lengths), "bytes": path.stat().st_size,
              "sha256": file_sha256(path)}
    write_json_atomic(record, folder / shard_record(index))
    return record


def manifest(plan: dict, shards: list[dict], source: dict, tokenizer: PreTrainedTokenizerBase) -> dict:
    tokens = sum(shard["tokens"] for shard in shards)
    total = sum(shard["bytes"] for shard in shards)
    index_bytes = getattr(torch, plan["indices_dtype"]).itemsize
    slots = plan["key"]["k"] + plan["key"]["samples"]
    return {
        "format": "distill.teacher_cache", **plan, "alignment": ALIGNMENT, **source,
        "tokenizer": {"name": tokenizer.name_or_path},
        "logprobs_dtype": str(LOGPROB_DTYPE).removeprefix("torch."), "tokens": tokens, "shards": shards,
        "bytes": {"total": total, "per_token": total / tokens,
                  "payload_per_token": slots * (LOGPROB_DTYPE.itemsize + index_bytes)},
    }


# ----- reading ----------------------------------------------------------------------------------------------------
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


# ----- batching ---------------------------------------------------------------------------------------------------
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


# ----- the job ----------------------------------------------------------------------------------------------------
def check_cache_config(cfg: CacheConfig) -> None:
    check_settings(cfg.k, cfg.temperature, cfg.shard_examples, cfg.batch_size, cfg.samples)
    if cfg.data.max_length < 1 or (cfg.data.limit is not None and cfg.data.limit < 1):
        raise ConfigError(f"data.max_length and data.limit must be at least 1; got {cfg.data.max_length} and "
                          f"{cfg.data.limit}")
    if cfg.endpoint is not None:
        if not cfg.endpoint.url.startswith(("http://", "https://")):
            raise ConfigError(f"endpoint.url must be an http(s) URL up to /v1; got {cfg.endpoint.url!r}")
        if cfg.samples:
            raise ConfigError("an endpoint returns only its top log-probabilities, nothing to draw samples from: set "
                              "samples: 0")
        if cfg.temperature != 1.0:
            raise ConfigError(f"an endpoint's log-probabilities are at temperature 1; got temperature: {cfg.temperature}")
        if cfg.endpoint.retries < 0 or cfg.endpoint.timeout <= 0 or cfg.endpoint.backoff < 0:
            raise ConfigError("endpoint.retries and endpoint.backoff must be at least 0, endpoint.timeout positive")


def build_from_config(cfg: CacheConfig) -> TeacherCache:
    """recipes/build_teacher_cache.py: tokenize the corpus with the teacher's tokenizer, run the teacher (on the GPU
    when there is one) or ask the endpoint, and write the cache to `cfg.output_dir`."""
    check_cache_config(cfg)
    processes = joined_processes()  # several under `accelerate launch`: each builds every n-th shard
    tokenizer = load_tokenizer(cfg.teacher)
    if cfg.endpoint is not None:
        endpoint = Endpoint(cfg.endpoint)
        endpoint.check_reachable()
        examples = corpus_token_ids(cfg.data, tokenizer)
        folder = build_served_cache(endpoint, tokenizer, AutoConfig.from_pretrained(resolve_model(cfg.teacher)),
                                    examples, cfg.output_dir, cfg.k, cfg.shard_examples, processes=processes)
        return TeacherCache.open(folder)
    examples = corpus_token_ids(cfg.data, tokenizer)
    teacher = load_causal_lm(cfg.teacher).to(processes.device)
    folder = build_cache(teacher, tokenizer, examples, cfg.output_dir, cfg.k, cfg.temperature, cfg.shard_examples,
                         cfg.batch_size, samples=cfg.samples, sample_seed=cfg.sample_seed, processes=processes)
    return TeacherCache.open(folder)


def build_served_cache(endpoint: Endpoint, tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig,
                       examples: Examples, folder: str | Path, k: int, shard_examples: int = 1024,
                       on_shard: OnShard = None, processes: Optional[PartialState] = None) -> Path:
    """The cache of `examples` with each token's top `k` from `endpoint` (`distill.lm.served`), after checking that
    the endpoint tokenizes as `tokenizer` does. Its key names `config` and no weights (the served weights cannot be
    hashed here); the manifest records the endpoint's URL and model."""
    vocab_size = config.get_text_config().vocab_size
    check_corpus_and_k(k, vocab_size, [len(ids) for ids in examples], 0)
    served = ServedTeacher(endpoint, tokenizer, k)
    served.check_tokenizer(examples)
    key = CacheKey(config_sha256(config), None, tokenizer_sha256(tokenizer), token_ids_sha256(examples), k, 0, 1.0)
    source = {"teacher": {"name": config.name_or_path, "vocab_size": vocab_size},
              "endpoint": {"url": endpoint.url, "model": endpoint.cfg.model}}
    folder = write_cache(folder, key, examples, vocab_size, lambda index, part, bar: served.shard_rows(part, bar),
                         source, tokenizer, shard_examples, on_shard, processes)
    if served.entries:
        logger.warning("served teacher: %d of %d top-k entries named no single token id (left out); %d rows kept none",
                       served.dropped, served.entries, served.empty_rows)
    return folder


BUILD_CACHE = register_job(Job("build_teacher_cache", CacheConfig, check_cache_config, build_from_config,
                               lambda cfg, cache: {"cache": str(cache.folder), **cache.sizes()}))
