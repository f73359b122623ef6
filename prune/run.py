"""A pruning run, round by round: score units on calibration batches, remove the least important heads, FFN
neurons and layers (then factorise and sparsify in the last round), distil-recover from the unpruned model,
repeat until the targets are met. Each finished round is saved, so a killed run resumes where it stopped.
Then, without training, prune the vocabulary to the tokens of the training texts and compress the word embedding
(int8 and/or low rank); the final evaluation re-tokenizes the data with the pruned tokenizer, which is saved.

Targets are shares of the unpruned model: round r of R removes what is needed to reach r/R of each target."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

import distill.losses  # noqa: F401  (registers the losses recovery names)
from distill.core.arch import arch_of, kv_group_size
from distill.core.config import LayerMapConfig
from distill.core.data import load_splits, tokenize_and_measure
from distill.core.errors import ConfigError
from distill.core.evaluate import accuracy, count_parameters
from distill.core.io import write_json_atomic
from distill.core.jobs import Job, register_job
from distill.core.loss_interface import LossSetup, attention_implementation, check_stages
from distill.core.mapping import build_layer_map
from distill.core.models import load_classifier
from distill.core.run import (
    OnStep,
    RunResult,
    Task,
    check_class_count,
    check_train,
    evaluation_loader,
    finish_run,
    load_task,
    log_record,
    start_run,
)
from distill.core.trainer import Trainer
from prune.budget import budget_plan
from prune.config import PruneConfig, VocabConfig
from prune.embeddings import check_rank, compress_word_embedding, word_embedding_path
from prune.family import model_config
from prune.ffn import prune_ffn
from prune.heads import expand_groups, group_scores, prune_heads
from prune.importance import Scores, require_criterion, score
from prune.layers import LAYER_STRATEGIES, drop_layers, layers_to_drop
from prune.lowrank import factorize
from prune.saving import layer_shapes, save_compressed
from prune.selection import SCOPES, select_kept, units_to_remove
from prune.sparsity import apply_masks, magnitude_masks, make_permanent, nm_masks, sparsity_report
from prune.vocab import changed_fraction, prune_vocabulary, unknown_fraction, word_embedding, wordpiece_state

SPARSITY_KINDS = ("none", "unstructured", "n:m")


@dataclass
class Progress:
    """What the rounds so far have done, saved beside each round's model."""
    kept_layers: list[int]
    rounds_done: int = 0


def prune(cfg: PruneConfig, on_step: OnStep = None) -> RunResult:
    check_prune_config(cfg)
    arch_of(model_config(cfg.model), "pruning")  # the family, from config.json: refused before any weights load
    accelerator, run_dir = start_run(cfg)
    task = load_task(cfg.data, cfg.model)
    attention = attention_implementation([cfg.recovery])
    model = load_classifier(cfg.model, attn_implementation=attention)
    check_class_count(model.config.num_labels, task.labels)
    original = layer_shapes(model)
    check_targets(cfg, model, original)
    check_vocab_and_embeddings(cfg, model, task)
    plan = budget_plan(model, count_parameters(model), cfg.target_parameters, cfg.heads.fraction or 0.0,
                       cfg.ffn.fraction or 0.0, cfg.rounds) if cfg.target_parameters else None
    rounds = len(plan) if plan is not None else cfg.rounds if prunes_structure(cfg) else 0
    recovering = cfg.recover and rounds > 0
    teacher = load_classifier(cfg.teacher or cfg.model, attn_implementation=attention) if recovering else None
    test_loader = evaluation_loader(accelerator, task.splits["test"], task.collate, cfg.train.eval_batch_size)
    before = {"parameters": count_parameters(model), "test_accuracy": accuracy(model, test_loader, accelerator)}
    progress, model = resume_rounds(rounds, run_dir, model)
    pruned_accuracy = None
    for r in range(progress.rounds_done + 1, rounds + 1):
        removals = plan[r - 1] if plan else None
        prune_round(cfg, model, r, rounds, original, progress, calibration_batches(cfg, task, accelerator), removals)
        pruned_accuracy = accuracy(model, test_loader, accelerator)
        if cfg.recover:
            model = recover(cfg, model, teacher, task, accelerator, run_dir / f"round-{r}", progress, on_step)
        make_permanent(model)
        log_record(accelerator, run_dir, {"round": r, "parameters": count_parameters(model),
                                          "test_accuracy_before_recovery":
                       pruned_accuracy, "shapes": layer_shapes(model)})
        progress.rounds_done = r
        if r < rounds and accelerator.is_main_process:
            save_round(model, task, run_dir / f"round-{r}", progress)
        accelerator.wait_for_everyone()
    extra = {
        "unpruned": before, "kept_layers": progress.kept_layers, "shapes": layer_shapes(model),
        "sparsity": sparsity_report(model)[-1],
    }
    if pruned_accuracy is not None:
        extra["test_accuracy_before_recovery"] = pruned_accuracy
    if cfg.sparsity.kind != "none":
        extra["sparsity_per_linear"] = sparsity_report(model)[:-1]
    if cfg.vocab.enabled:
        task, extra["vocab"] = compress_vocabulary(cfg, model, task)
    if cfg.embeddings.active:
        extra["embeddings"] = compress_word_embedding(model, int8=cfg.embeddings.int8, rank=cfg.embeddings.rank)
    return finish_run(accelerator, run_dir, model, task, cfg.train.eval_batch_size, extra=extra, save=save_compressed)


def check_prune_config(cfg: PruneConfig) -> None:
    """Config-only checks, before any model is loaded."""
    require_criterion(cfg.importance.criterion)
    for name, unit in (("heads", cfg.heads), ("ffn", cfg.ffn)):
        if unit.scope not in SCOPES:
            raise ConfigError(f"{name}.scope must be one of {', '.join(SCOPES)}; got '{unit.scope}'")
    if cfg.layers.strategy not in LAYER_STRATEGIES:
        raise ConfigError(f"layers.strategy must be one of {', '.join(LAYER_STRATEGIES)}; got '{cfg.layers.strategy}'")
    if cfg.sparsity.kind not in SPARSITY_KINDS:
        raise ConfigError(f"sparsity.kind must be one of {', '.join(SPARSITY_KINDS)}; got '{cfg.sparsity.kind}'")
    if cfg.rounds < 1:
        raise ConfigError(f"rounds must be at least 1; got {cfg.rounds}")
    if cfg.importance.batches < 1:
        raise ConfigError(f"importance.batches must be at least 1; got {cfg.importance.batches}")
    if not (prunes_structure(cfg) or cfg.vocab.enabled or cfg.embeddings.active):
        raise ConfigError("nothing to prune: set heads, ffn, layers, low_rank, sparsity, vocab or embeddings")
    check_vocab_config(cfg.vocab)
    check_train(cfg.train)
    if cfg.recover:
        check_stages([cfg.recovery])
    if cfg.target_parameters is not None:
        check_budget_config(cfg)


def prunes_structure(cfg: PruneConfig) -> bool:
    """Whether the config asks for rounds: heads, FFN neurons, layers, low-rank Linears or sparsity."""
    return (cfg.heads.active or cfg.ffn.active or cfg.layers.active or cfg.low_rank.active
            or cfg.sparsity.kind != "none")


def check_vocab_config(cfg: VocabConfig) -> None:
    if cfg.max_examples is not None and cfg.max_examples < 1:
        raise ConfigError(f"vocab.max_examples must be at least 1; got {cfg.max_examples}")
    if cfg.max_tokens is not None and cfg.max_tokens < 1:
        raise ConfigError(f"vocab.max_tokens must be at least 1; got {cfg.max_tokens}")
    for path in cfg.extra_texts or []:
        if not Path(path).is_file():
            raise ConfigError(f"vocab.extra_texts: file not found: {path}")


def check_budget_config(cfg: PruneConfig) -> None:
    if cfg.target_parameters <= 0:
        raise ConfigError(f"target_parameters must be positive; got {cfg.target_parameters}")
    if cfg.heads.count is not None or cfg.ffn.count is not None or not (cfg.heads.fraction or cfg.ffn.fraction):
        raise ConfigError("target_parameters prunes by heads.fraction and/or ffn.fraction per round; "
                          "set at least one of them and no count")
    if cfg.layers.active or cfg.low_rank.active:
        raise ConfigError("target_parameters works with head and FFN pruning only, not with layers or low_rank")
    for name, unit in (("heads", cfg.heads), ("ffn", cfg.ffn)):
        if not 0 <= (unit.fraction or 0) < 1:
            raise ConfigError(f"{name}.fraction must be in [0, 1); got {unit.fraction}")


def check_targets(cfg: PruneConfig, model: PreTrainedModel, original: list[dict]) -> None:
    """Targets the loaded model cannot meet fail here, before any long work."""
    group = kv_group_size(model.config)
    if cfg.target_parameters is not None:
        return  # the budget plan checks itself
    if cfg.heads.active:
        if cfg.heads.count is not None and cfg.heads.count % group:
            raise ConfigError(f"heads.count={cfg.heads.count} is not a whole number of key/value groups of {group}")
        units_to_remove([s["heads"] // group for s in original], cfg.heads.fraction,
                        None if cfg.heads.count is None else cfg.heads.count // group, "heads")
    if cfg.ffn.active:
        units_to_remove([s["intermediate"] for s in original], cfg.ffn.fraction, cfg.ffn.count, "ffn")
    if cfg.layers.active:
        layers_to_drop(len(original), cfg.layers.count, cfg.layers.strategy, torch.zeros(len(original)),
                       cfg.layers.layers)


def check_vocab_and_embeddings(cfg: PruneConfig, model: PreTrainedModel, task: Task) -> None:
    """What vocabulary pruning and embedding compression will refuse, refused before the rounds."""
    if cfg.vocab.enabled:
        wordpiece_state(task.tokenizer)
        word_embedding(model)
    if cfg.embeddings.active:
        embedding = word_embedding_path(model)[1]
        if cfg.embeddings.rank is not None:
            check_rank(cfg.embeddings.rank, embedding)


def resume_rounds(rounds: int, run_dir: Path, model: PreTrainedModel) -> tuple[Progress, PreTrainedModel]:
    """The last saved round, if any; else a fresh start."""
    for r in range(rounds - 1, 0, -1):
        state = run_dir / f"round-{r}" / "progress.json"
        if state.is_file():
            return Progress(**json.loads(state.read_text())), load_classifier(str(state.parent / "model"))
    return Progress(kept_layers=list(range(model.config.num_hidden_layers))), model


def calibration_batches(cfg: PruneConfig, task: Task, accelerator) -> list[dict[str, torch.Tensor]]:
    if cfg.importance.criterion in ("magnitude", "random"):
        return []
    loader = DataLoader(task.splits["train"], cfg.train.batch_size, shuffle=True, collate_fn=task.collate,
                        generator=torch.Generator().manual_seed(cfg.seed))
    batches = []
    for batch in loader:
        batches.append({k: v.to(accelerator.device) for k, v in batch.items()})
        if len(batches) == cfg.importance.batches:
            break
    return batches


def prune_round(cfg: PruneConfig, model: PreTrainedModel, r: int, rounds: int, original: list[dict],
                progress: Progress, batches: list[dict], removals: Optional[tuple[int, int]]) -> None:
    """Round r of `rounds`: r/rounds of the way to the targets, or exactly `removals` (key/value groups of
    heads, FFN neurons) when a parameter budget planned them."""
    share = r / rounds
    scores = score(model, cfg.importance.criterion, batches, seed=cfg.seed * 1000 + r)
    if cfg.layers.active:
        count = round(cfg.layers.count * share)
        done = len(original) - len(progress.kept_layers)
        explicit = [progress.kept_layers.index(i) for i in cfg.layers.layers or [] if i in progress.kept_layers]
        drop = layers_to_drop(len(progress.kept_layers), count - done, cfg.layers.strategy, scores.layers, explicit)
        keep = drop_layers(model, drop)
        progress.kept_layers = [progress.kept_layers[i] for i in keep]
        scores = Scores([scores.heads[i] for i in keep], [scores.neurons[i] for i in keep], scores.layers[keep])
    remaining = [original[i] for i in progress.kept_layers]
    current = layer_shapes(model)
    if cfg.heads.active:
        group = kv_group_size(model.config)
        sizes = [s["heads"] // group for s in current]
        target = round(share * units_to_remove([s["heads"] // group for s in remaining], cfg.heads.fraction,
                                               heads_in_groups(cfg, group), "heads"))
        remove = target - (sum(s["heads"] for s in remaining) // group - sum(sizes))
        remove = removals[0] if removals else remove
        kept = select_kept([group_scores(s, group) for s in scores.heads], max(remove, 0), cfg.heads.scope)
        prune_heads(model, {i: expand_groups(groups, group) for i, groups in enumerate(kept)})
    if cfg.ffn.active:
        target = round(share * units_to_remove([s["intermediate"] for s in remaining], cfg.ffn.fraction,
                                               cfg.ffn.count, "ffn"))
        remove = target - (sum(s["intermediate"] for s in remaining) - sum(s["intermediate"] for s in current))
        remove = removals[1] if removals else remove
        kept = select_kept(scores.neurons, max(remove, 0), cfg.ffn.scope)
        prune_ffn(model, dict(enumerate(kept)))
    if r == rounds and cfg.low_rank.active:
        lr = cfg.low_rank
        factorize(model, rank=lr.rank, rank_fraction=lr.rank_fraction, energy=lr.energy, patterns=lr.patterns)
    apply_sparsity(cfg, model, share, last=r == rounds)


def heads_in_groups(cfg: PruneConfig, group: int) -> Optional[int]:
    return None if cfg.heads.count is None else cfg.heads.count // group


def apply_sparsity(cfg: PruneConfig, model: PreTrainedModel, share: float, last: bool) -> None:
    sp = cfg.sparsity
    if sp.kind == "unstructured":
        apply_masks(model, magnitude_masks(model, sp.sparsity * share, scope=sp.scope, patterns=sp.patterns))
    elif sp.kind == "n:m" and last:
        apply_masks(model, nm_masks(model, n=sp.n, m=sp.m, patterns=sp.patterns))


def recover(cfg: PruneConfig, model: PreTrainedModel, teacher: PreTrainedModel, task: Task, accelerator,
            round_dir: Path, progress: Progress, on_step: OnStep) -> PreTrainedModel:
    """Distil the pruned model from the unpruned one; hidden states of kept layers match their originals."""
    if accelerator.is_main_process:
        round_dir.mkdir(parents=True, exist_ok=True)
    layer_map = build_layer_map(LayerMapConfig(kind="explicit", layers=progress.kept_layers),
                                len(progress.kept_layers), teacher.config.num_hidden_layers)
    trainer = Trainer(accelerator, model, teacher, task.splits, task.collate, cfg.train, cfg.seed,
                      round_dir, on_step)
    model = trainer.fit([cfg.recovery], LossSetup(model.config, teacher.config, layer_map))
    trainer.cleanup()
    return model


def save_round(model: PreTrainedModel, task: Task, round_dir: Path, progress: Progress) -> None:
    save_compressed(model, task.tokenizer, round_dir / "model")
    write_json_atomic({"kept_layers": progress.kept_layers, "rounds_done": progress.rounds_done},
                      round_dir / "progress.json")


def compress_vocabulary(cfg: PruneConfig, model: PreTrainedModel, task: Task) -> tuple[Task, dict]:
    """Prune the vocabulary of `model` and the task's tokenizer to the corpus `cfg.vocab` names; the task comes
    back re-tokenized with the pruned tokenizer, with the numbers for the metrics."""
    raw = load_splits(cfg.data)
    report = prune_vocabulary(model, task.tokenizer, vocabulary_corpus(cfg.vocab, raw["train"]), cfg.vocab.max_tokens)
    test_texts = texts_of(raw["test"])
    metrics = {"tokens_kept": report.kept, "original_vocab_size": report.original,
               "test_unknown_fraction": unknown_fraction(report.tokenizer, test_texts),
               "test_unknown_fraction_before": unknown_fraction(task.tokenizer, test_texts),
               "test_texts_changed": changed_fraction(task.tokenizer, report.tokenizer, test_texts)}
    splits, truncation = tokenize_and_measure(raw, report.tokenizer, cfg.data.max_length)
    return Task(report.tokenizer, splits, task.labels, truncation=truncation), metrics


def vocabulary_corpus(cfg: VocabConfig, train: datasets.Dataset) -> list[str]:
    """The training texts (the first `max_examples`, if set), then the lines of each `extra_texts` file."""
    if cfg.max_examples is not None:
        train = train.select(range(min(len(train), cfg.max_examples)))
    corpus = texts_of(train)
    for path in cfg.extra_texts or []:
        corpus.extend(line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())
    return corpus


def texts_of(split: datasets.Dataset) -> list[str]:
    """The `text` column, and the `text_pair` column of pair tasks."""
    texts = list(split["text"])
    if "text_pair" in split.column_names:
        texts.extend(split["text_pair"])
    return texts


PRUNE = register_job(Job("prune", PruneConfig, check_prune_config, prune,
                         lambda cfg, result: {"model": f"{cfg.output_dir}/model", **result.metrics}))
