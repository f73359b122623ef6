"""Building a teacher cache (the format: `distill.lm.cache.store`): the teacher's rows shard by shard, written into
`<folder>.tmp` and renamed into place when complete; a rerun with the same key resumes after the shards done."""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict
from itertools import accumulate
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from accelerate import PartialState
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.core.errors import ConfigError
from distill.core.fingerprint import file_sha256
from distill.core.io import save_file_atomic, write_json_atomic
from distill.core.run import joined_processes
from distill.lm.cache.store import (
    ALIGNMENT,
    FORMAT_VERSION,
    LOGPROB_DTYPE,
    MANIFEST,
    PROGRESS,
    CacheKey,
    Examples,
    complete_cache_matches,
)

OnShard = Optional[Callable[[int], None]]

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
