"""The `build_teacher_cache` job: a cache of a corpus from a local teacher or a served one (`distill.lm.served`)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from accelerate import PartialState
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase

from distill.core.data import corpus_token_ids
from distill.core.errors import ConfigError
from distill.core.fingerprint import config_sha256, token_ids_sha256, tokenizer_sha256
from distill.core.jobs import Job, register_job
from distill.core.models import load_causal_lm, load_tokenizer, resolve_model
from distill.core.run import joined_processes
from distill.lm.cache.build import OnShard, build_cache, check_corpus_and_k, check_settings, write_cache
from distill.lm.cache.store import CacheKey, Examples, TeacherCache
from distill.lm.config import CacheConfig
from distill.lm.served import Endpoint, ServedTeacher

logger = logging.getLogger(__name__)


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
