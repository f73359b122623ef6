"""Structured pruning of a causal LM, Minitron-style: one pass over calibration text scores every attention head,
FFN neuron, hidden channel and layer (`importance`), then depth (whole layers) and width (key/value groups of heads,
FFN neurons, hidden channels) are cut to the configured sizes, or to sizes that `target_parameters` picks. Widths
are uniform across layers by default, so the result is the family's stock architecture with a stock config: plain
`AutoModelForCausalLM.from_pretrained` loads it, and so do serving engines. Recovery is a separate job: causal-LM
distillation from the unpruned model (`distill.lm.job`, `student.init: pretrained`).

Outputs in `output_dir`: `config.yaml`, `model/` (the pruned model and tokenizer, reloaded and compared with the
model in memory) and `metrics.json` (sizes, kept layers, parameters and validation perplexity before and after)."""
from __future__ import annotations

import bisect
import copy
import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from distill.core.arch import head_dim, kv_group_size, layer_list
from distill.core.data import corpus_tokens
from distill.core.errors import ConfigError
from distill.core.evaluate import count_parameters
from distill.core.io import write_json_atomic
from distill.core.jobs import Job, register_job
from distill.core.models import ensure_pad_token, load_causal_lm, load_tokenizer
from distill.core.run import RunResult, new_accelerator, open_run
from distill.lm.data import LMCollator, held_out_splits
from distill.lm.metrics import perplexity
from prune.config import LMPruneConfig
from prune.family import model_config
from prune.ffn import prune_ffn
from prune.heads import expand_groups, group_scores, prune_heads
from prune.hidden import prune_hidden
from prune.importance import CRITERIA, Scores, activation_scores, score
from prune.layers import drop_layers
from prune.saving import compression_spec, layer_shapes, save_compressed, sync_config
from prune.selection import select_kept

PURPOSE = "causal-LM pruning"
LM_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
DEPTH_STRATEGIES = ("block_influence", "perplexity", "alternate", "explicit")
TARGET_AXES = ("hidden", "ffn", "heads", "depth")
CALIBRATION_TOKENS = 1024
"""Real tokens a data-driven ranking needs at least: below it the scores of a few hundred tokens rank units by
noise."""
DATA_DRIVEN = ("activation", "activation_squared", "taylor", "fisher")


@dataclass(frozen=True)
class Sizes:
    """What the pruned model keeps: uniform widths (None: unchanged) and the layers removed."""
    hidden_size: Optional[int]
    intermediate_size: Optional[int]
    key_value_heads: Optional[int]
    remove_layers: int

    def describe(self) -> dict:
        return {"hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "key_value_heads": self.key_value_heads, "layers_removed": self.remove_layers}


# ----- checks -----------------------------------------------------------------------------------------------------
def check_prune_lm(cfg: LMPruneConfig) -> None:
    """Config-only checks; what needs the model's config (its family, sizes it cannot reach) is checked by
    `plan_sizes` on config.json, before any weights load."""
    CRITERIA.require(cfg.importance, "importance: ")
    if cfg.depth.strategy not in DEPTH_STRATEGIES:
        raise ConfigError(f"depth.strategy must be one of {', '.join(DEPTH_STRATEGIES)}; got '{cfg.depth.strategy}'")
    if cfg.depth.strategy == "explicit" and cfg.depth.layers is None:
        raise ConfigError("depth.strategy 'explicit' needs depth.layers, the layers to remove")
    if cfg.depth.strategy != "explicit" and cfg.depth.layers is not None:
        raise ConfigError(f"depth.layers is only used with strategy 'explicit' (strategy is '{cfg.depth.strategy}')")
    if cfg.depth.count < 0:
        raise ConfigError(f"depth.count must be 0 or more; got {cfg.depth.count}")
    for axis in cfg.target_axes:
        if axis not in TARGET_AXES:
            raise ConfigError(f"target_axes: unknown axis '{axis}'; choose from {', '.join(TARGET_AXES)}")
    if "depth" in cfg.target_axes and len(cfg.target_axes) > 1:
        raise ConfigError("target_axes: 'depth' is searched alone (layers removed one at a time); give it alone")
    if cfg.target_parameters is not None:
        if cfg.target_parameters <= 0:
            raise ConfigError(f"target_parameters must be positive; got {cfg.target_parameters}")
        given = {"hidden": cfg.width.hidden_size, "ffn": cfg.width.intermediate_size,
                 "heads": cfg.width.key_value_heads, "depth": cfg.depth.count or None}
        clash = [axis for axis in cfg.target_axes if given[axis] is not None]
        if clash:
            raise ConfigError(f"target_parameters picks the sizes of {', '.join(clash)}: leave them unset in "
                              "width / depth")
    elif not (cfg.width.hidden_size or cfg.width.intermediate_size or cfg.width.key_value_heads or cfg.depth.count
              or cfg.depth.layers):
        raise ConfigError("nothing to prune: set width sizes, depth.count / depth.layers, or target_parameters")
    prunes_hidden = cfg.width.hidden_size or (cfg.target_parameters is not None and "hidden" in cfg.target_axes)
    if prunes_hidden and cfg.importance in ("taylor", "fisher"):
        raise ConfigError(f"pruning the hidden size needs a criterion that ranks hidden channels; '{cfg.importance}' "
                          "does not: use activation, activation_squared or magnitude")
    if cfg.width.multiple_of < 1:
        raise ConfigError(f"width.multiple_of must be at least 1; got {cfg.width.multiple_of}")
    for name in ("validation_examples", "test_examples", "eval_batch_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be at least 1; got {getattr(cfg, name)}")
    if cfg.calibration.examples < 1 or cfg.calibration.batch_size < 1:
        raise ConfigError("calibration.examples and calibration.batch_size must be at least 1")


def check_family(config: PretrainedConfig) -> None:
    if config.model_type not in LM_FAMILIES:
        raise ConfigError(f"causal-LM pruning supports the families {', '.join(LM_FAMILIES)}; "
                          f"'{config.model_type}' is not one of them")


def plan_sizes(cfg: LMPruneConfig, config: PretrainedConfig) -> Sizes:
    """The sizes to keep, given or picked by `target_parameters`, each checked against the model's config."""
    check_family(config)
    text = config.get_text_config()
    layers = text.num_hidden_layers
    remove = len(set(cfg.depth.layers)) if cfg.depth.strategy == "explicit" else cfg.depth.count
    sizes = Sizes(cfg.width.hidden_size, cfg.width.intermediate_size, cfg.width.key_value_heads, remove)
    if cfg.target_parameters is not None:
        sizes = target_sizes(cfg, text)
    check_sizes(sizes, text, cfg.depth.layers if cfg.depth.strategy == "explicit" else None)
    pruned_config(text, sizes)
    if sizes.remove_layers >= layers:
        raise ConfigError(f"removing {sizes.remove_layers} of {layers} layers would leave none; keep at least one")
    if cfg.depth.strategy == "alternate" and sizes.remove_layers > layers // 2:
        raise ConfigError(f"depth.strategy 'alternate' removes at most {layers // 2} of {layers} layers; got "
                          f"{sizes.remove_layers}")
    return sizes


def check_sizes(sizes: Sizes, config: PretrainedConfig, explicit: Optional[list[int]]) -> None:
    heads, kv = config.num_attention_heads, key_value_heads(config)
    checks = [("hidden_size", sizes.hidden_size, config.hidden_size),
              ("intermediate_size", sizes.intermediate_size, config.intermediate_size),
              ("key_value_heads", sizes.key_value_heads, kv)]
    for name, value, full in checks:
        if value is not None and not 1 <= value <= full:
            raise ConfigError(f"width.{name}={value} is out of reach: the model has {full}; keep 1..{full}")
    if sizes.key_value_heads is not None and heads % kv:
        raise ConfigError(f"{heads} query heads are not a whole number of key/value groups of {kv}")
    if explicit is not None:
        bad = [i for i in explicit if not 0 <= i < config.num_hidden_layers]
        if bad:
            raise ConfigError(f"depth.layers {bad} out of range: the model has layers "
                              f"0..{config.num_hidden_layers - 1}")


def target_sizes(cfg: LMPruneConfig, config: PretrainedConfig) -> Sizes:
    """Sizes whose model has at most `target_parameters` parameters, counted exactly on a model built on the meta
    device: the largest common shrink factor over `target_axes` that fits (each axis rounded down to its step), then
    grown towards the target (`grow`). `depth` alone removes the fewest layers that fit."""
    target, step = cfg.target_parameters, cfg.width.multiple_of
    full = parameters_of(config, Sizes(None, None, None, 0))
    if target >= full:
        raise ConfigError(f"target_parameters={target:,} is not below the model's own {full:,} parameters: "
                          "nothing to prune")
    kv = key_value_heads(config)
    given = Sizes(cfg.width.hidden_size, cfg.width.intermediate_size, cfg.width.key_value_heads, 0)
    if cfg.target_axes == ["depth"]:
        for remove in range(config.num_hidden_layers):
            if parameters_of(config, dataclasses.replace(given, remove_layers=remove)) <= target:
                return dataclasses.replace(given, remove_layers=remove)
        last = parameters_of(config, dataclasses.replace(given, remove_layers=config.num_hidden_layers - 1))
        raise ConfigError(f"target_parameters={target:,} is out of reach by removing layers: one layer left has "
                          f"{last:,}")

    removed = len(set(cfg.depth.layers)) if cfg.depth.strategy == "explicit" else cfg.depth.count

    def at(factor: float) -> Sizes:
        """The target axes scaled by `factor`; the other axes as `width` / `depth` give them."""
        groups = max(1, math.floor(kv * factor)) if "heads" in cfg.target_axes else cfg.width.key_value_heads

        def width(full: int, multiple: int) -> int:
            return max(multiple, math.floor(full * factor / multiple) * multiple) if full >= multiple else full
        return Sizes(width(config.hidden_size, hidden_step(config, step, groups or kv))
                     if "hidden" in cfg.target_axes else cfg.width.hidden_size,
                     width(config.intermediate_size, step) if "ffn" in cfg.target_axes else
                     cfg.width.intermediate_size, groups, removed)

    smallest = parameters_of(config, at(0.0))
    if smallest > target:
        raise ConfigError(f"target_parameters={target:,} is out of reach by shrinking {', '.join(cfg.target_axes)}: "
                          f"the smallest such model has {smallest:,}")
    budget = Budget(config, target, cfg.target_axes, step, parameters_counter(config))
    low, high = 0.0, 1.0
    for _ in range(30):
        middle = (low + high) / 2
        if budget.fits(at(middle)):
            low = middle
        else:
            high = middle
    return grow(at(low), budget)


@dataclass(frozen=True)
class Budget:
    """What `grow` works within: the model's config, the target and its axes, the width step, a parameter counter."""
    config: PretrainedConfig
    target: int
    axes: list[str]
    step: int
    count: Callable[[Sizes], float]

    def fits(self, sizes: Sizes) -> bool:
        return self.count(sizes) <= self.target


def parameters_counter(config: PretrainedConfig) -> Callable[[Sizes], float]:
    """`parameters_of` for `config`, remembered (the search asks again), infinite for sizes that the family's config
    validation refuses."""
    @functools.cache
    def count(sizes: Sizes) -> float:
        try:
            return parameters_of(config, sizes)
        except ConfigError:
            return math.inf
    return count


def grow(sizes: Sizes, budget: Budget) -> Sizes:
    """The common factor and each axis' rounding leave budget unused: the FFN, the finest axis, widens as far as the
    target allows; then one coarse axis (key/value groups or the hidden size) grows by one step, the FFN narrowing
    again to fit, the step that brings the model closest to the target, while one does. Then the model is below the
    target by less than one FFN step (without the FFN among the axes, one step of a coarse axis)."""
    sizes = widest_ffn(sizes, budget)
    while True:
        options = [s for s in (widest_ffn(larger, budget) for larger in coarse_steps(sizes, budget)) if s is not None]
        closest = max(options, key=budget.count, default=None)
        if closest is None or budget.count(closest) <= budget.count(sizes):
            return sizes
        sizes = closest


def widest_ffn(sizes: Sizes, budget: Budget) -> Optional[Sizes]:
    """`sizes` with the widest FFN (among the target's FFN widths) that keeps the model within the target; None when
    none does. Without the FFN among the target axes, `sizes` itself if it fits."""
    if "ffn" not in budget.axes:
        return sizes if budget.fits(sizes) else None
    widths = ffn_widths(budget.config.intermediate_size, budget.step)
    fitting = bisect.bisect_left(widths, True, key=lambda width: not budget.fits(
        dataclasses.replace(sizes, intermediate_size=width)))  # the model grows with the FFN: a prefix fits
    return dataclasses.replace(sizes, intermediate_size=widths[fitting - 1]) if fitting else None


def ffn_widths(full: int, step: int) -> list[int]:
    """The FFN widths a target picks from: the multiples of `step`, and the model's own width."""
    return sorted({*range(step, full + 1, step), full})


def coarse_steps(sizes: Sizes, budget: Budget) -> Iterator[Sizes]:
    """`sizes` with one coarse target axis one step larger, within the model's own sizes: one more key/value group
    (where the hidden size stays a whole number of hidden steps), or the next multiple of the hidden step."""
    config, kv = budget.config, key_value_heads(budget.config)
    groups, hidden = sizes.key_value_heads or kv, sizes.hidden_size or config.hidden_size
    if "heads" in budget.axes and groups < kv and (
            hidden == config.hidden_size or hidden % hidden_step(config, budget.step, groups + 1) == 0):
        yield dataclasses.replace(sizes, key_value_heads=groups + 1)
    if "hidden" in budget.axes and hidden < config.hidden_size:
        multiple = hidden_step(config, budget.step, groups)
        yield dataclasses.replace(sizes, hidden_size=min((hidden // multiple + 1) * multiple, config.hidden_size))


def hidden_step(config: PretrainedConfig, step: int, groups: int) -> int:
    """Families validate hidden_size as a multiple of the query heads, so the hidden step is a multiple of both."""
    return math.lcm(step, groups * kv_group_size(config))


def key_value_heads(config: PretrainedConfig) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def parameters_of(config: PretrainedConfig, sizes: Sizes) -> int:
    """The parameter count of the model `config` describes, pruned to `sizes` (uniform widths)."""
    with torch.device("meta"):
        return count_parameters(AutoModelForCausalLM.from_config(pruned_config(config, sizes)))


def pruned_config(config: PretrainedConfig, sizes: Sizes) -> PretrainedConfig:
    """`config` with the uniform `sizes`, checked by the family's own config validation (Gemma's, for one, wants
    the hidden size to be a multiple of the head count)."""
    pruned = copy.deepcopy(config)
    pruned.head_dim = head_dim(config)
    pruned.num_hidden_layers = config.num_hidden_layers - sizes.remove_layers
    if getattr(pruned, "layer_types", None) is not None:
        pruned.layer_types = pruned.layer_types[:pruned.num_hidden_layers]
    if sizes.hidden_size:
        pruned.hidden_size = sizes.hidden_size
    if sizes.intermediate_size:
        pruned.intermediate_size = sizes.intermediate_size
    if sizes.key_value_heads:
        pruned.num_attention_heads = sizes.key_value_heads * kv_group_size(config)
        pruned.num_key_value_heads = sizes.key_value_heads
    if hasattr(pruned, "validate"):
        try:
            pruned.validate()
        except Exception as err:  # transformers raises its own validation errors
            cause = getattr(err, "__cause__", None) or err
            raise ConfigError(f"the pruned {config.model_type} config would be invalid: {cause}") from None
    return pruned


# ----- the run ----------------------------------------------------------------------------------------------------
def prune_lm(cfg: LMPruneConfig) -> RunResult:
    """Check, calibrate, score, prune, save, reload and compare, measure."""
    check_prune_lm(cfg)
    sizes = plan_sizes(cfg, model_config(cfg.model))
    tokenizer = ensure_pad_token(load_tokenizer(cfg.model))
    tokenizer.padding_side = "right"
    splits, ranges = held_out_splits(corpus_tokens(cfg.data, tokenizer), cfg, with_cache_index=False)
    calibration_set = splits["train"].select(range(min(cfg.calibration.examples, len(splits["train"]))))
    check_calibration(cfg, sum(len(ids) for ids in calibration_set["input_ids"]))
    run_dir = open_run(cfg)
    model = load_causal_lm(cfg.model, dtype=torch.float32)
    set_seed(cfg.seed)
    collate, accelerator = LMCollator(tokenizer), new_accelerator(cpu=not torch.cuda.is_available())
    model.to(accelerator.device)
    batches = [{k: v.to(accelerator.device) for k, v in batch.items()}
               for batch in DataLoader(calibration_set, cfg.calibration.batch_size, collate_fn=collate)]
    validation = accelerator.prepare(DataLoader(splits["validation"], cfg.eval_batch_size, collate_fn=collate))
    before = {"parameters": count_parameters(model), "validation_perplexity": perplexity(model, validation,
                                                                                          accelerator)}
    kept_layers = prune_model(model, cfg, sizes, batches)
    spec = save_pruned(model, tokenizer, run_dir / "model")
    reloaded = load_causal_lm(str(run_dir / "model"), dtype=torch.float32).to(accelerator.device)
    metrics = {
        "model": cfg.model, "family": model.config.model_type, "importance": cfg.importance,
        "sizes": sizes.describe(), "kept_layers": kept_layers, "shapes": layer_shapes(model),
        "stock_architecture": not spec, "calibration_tokens": sum(int(b["attention_mask"].sum()) for b in batches),
        "unpruned": before, "parameters": count_parameters(model),
        "parameter_share": count_parameters(model) / before["parameters"],
        "validation_perplexity": perplexity(reloaded, validation, accelerator),
        "reload_max_abs_diff": max_logit_difference(model, reloaded, batches[0]), "splits": ranges,
    }
    write_json_atomic(metrics, run_dir / "metrics.json")
    return RunResult(reloaded, metrics, run_dir)


def check_calibration(cfg: LMPruneConfig, tokens: int) -> None:
    needs_data = cfg.importance in DATA_DRIVEN or cfg.depth.strategy in ("block_influence", "perplexity") and (
        cfg.depth.count or "depth" in cfg.target_axes)
    if needs_data and tokens < CALIBRATION_TOKENS:
        raise ConfigError(f"calibration has {tokens} tokens ({cfg.calibration.examples} texts of at most "
                          f"{cfg.data.max_length}); ranking by '{cfg.importance}' needs at least {CALIBRATION_TOKENS}: "
                          "raise calibration.examples or data.max_length")


def prune_model(model: PreTrainedModel, cfg: LMPruneConfig, sizes: Sizes, batches: list[dict]) -> list[int]:
    """Score on the calibration batches, then remove layers, head groups, FFN neurons and hidden channels; returns
    the original indices of the kept layers."""
    scores = score(model, cfg.importance, batches, seed=cfg.seed)
    layers = len(layer_list(model, PURPOSE))
    drop = layers_to_remove(model, cfg, sizes.remove_layers, batches, scores)
    keep = drop_layers(model, drop) if drop else list(range(layers))
    group = kv_group_size(model.config)
    if sizes.key_value_heads is not None:
        per_layer = [group_scores(scores.heads[i], group) for i in keep]
        prune_heads(model, {i: expand_groups(kept, group)
                            for i, kept in enumerate(kept_units(per_layer, sizes.key_value_heads, cfg.width.uniform))})
    if sizes.intermediate_size is not None:
        per_layer = [scores.neurons[i] for i in keep]
        prune_ffn(model, dict(enumerate(kept_units(per_layer, sizes.intermediate_size, cfg.width.uniform))))
    if sizes.hidden_size is not None:  # the check refuses criteria that give no hidden scores
        prune_hidden(model, scores.hidden.argsort(descending=True)[:sizes.hidden_size].tolist())
    sync_config(model)
    return keep


def kept_units(scores: list[torch.Tensor], keep: int, uniform: bool) -> list[list[int]]:
    """Per layer, the units that stay: the `keep` best of each layer (uniform), or the best `keep` x layers across
    all layers (per-layer counts differ)."""
    if uniform:
        return [sorted(s.argsort(descending=True)[:keep].tolist()) for s in scores]
    total = sum(len(s) for s in scores)
    return select_kept(scores, total - keep * len(scores), "global")


def layers_to_remove(model: PreTrainedModel, cfg: LMPruneConfig, count: int, batches: list[dict],
                     scores: Scores) -> list[int]:
    layers = len(layer_list(model, PURPOSE))
    strategy = cfg.depth.strategy
    if strategy == "explicit":
        return sorted(set(cfg.depth.layers))
    if not count:
        return []
    if strategy == "alternate":  # keeps the top layer, as the layer-subset student of the distillation job does
        return sorted(layers - 2 - 2 * j for j in range(count))
    if strategy == "perplexity":
        return sorted(removal_losses(model, batches).argsort()[:count].tolist())
    influence = scores.layers if cfg.importance.startswith("activation") else activation_scores(
        model, batches, torch.abs).layers
    return sorted(influence.argsort()[:count].tolist())


@torch.no_grad()
def removal_losses(model: PreTrainedModel, batches: list[dict]) -> torch.Tensor:
    """Per layer: the calibration loss of the model with that layer alone skipped (its output replaced by its
    input)."""
    def skip(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        return (x, *output[1:]) if isinstance(output, tuple) else x

    model.eval()
    losses = []
    for layer in layer_list(model, PURPOSE):
        handle = layer.register_forward_hook(skip, with_kwargs=True)
        try:
            losses.append(sum(model(**batch).loss.item() for batch in batches) / len(batches))
        finally:
            handle.remove()
    return torch.tensor(losses)


def save_pruned(model: PreTrainedModel, tokenizer, folder: Path) -> dict:
    """Save (stock when the widths are uniform); the shapes the stock config cannot express, if any."""
    spec = compression_spec(model)
    save_compressed(model, tokenizer, folder)
    return spec


@torch.no_grad()
def max_logit_difference(a: PreTrainedModel, b: PreTrainedModel, batch: dict) -> float:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return (a.eval()(**inputs).logits - b.eval()(**inputs).logits).abs().max().item()


PRUNE_LM = register_job(Job("prune_lm", LMPruneConfig, check_prune_lm, prune_lm,
                            lambda cfg, result: {"model": f"{cfg.output_dir}/model", **result.metrics}))
