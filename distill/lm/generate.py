"""Sequence-level knowledge distillation (Kim & Rush 2016): a causal-LM teacher writes a completion of every
training prompt of a prompt/completion or chat corpus, and a student then learns from the teacher's completions
instead of the references (`recipes/distill_lm.py` over the output): it learns the teacher's mode, sequence by
sequence, without running the teacher while it trains.

The output folder:
  part-00000.jsonl ...  the training rows with the teacher's completions, `shard_examples` prompts per shard, in the
                        data's order; each shard written whole (tmp + rename)
  manifest.json         what the rows were generated from (`key`: teacher, data, sampling, seed, held-out counts,
                        batch and shard sizes, the prompts' token ids fingerprint), the finished shards with their
                        counts and SHA-256, and, once complete, the totals of those counts:
                          completion_tokens   tokens the teacher wrote, stop tokens included
                          at_max_new_tokens   completions cut at sampling.max_new_tokens before a stop token
                          empty_completions   completions with no text left once decoded (a distillation run
                                              skips those rows, as it skips any empty completion)
                          cut_by_max_length   prompt + written tokens beyond data.max_length: a run at that length
                                              cuts the completion
  data.jsonl            written once every shard is: the shards' rows, then the held-out rows

Rows keep the input's format with the standard column names: `{"prompt", "completion"}` (the original prompt text)
or `{"messages"}` (the prompt's messages and the assistant's answer). The completion is the teacher's tokens decoded
without special tokens, stripped.

The last `validation_examples + test_examples` examples are held out and written with their reference completions:
a distillation run over data.jsonl with the same counts holds out the same examples, so its validation and test
perplexity are measured on the references, not on the teacher's text. Prompts whose tokens alone reach
`data.max_length` are left out first (counted), as that run would drop them, so that both count the same examples.

Each shard's sampling generator is seeded from (seed, shard index), and its prompts are batched the same way every
time, so a run killed after some shards and run again keeps the finished shards and writes, on the same device,
byte for byte what an uninterrupted run writes."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.core.chat import PromptCompletion, check_chat_template, prompt_ids
from distill.core.config import CorpusConfig
from distill.core.data import load_pairs
from distill.core.errors import ConfigError
from distill.core.fingerprint import file_sha256, token_ids_sha256
from distill.core.io import jsonl_text, write_json_atomic, write_text_atomic
from distill.core.jobs import Job, register_job
from distill.core.models import ensure_pad_token, load_causal_lm, load_tokenizer
from distill.lm.sampling import SamplingConfig, check_sampling, complete, stop_tokens

MANIFEST = "manifest.json"
DATA = "data.jsonl"
FORMAT = "distill.teacher_data"
COUNTS = ("completion_tokens", "at_max_new_tokens", "empty_completions", "cut_by_max_length")
"""What each shard counts of its completions (the module docstring says what each means)."""

OnShard = Optional[Callable[[int], None]]


@dataclass
class GenerateConfig:
    """Sequence-level distillation data (`distill.lm.generate`): the teacher's completions of a corpus's training
    prompts, the held-out examples kept with their references."""
    teacher: str = "offline:SmolLM2-135M-Instruct"
    """The causal-LM teacher that writes the completions (a path, `offline:NAME` or a Hub id); its tokenizer renders
    the prompts. It runs on the GPU when there is one."""
    output_dir: str = "runs/teacher-data"
    """The output folder: shards `part-NNNNN.jsonl`, `manifest.json`, and `data.jsonl` once complete. A rerun with
    the same settings resumes after the finished shards; one with other settings is refused."""
    data: CorpusConfig = field(default_factory=lambda: CorpusConfig(
        source="offline:imdb_continue", format="prompt_completion", shuffle_seed=0, limit=1250, max_length=192))
    """The prompts, in format `prompt_completion` or `chat` (default: offline:imdb_continue, prompt_completion,
    shuffle_seed 0, limit 1250, max_length 192). Prompts whose tokens alone reach `max_length` are left out (a
    distillation run at that length would drop them); train on the output at the same `max_length`, with
    `shuffle_seed` null (data.jsonl is already in the order that fixes the held-out slices)."""
    validation_examples: int = 50
    """Held-out examples before the test slice, kept with their reference completions (not generated)."""
    test_examples: int = 200
    """The last examples, kept with their reference completions: a distillation run over the output with the same
    `validation_examples` and `test_examples` holds out exactly these references."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """How the teacher writes: temperature (0 = greedy), top_p and max_new_tokens."""
    seed: int = 0
    """Seed of the sampling: each shard draws from a generator seeded from (seed, shard index)."""
    batch_size: int = 8
    """Prompts per generation batch, batched by similar length within a shard. The batches decide the draws, so a
    rerun must keep it to resume."""
    shard_examples: int = 256
    """Training prompts per shard file: the unit of resume after a kill."""


# ----- checks -----------------------------------------------------------------------------------------------------
def check_generate(cfg: GenerateConfig) -> None:
    """Config-only checks, before anything loads; that the data has more examples than the held-out slices is
    checked once it is loaded."""
    if cfg.data.format not in ("prompt_completion", "chat"):
        raise ConfigError(f"data.format must be prompt_completion or chat: the teacher completes prompts, and "
                          f"'{cfg.data.format}' data has none")
    check_sampling(cfg.sampling, "sampling")
    if cfg.validation_examples < 0 or cfg.test_examples < 0:
        raise ConfigError(f"validation_examples and test_examples must be 0 or more; got {cfg.validation_examples} "
                          f"and {cfg.test_examples}")
    if cfg.batch_size < 1 or cfg.shard_examples < 1:
        raise ConfigError(f"batch_size and shard_examples must be at least 1; got {cfg.batch_size} and "
                          f"{cfg.shard_examples}")
    if cfg.data.max_length < 2:
        raise ConfigError(f"data.max_length must be at least 2 (a prompt token and a completion token); got "
                          f"{cfg.data.max_length}")
    if cfg.data.limit is not None and cfg.data.limit < 1:
        raise ConfigError(f"data.limit must be at least 1 (or null: all); got {cfg.data.limit}")


# ----- generating -------------------------------------------------------------------------------------------------
def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices into `lengths` in batches of `batch_size`, shortest first (a stable sort), so that a batch's prompts
    need little left padding."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def shard_generator(seed: int, shard: int) -> torch.Generator:
    """The generator a shard samples from: a CPU one, since `complete` draws on the CPU whatever the model's
    device."""
    return torch.Generator().manual_seed(seed * 1_000_003 + shard)


def shard_completions(teacher: PreTrainedModel, prompts: list[list[int]], sampling: SamplingConfig,
                      stop_ids: set[int], pad_id: int, generator: torch.Generator, batch_size: int,
                      bar: Optional[tqdm] = None) -> list[list[int]]:
    """Each prompt's completion ids (`complete`), in the prompts' order, generated in `length_batches` order."""
    completions: list[list[int]] = [[] for _ in prompts]
    for batch in length_batches([len(ids) for ids in prompts], batch_size):
        written = complete(teacher, [prompts[i] for i in batch], sampling, stop_ids, pad_id, generator)
        for index, ids in zip(batch, written):
            completions[index] = ids
        if bar is not None:
            bar.update(len(batch))
    return completions


def completion_counts(prompts: list[list[int]], completions: list[list[int]], texts: list[str],
                      cfg: GenerateConfig, stop_ids: set[int]) -> dict[str, int]:
    """The `COUNTS` of a shard's completions (ids as written, texts as decoded)."""
    limit = cfg.sampling.max_new_tokens
    return {"completion_tokens": sum(len(ids) for ids in completions),
            "at_max_new_tokens": sum(len(ids) == limit and ids[-1] not in stop_ids for ids in completions),
            "empty_completions": sum(not text for text in texts),
            "cut_by_max_length": sum(len(p) + len(c) > cfg.data.max_length for p, c in zip(prompts, completions))}


def output_row(pair: PromptCompletion, completion: str, data_format: str) -> dict:
    """The example as a row of `data_format` with the standard column names, `completion` its answer. A
    prompt_completion prompt is written as its original text (`load_pairs` made it a user turn for the template)."""
    if data_format == "prompt_completion":
        return {"prompt": pair.prompt if isinstance(pair.prompt, str) else pair.prompt[0]["content"],
                "completion": completion}
    return {"messages": [*pair.prompt, {"role": "assistant", "content": completion}]}


def generation_key(cfg: GenerateConfig, prompts: list[list[int]]) -> dict:
    """Everything the shards' rows depend on (the batches decide the draws, the shard size which generator draws for
    which prompt); the prompts' token ids catch a changed data file or tokenizer behind the same names."""
    return {"teacher": cfg.teacher, "data": asdict(cfg.data), "sampling": asdict(cfg.sampling), "seed": cfg.seed,
            "validation_examples": cfg.validation_examples, "test_examples": cfg.test_examples,
            "batch_size": cfg.batch_size, "shard_examples": cfg.shard_examples,
            "prompt_ids_sha256": token_ids_sha256(prompts)}


def first_difference(old: dict, new: dict, prefix: str = "") -> Optional[tuple[str, object, object]]:
    """The first setting (dotted name) whose value differs between two keys, with both values; None if equal."""
    for name in [*new, *(name for name in old if name not in new)]:
        before, after = old.get(name), new.get(name)
        if isinstance(before, dict) and isinstance(after, dict):
            inner = first_difference(before, after, f"{prefix}{name}.")
            if inner is not None:
                return inner
        elif before != after:
            return f"{prefix}{name}", before, after
    return None


def resumable_shards(folder: Path, key: dict) -> list[dict]:
    """The shards an earlier run with the same key finished in `folder` (those whose files are intact, up to the first
    that is not); a folder generated with another key is refused, naming the setting that differs."""
    path = folder / MANIFEST
    if not path.is_file():
        return []
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err}): delete {folder} or use another output_dir") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConfigError(f"{folder} holds something other than teacher data ({MANIFEST} is not {FORMAT}'s): use "
                          "another output_dir")
    differ = first_difference(manifest["key"], key)
    if differ is not None:
        name, before, after = differ
        raise ConfigError(f"{folder} holds teacher data generated with another {name} ({before!r}; this run: "
                          f"{after!r}): use another output_dir, or delete the folder to generate it anew")
    kept = []
    for shard in manifest["shards"]:
        if not (folder / shard["file"]).is_file() or file_sha256(folder / shard["file"]) != shard["sha256"]:
            break
        kept.append(shard)
    return kept


def write_remaining_shards(teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: GenerateConfig,
                           pairs: list[PromptCompletion], prompts: list[list[int]], plan: dict, shards: list[dict],
                           folder: Path, on_shard: OnShard) -> None:
    """Generate and write the shards after those in `shards` (appending to it) for the training `pairs` (tokenized
    as `prompts`), recording each in the manifest once its file is in place; `on_shard(i)` after shard i."""
    stop_ids, size = stop_tokens(tokenizer), cfg.shard_examples
    done = sum(shard["examples"] for shard in shards)
    with tqdm(total=len(prompts), initial=done, desc="teacher data", unit="prompt") as bar:
        for index in range(len(shards), plan["shard_count"]):
            span = range(index * size, min((index + 1) * size, len(prompts)))
            part = [prompts[i] for i in span]
            written = shard_completions(teacher, part, cfg.sampling, stop_ids, tokenizer.pad_token_id,
                                        shard_generator(cfg.seed, index), cfg.batch_size, bar)
            texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in written]
            path = folder / f"part-{index:05d}.jsonl"
            write_text_atomic(path, jsonl_text(output_row(pairs[i], text, cfg.data.format) for i, text in zip(span, texts)))
            shards.append({"file": path.name, "examples": len(part),
                           **completion_counts(part, written, texts, cfg, stop_ids), "sha256": file_sha256(path)})
            write_json_atomic({**plan, "shards": shards, "complete": False}, folder / MANIFEST)
            if on_shard:
                on_shard(index)


def generate_teacher_data(cfg: GenerateConfig, on_shard: OnShard = None) -> dict:
    """recipes/generate_teacher_data.py: load the prompts and the teacher's tokenizer, hold out the last examples,
    generate the shards not yet finished (loading the teacher only if there are any, on the GPU when there is one),
    then write data.jsonl and the complete manifest, which it returns."""
    check_generate(cfg)
    pairs = load_pairs(cfg.data)
    tokenizer = ensure_pad_token(load_tokenizer(cfg.teacher))
    if cfg.data.format == "chat" or cfg.data.chat_template:
        check_chat_template(tokenizer, "data.format 'chat' or 'prompt_completion' with chat_template")
    prompts = [prompt_ids(tokenizer, pair.prompt) for pair in pairs]
    kept = [i for i, ids in enumerate(prompts) if len(ids) < cfg.data.max_length]
    dropped = len(pairs) - len(kept)
    pairs, prompts = [pairs[i] for i in kept], [prompts[i] for i in kept]
    train = len(pairs) - cfg.validation_examples - cfg.test_examples
    if train < 1:
        left_out = f" ({dropped} more left out: their prompts reach data.max_length)" if dropped else ""
        raise ConfigError(f"the data has {len(pairs)} examples{left_out}: too few to hold out "
                          f"{cfg.validation_examples} + {cfg.test_examples} and generate for the rest; raise "
                          "data.limit")
    folder = Path(cfg.output_dir)
    key = generation_key(cfg, prompts)
    shards = resumable_shards(folder, key)
    plan = {"format": FORMAT, "key": key, "examples": len(pairs), "dropped": dropped, "training_examples": train,
            "held_out": {"validation": cfg.validation_examples, "test": cfg.test_examples},
            "shard_count": math.ceil(train / cfg.shard_examples)}
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic({**plan, "shards": shards, "complete": False}, folder / MANIFEST)
    if len(shards) < plan["shard_count"]:
        teacher = load_causal_lm(cfg.teacher).to("cuda" if torch.cuda.is_available() else "cpu")
        write_remaining_shards(teacher, tokenizer, cfg, pairs[:train], prompts[:train], plan, shards, folder,
                               on_shard)
    held_out = [output_row(pair, pair.completion, cfg.data.format) for pair in pairs[train:]]
    write_text_atomic(folder / DATA, "".join((folder / shard["file"]).read_text() for shard in shards)
                      + jsonl_text(held_out))
    manifest = {**plan, "shards": shards, **{name: sum(shard[name] for shard in shards) for name in COUNTS},
                "complete": True}
    write_json_atomic(manifest, folder / MANIFEST)
    return manifest


GENERATE_TEACHER_DATA = register_job(Job(
    "generate_teacher_data", GenerateConfig, check_generate, generate_teacher_data,
    lambda cfg, manifest: {"data": str(Path(cfg.output_dir) / DATA),
                           **{name: manifest[name] for name in ("examples", "dropped", "training_examples",
                                                                "held_out", *COUNTS)}}))
