"""Causal-LM distillation (`LMDistillConfig`): a student built from the teacher (by default every other layer of it)
learns the teacher's next-token distributions on unlabelled text, token by token, in the shared `Trainer`: from the
teacher running beside it (`forward_kl`, `reverse_kl`, `jsd`, `total_variation`) or from a teacher cache (`topk_kl`,
no teacher run), mixed with `next_token_ce` on the text itself.

The corpus is tokenized once with the teacher's tokenizer (`corpus_token_ids`, as a cache build does). Its last
`test_examples` texts are the test slice, the `validation_examples` before them the validation slice, the rest are
trained on, packed into full blocks when `data.packing` asks (`distill.lm.packing`); metrics.json records
the three index ranges, the corpus fingerprint and the next-token targets trained on (`train_target_tokens`).
Hidden-state losses (`hidden_mse`, `hidden_cosine` over `layer_map`) may join the token losses when the teacher
runs. The validation metric is perplexity (lower is better); on plain text the test texts are also scored whole
(`test_perplexity_whole`, a sliding window over each). `generations.jsonl` holds the final student's greedy
completion of each fixed prompt, `completions.jsonl` its completions of the first test prompts (or openings of test
texts), whose loop share, distinct-2, length and teacher NLL metrics.json reports, beside the student's acceptance
as the teacher's draft in speculative decoding (`draft_acceptance`, `distill.lm.acceptance`)."""
from __future__ import annotations

import logging
from typing import Optional

import torch
from datasets import Dataset, DatasetDict
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from distill.core.chat import TokenizedCorpus, prompt_ids, user_turn, uses_chat_template
from distill.core.data import corpus_tokens, load_texts, truncation_shares
from distill.core.errors import ConfigError
from distill.core.evaluate import count_parameters
from distill.core.fake_quant import fake_quant_format
from distill.core.fingerprint import config_sha256, token_ids_sha256, tokenizer_sha256, weights_sha256
from distill.core.io import jsonl_text, write_text_atomic
from distill.core.jobs import Job, register_job
from distill.core.loss_interface import LOSSES, TEACHER_INPUTS, LossSetup, check_stages
from distill.core.mapping import build_layer_map, check_layer_map_config
from distill.core.models import ensure_pad_token, load_causal_lm, load_tokenizer, resolve_model
from distill.core.run import OnStep, RunResult, Task, check_train, finish_run, start_run, warn_truncation
from distill.core.student import build_student, check_student_config
from distill.core.trainer import Trainer
from distill.lm.acceptance import acceptance
from distill.lm.align import cross_tokenized, shared_vocabulary
from distill.lm.cache.store import CachedTeacherCollator, CacheKey, TeacherCache
from distill.lm.config import LMDistillConfig, LMEvalConfig
from distill.lm.data import PROMPT_LENGTH, CrossTokenizerCollator, LMCollator, held_out_splits, text_prompts
from distill.lm.metrics import PERPLEXITY, teacher_nll_of_completions, whole_text_perplexity
from distill.lm.on_policy import OnPolicyBatches
from distill.lm.packing import packed_training_texts, packing_refusal, packs
from distill.lm.sampling import SamplingConfig, check_sampling, complete, stop_tokens
from distill.lm.vocab import common_vocab_size
from distill.losses.causal.cross_tokenizer import CROSS_TOKENIZER_LOSSES

CACHE_LOSSES = ("topk_kl", "aligned_topk_kl")
"""Losses that read a teacher cache (`cache`): the teacher's top-k rows of its own tokenization."""

TOKEN_LOSSES = sorted(name for name, cls in LOSSES.items() if cls.reads_lm_head)
"""Losses on next-token distributions: the causal token losses and the cross-tokenizer ones."""
logger = logging.getLogger(__name__)
HIDDEN_LOSSES = ("hidden_mse", "hidden_cosine")
"""Hidden-state losses an LM run takes beside the token losses: mapped layers (`layer_map`), with a learned
projection when the widths differ; they read the live teacher's hidden states, which a teacher cache does not hold."""


def distill_lm(cfg: LMDistillConfig, on_step: OnStep = None) -> RunResult:
    """Check the config, split the corpus, build the student, check the vocabularies (and the cache), train through
    every stage, then write the generations, measure perplexity and save."""
    check_lm_distill(cfg)
    accelerator, run_dir = start_run(cfg)
    teacher_tokenizer = ensure_pad_token(load_tokenizer(cfg.teacher))
    teacher_tokenizer.padding_side = "right"  # positions count from 0 at the first token, as when the cache was built
    # what the student reads: the teacher's tokenizer, or its own (a cross-tokenizer run)
    tokenizer = ensure_pad_token(load_tokenizer(cfg.student_tokenizer)) if cfg.student_tokenizer else teacher_tokenizer
    tokenizer.padding_side = "right"
    corpus = (cross_tokenized(load_texts(cfg.data), tokenizer, teacher_tokenizer, cfg.data.max_length)
              if cfg.student_tokenizer else corpus_tokens(cfg.data, tokenizer))
    examples = corpus.ids
    splits, ranges, truncation = lm_splits(corpus, cfg, teacher_tokenizer.eos_token_id)
    if corpus.dropped:
        logger.warning("%d of %d examples left out: their prompt alone fills data.max_length=%d tokens",
                       corpus.dropped, corpus.dropped + len(examples), cfg.data.max_length)
    teacher = load_causal_lm(cfg.teacher) if needs_teacher(cfg) or not cfg.student.model else None
    teacher_config = teacher.config if teacher is not None else AutoConfig.from_pretrained(resolve_model(cfg.teacher))
    student = build_student(cfg.student, teacher, load_causal_lm)
    shared_vocab = None
    if cfg.student_tokenizer:
        fit_vocabulary(student, tokenizer, fresh=cfg.student.init == "fresh")
        shared_vocab, vocab_size = shared_vocabulary(tokenizer, teacher_tokenizer), None
        logger.info("student and teacher vocabularies: %s", shared_vocab.summary())
        collate = task_collate = CrossTokenizerCollator(tokenizer, teacher_tokenizer.pad_token_id)
    else:
        student_tokenizer = load_tokenizer(cfg.student.model) if cfg.student.model else tokenizer
        vocab_size = common_vocab_size(student_tokenizer, tokenizer, student.config.get_text_config().vocab_size,
                                       teacher_config.get_text_config().vocab_size)
        collate = task_collate = LMCollator(tokenizer)
    qad = fake_quant_format(cfg.qad.format).apply(student, tokenizer, cfg.qad, run_dir) if cfg.qad else None
    if cfg.cache is not None:  # a cache of the teacher's tokenization, laid out by the teacher's token positions
        cache_ids = corpus.columns[TEACHER_INPUTS[0]] if cfg.student_tokenizer else examples
        cache = open_cache(cfg, teacher_tokenizer, cache_ids, teacher_config, teacher)
        collate = CachedTeacherCollator(cache, collate, TEACHER_INPUTS[1] if cfg.student_tokenizer else
                                        "attention_mask")
    teacher = teacher if needs_teacher(cfg) else None
    if teacher is not None:  # after the student is built from its float32 weights
        teacher.to(getattr(torch, cfg.train.teacher_dtype))
    on_policy = OnPolicyBatches(cfg.on_policy, tokenizer, cfg.seed, accelerator.process_index,
                                plain_text=cfg.data.format == "text")
    trainer = Trainer(accelerator, student, teacher, splits, collate, cfg.train, cfg.seed, run_dir, on_step,
                      metric=PERPLEXITY, batch_transform=on_policy if cfg.on_policy.lmbda > 0 else None)
    trainer.log({"student_parameters": count_parameters(student), "vocab_size": vocab_size, "splits": ranges,
                 "dropped_examples": corpus.dropped})
    layer_map = build_layer_map(cfg.layer_map, student.config.num_hidden_layers, teacher_config.num_hidden_layers)
    student = trainer.fit(cfg.stages, LossSetup(student.config, teacher_config, layer_map, vocab_size, shared_vocab))
    extra = {"splits": ranges, "vocab_size": vocab_size, "dropped_examples": corpus.dropped, "packing": packs(cfg),
             "train_examples": len(splits["train"]), "train_target_tokens": trainer.target_tokens,
             "memory_per_process_bytes": trainer.memory_per_process,
             **({"shared_vocabulary": shared_vocab.summary()} if shared_vocab is not None else {}),
             **({"on_policy": on_policy.counts} if cfg.on_policy.lmbda > 0 else {}),
             **({"qad": qad.summary} if qad is not None else {})}
    generations = greedy_generations(student, tokenizer, cfg.eval, chat=uses_chat_template(cfg.data))
    if accelerator.is_main_process:
        write_text_atomic(run_dir / "generations.jsonl", jsonl_text(generations))
    if (cfg.eval.teacher_nll_prompts or cfg.eval.draft_prompts) and not cfg.student_tokenizer:
        teacher = teacher or load_causal_lm(cfg.teacher).to(accelerator.device)
        if cfg.eval.teacher_nll_prompts:
            extra.update(score_completions(student, teacher, tokenizer, splits["test"], cfg, run_dir,
                                           accelerator.is_main_process))
        if cfg.eval.draft_prompts:
            prompts = held_out_prompts(splits["test"], cfg, cfg.eval.draft_prompts)
            extra["draft_acceptance"] = acceptance(teacher, student, prompts, cfg.eval.max_new_tokens,
                                                   cfg.eval.draft_k)
    if corpus.whole is not None:
        extra["test_perplexity_whole"] = whole_text_perplexity(
            student, corpus.whole[slice(*ranges["test"])], cfg.data.max_length, task_collate,
            cfg.train.eval_batch_size, accelerator)
    task = Task(tokenizer, splits, [], task_collate, truncation)
    return finish_run(accelerator, run_dir, student, task, cfg.train.eval_batch_size, PERPLEXITY,
                      files=trainer.saved_files(), extra={**extra, "generations": len(generations)},
                      save=qad.save if qad is not None else None)


def lm_splits(corpus: TokenizedCorpus, cfg: LMDistillConfig, eos_id: Optional[int]
              ) -> tuple[DatasetDict, dict[str, list[int]], dict[str, dict[str, float]]]:
    """`held_out_splits`, the training split packed when the run packs (`packs`), and the share of each truncated
    split that `data.max_length` cut (warned about when large)."""
    splits, ranges = held_out_splits(corpus, cfg, with_cache_index=cfg.cache is not None)
    if packs(cfg):
        end = ranges["train"][1]
        blocks = packed_training_texts(corpus, end, eos_id, cfg.data.max_length)
        # in place of the truncation warning, which the packed training split no longer earns
        logger.warning("data.packing: %d training examples (%d tokens) make %d blocks of up to data.max_length=%d "
                       "tokens", end, sum(map(len, blocks["input_ids"])), len(blocks["input_ids"]),
                       cfg.data.max_length)
        splits["train"] = Dataset.from_dict(blocks)
    truncation = {name: truncation_shares(corpus.full_lengths[slice(*ranges[name])], cfg.data.max_length)
                  for name in splits if name != "train" or not packs(cfg)}
    warn_truncation(truncation, cfg.data.max_length)
    return splits, ranges, truncation


def fit_vocabulary(student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, fresh: bool) -> None:
    """A student that reads its own tokenizer: a fresh one (built from the teacher) gets that tokenizer's vocabulary
    and special token ids; a pretrained one must already cover it."""
    if not fresh:
        rows = student.config.get_text_config().vocab_size
        if rows < len(tokenizer):
            raise ConfigError(f"student_tokenizer has {len(tokenizer)} tokens, and the student's embedding only {rows}")
        return
    student.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    special = {"pad_token_id": tokenizer.pad_token_id,
               "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id,
               "eos_token_id": tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id}
    for name, token_id in special.items():
        setattr(student.config, name, token_id)
        setattr(student.generation_config, name, token_id)


def score_completions(student: PreTrainedModel, teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                      test_set, cfg: LMDistillConfig, run_dir, write: bool) -> dict[str, float]:
    """The student's greedy completions of the first `eval.teacher_nll_prompts` test prompts (of plain text: the
    texts' openings), scored by the teacher (`teacher_nll_of_completions`), written to completions.jsonl."""
    prompts = held_out_prompts(test_set, cfg, cfg.eval.teacher_nll_prompts)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=cfg.eval.max_new_tokens)
    scores, completions = teacher_nll_of_completions(student, teacher, prompts, greedy, stop_tokens(tokenizer),
                                                     tokenizer.pad_token_id, cfg.train.eval_batch_size)
    if write:
        written = ({"prompt": tokenizer.decode(prompt), "completion": tokenizer.decode(completion)}
                   for prompt, completion in zip(prompts, completions))
        write_text_atomic(run_dir / "completions.jsonl", jsonl_text(written))
    return {f"test_{name}": value for name, value in scores.items()}


def held_out_prompts(test_set, cfg: LMDistillConfig, count: int) -> list[list[int]]:
    """The first `count` test prompts: the examples' prompts with prompt/completion or chat data, the texts' openings
    with plain text."""
    rows = test_set.select(range(min(count, len(test_set))))
    if PROMPT_LENGTH in rows.column_names:
        return [ids[:length] for ids, length in zip(rows["input_ids"], rows[PROMPT_LENGTH])]
    return text_prompts(rows["input_ids"], cfg.eval.prompt_tokens)


def check_lm_distill(cfg: LMDistillConfig) -> None:
    """Config-only checks, before anything is loaded."""
    check_stages(cfg.stages)
    check_train(cfg.train, teacher_options=("teacher_dtype",), stages=len(cfg.stages))
    check_student_config(cfg.student)
    check_layer_map_config(cfg.layer_map)
    topk = [loss for stage in cfg.stages for loss in stage.losses if loss.name in CACHE_LOSSES]
    for i, stage in enumerate(cfg.stages):
        for loss in stage.losses:
            if loss.name not in (*TOKEN_LOSSES, *HIDDEN_LOSSES):
                raise ConfigError(f"stages[{i}]: loss '{loss.name}' is not a causal token loss or a hidden-state "
                                  f"loss; an LM run takes {', '.join((*TOKEN_LOSSES, *HIDDEN_LOSSES))}")
            if loss.name in HIDDEN_LOSSES and cfg.cache is not None:
                raise ConfigError(f"stages[{i}]: loss '{loss.name}' reads the running teacher's hidden states; a "
                                  "teacher cache holds only its top-k next-token probabilities: drop `cache` or the "
                                  "loss")
    if topk and cfg.cache is None:
        raise ConfigError(f"loss '{topk[0].name}' reads a teacher cache: set `cache` to a folder built by "
                          "recipes/build_teacher_cache.py over the same data")
    if cfg.cache is not None and not topk:
        raise ConfigError(f"`cache` is set, but no stage has a loss that reads it ({' or '.join(CACHE_LOSSES)})")
    if len({loss.temperature for loss in topk}) > 1 or any(loss.final_temperature is not None for loss in topk):
        raise ConfigError(f"every '{topk[0].name}' loss must use the one temperature the cache was written at, "
                          "unscheduled")
    if cfg.validation_examples < 1 or cfg.test_examples < 1:
        raise ConfigError(f"validation_examples and test_examples must be at least 1; got {cfg.validation_examples} "
                          f"and {cfg.test_examples}")
    refusal = packing_refusal(cfg)
    if cfg.data.packing and refusal:
        raise ConfigError(f"data.packing: true cannot pack this run's training split: {refusal}; set "
                          "data.packing=false (or null: packed where it can be)")
    if cfg.data.max_length < 2:
        raise ConfigError(f"data.max_length must be at least 2 (a token and the next); got {cfg.data.max_length}")
    if cfg.eval.max_new_tokens < 1:
        raise ConfigError(f"eval.max_new_tokens must be at least 1; got {cfg.eval.max_new_tokens}")
    if cfg.eval.draft_prompts < 0 or not cfg.eval.draft_k or min(cfg.eval.draft_k) < 1:
        raise ConfigError(f"eval.draft_prompts must be at least 0 and eval.draft_k a list of draft tokens per teacher "
                          f"pass, each at least 1; got {cfg.eval.draft_prompts} and {cfg.eval.draft_k}")
    if cfg.eval.teacher_nll_prompts < 0 or cfg.eval.prompt_tokens < 1:
        raise ConfigError(f"eval.teacher_nll_prompts must be at least 0 and eval.prompt_tokens at least 1; got "
                          f"{cfg.eval.teacher_nll_prompts} and {cfg.eval.prompt_tokens}")
    if cfg.train.sharding == "fsdp2" and cfg.on_policy.lmbda > 0:
        raise ConfigError("on_policy with train.sharding: fsdp2: processes sample completions of different lengths, "
                          "and a sharded student needs every process in each forward pass; use sharding: none")
    check_on_policy(cfg)
    check_cross_tokenizer(cfg)
    if cfg.qad is not None:
        check_qad(cfg)


def check_qad(cfg: LMDistillConfig) -> None:
    """The format's own checks of its type and of the model the student starts from."""
    if cfg.train.sharding == "fsdp2":
        raise ConfigError("qad with train.sharding: fsdp2: the grid is computed from whole weight rows, which a "
                          "sharded student splits across processes; use sharding: none")
    fake_quant_format(cfg.qad.format).check(cfg.qad, cfg.student.model or cfg.teacher)


def check_cross_tokenizer(cfg: LMDistillConfig) -> None:
    """A student with its own tokenizer learns through the cross-tokenizer losses (and CE), from the live teacher,
    on plain text; those losses need such a student."""
    losses = {loss.name for stage in cfg.stages for loss in stage.losses}
    cross = losses & set(CROSS_TOKENIZER_LOSSES)
    if not cfg.student_tokenizer:
        if cross:
            raise ConfigError(f"loss '{sorted(cross)[0]}' is for a student whose tokenizer differs from the "
                              "teacher's: set student_tokenizer, or use forward_kl with a shared tokenizer")
        return
    other = sorted(losses - set(CROSS_TOKENIZER_LOSSES) - {"next_token_ce"})
    if "aligned_topk_kl" in losses and losses & {"aligned_kl", "uld"}:
        raise ConfigError("student_tokenizer: 'aligned_topk_kl' reads a teacher cache and 'aligned_kl' / 'uld' the "
                          "live teacher: use one or the other")
    if other:
        raise ConfigError(f"student_tokenizer: loss '{other[0]}' compares the two models position by position and "
                          f"id by id; with two tokenizers use {' or '.join(CROSS_TOKENIZER_LOSSES)} (and "
                          "next_token_ce)")
    # before the format check: on-policy needs prompts, which that check refuses, so its own reason would never show
    if cfg.on_policy.lmbda:
        raise ConfigError("student_tokenizer: on-policy batches need the teacher to read the student's tokens")
    if cfg.data.format != "text":
        raise ConfigError("student_tokenizer: texts are aligned character by character, which needs data.format "
                          "text (a chat template renders a different text for each tokenizer)")
    if cfg.student.init == "copy_layers":
        raise ConfigError("student_tokenizer: a student copied from the teacher's layers keeps the teacher's "
                          "vocabulary; use student.init fresh (or pretrained with that tokenizer)")


def check_on_policy(cfg: LMDistillConfig) -> None:
    policy = cfg.on_policy
    if not 0 <= policy.lmbda <= 1:
        raise ConfigError(f"on_policy.lmbda is the share of on-policy batches, in [0, 1]; got {policy.lmbda}")
    check_sampling(policy, "on_policy")
    if policy.lmbda == 0:
        return
    if cfg.data.format == "text" and policy.prompt_tokens < 1:
        raise ConfigError(f"on_policy.prompt_tokens is the length of the texts' openings the student continues, at "
                          f"least 1; got {policy.prompt_tokens}")
    losses = {loss.name for stage in cfg.stages for loss in stage.losses}
    if cfg.cache is not None or not any(LOSSES[name].needs_teacher and LOSSES[name].reads_lm_head
                                        for name in losses):
        raise ConfigError("on_policy.lmbda > 0: the teacher must score the student's samples as they are written: "
                          "use a live teacher's token loss (forward_kl, reverse_kl, jsd or total_variation), not a "
                          "cache")
    if "next_token_ce" in losses:
        raise ConfigError("on_policy.lmbda > 0 with next_token_ce would train the student on its own samples as if "
                          "they were the reference: drop next_token_ce (or set on_policy.lmbda=0)")


def needs_teacher(cfg: LMDistillConfig) -> bool:
    """Whether a loss runs the teacher (`topk_kl` and `aligned_topk_kl` read the cache instead)."""
    return any(LOSSES[loss.name].needs_teacher for stage in cfg.stages for loss in stage.losses)


def open_cache(cfg: LMDistillConfig, tokenizer: PreTrainedTokenizerBase, examples: list[list[int]],
               teacher_config: PretrainedConfig, teacher: Optional[PreTrainedModel]) -> TeacherCache:
    """The cache, refused unless it was built from this run's tokenizer, corpus token ids, `topk_kl` temperature
    and teacher config; its weights too when the run has loaded the teacher (hashing them needs the model)."""
    temperature = next(loss.temperature for stage in cfg.stages for loss in stage.losses if loss.name in CACHE_LOSSES)
    expect = CacheKey(config_sha256(teacher_config), weights_sha256(teacher) if teacher is not None else None,
                      tokenizer_sha256(tokenizer), token_ids_sha256(examples), None, None, float(temperature))
    cache = TeacherCache.open(cfg.cache, expect=expect)
    if cache.samples and any(not loss.topk_tail for stage in cfg.stages for loss in stage.losses
                             if loss.name == "topk_kl"):
        raise ConfigError(f"teacher cache {cfg.cache} holds tokens sampled from the teacher's whole distribution; "
                          "'topk_kl' with topk_tail: false would renormalise the student over them: set it true")
    return cache


@torch.no_grad()
def greedy_generations(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: LMEvalConfig,
                       chat: bool = False) -> list[dict]:
    """Each prompt and the model's greedy continuation of it (special tokens left out); with `chat`, each prompt is
    the user's turn, rendered by the chat template as the training prompts were."""
    prompts = [prompt_ids(tokenizer, user_turn(prompt) if chat else prompt) for prompt in cfg.prompts]
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=cfg.max_new_tokens)
    completions = complete(model, prompts, greedy, stop_tokens(tokenizer), tokenizer.pad_token_id)
    return [{"prompt": prompt, "completion": tokenizer.decode(completion, skip_special_tokens=True)}
            for prompt, completion in zip(cfg.prompts, completions)]


LM_DISTILL = register_job(Job("distill_lm", LMDistillConfig, check_lm_distill, distill_lm,
                              lambda cfg, result: {"student": str(result.run_dir / "model"), **result.metrics}))
