"""Typed configuration of a pruning run: what to remove, by which criterion, in how many rounds, and how each
round recovers (distillation from the unpruned model). Loaded like every other config: YAML plus overrides."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from distill.core.config import CalibrationConfig, CorpusConfig, DataConfig, LossConfig, StageConfig, TrainConfig


@dataclass
class ImportanceConfig:
    criterion: str = "taylor"
    """`magnitude`, `taylor` (head-mask gradient), `fisher` (diagonal Fisher of the masks) or `random`."""
    batches: int = 32
    """Calibration batches (of `train.batch_size`) drawn from the training split for gradient criteria."""


@dataclass
class UnitPruneConfig:
    """Attention heads or FFN neurons to remove: a fraction or a count of those the unpruned model has."""
    fraction: Optional[float] = None
    """Share of the unpruned model's units to remove, in [0, 1); set this or `count`. With `target_parameters`: the
    share of the units still there that each round removes."""
    count: Optional[int] = None
    """How many units to remove in all (heads: a whole number of key/value groups); set this or `fraction`. Every
    layer keeps at least one."""
    scope: str = "global"
    """`global` (one ranking over all layers, scores normalised per layer) or `layer` (same share per layer)."""

    @property
    def active(self) -> bool:
        return bool(self.fraction) or bool(self.count)


@dataclass
class LayerDropConfig:
    count: int = 0
    """Layers to drop in all, reached over the rounds; 0: none (`explicit` drops `layers` instead)."""
    strategy: str = "importance"
    """`importance` (lowest layer-gate score), `top`, `alternate` (every other from the top) or `explicit`."""
    layers: Optional[list[int]] = None
    """For `explicit`: 0-based layers to drop."""

    @property
    def active(self) -> bool:
        return bool(self.count) or bool(self.layers)


@dataclass
class SparsityConfig:
    kind: str = "none"
    """`none`, `unstructured` (magnitude) or `n:m` (semi-structured, e.g. 2:4)."""
    sparsity: float = 0.5
    """For `unstructured`: fraction of the selected weights set to zero."""
    scope: str = "layer"
    """For `unstructured`: `layer` (each Linear to the sparsity) or `global` (one threshold)."""
    n: int = 2
    """For `n:m`: the weights kept (the largest in magnitude) in every group of `m` consecutive input weights."""
    m: int = 4
    """For `n:m`: the group size, which must divide each selected Linear's input size."""
    patterns: Optional[list[str]] = None
    """Regexes on module paths; None selects every Linear inside the transformer layers."""


@dataclass
class LowRankConfig:
    rank: Optional[int] = None
    """The rank of every factorized Linear; give exactly one of `rank`, `rank_fraction` and `energy`. A Linear that
    its rank would not shrink stays whole."""
    rank_fraction: Optional[float] = None
    """Fraction of each Linear's full rank min(in, out): 0.5 halves it."""
    energy: Optional[float] = None
    """Smallest rank keeping this fraction of the squared singular values."""
    patterns: Optional[list[str]] = None
    """Regexes on module paths from the base model (e.g. `encoder.layer.0.intermediate.dense`); None selects every
    Linear inside the transformer layers."""

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.rank, self.rank_fraction, self.energy))


@dataclass
class VocabConfig:
    """Vocabulary pruning (WordPiece tokenizers): keep the tokens of the training texts and of `extra_texts`."""
    enabled: bool = False
    """Prune the vocabulary; False leaves it whole."""
    extra_texts: Optional[list[str]] = None
    """Text files, one text per line, whose tokens are kept too (e.g. unlabelled in-domain text)."""
    max_examples: Optional[int] = None
    """Use only the first this many training examples; None uses all."""
    max_tokens: Optional[int] = None
    """Keep at most this many tokens in all: the special ones, every single character the texts use, then their
    other tokens by frequency (a word whose pieces were dropped is split into smaller kept pieces). None keeps every
    token of the texts."""


@dataclass
class EmbeddingConfig:
    """Compression of the word embedding, after vocabulary pruning."""
    int8: bool = False
    """Store it as int8 with one scale per row."""
    rank: Optional[int] = None
    """Factorize it as a thin embedding of this width times a projection (truncated SVD); None keeps it whole."""

    @property
    def active(self) -> bool:
        return self.int8 or self.rank is not None


def default_recovery() -> StageConfig:
    return StageConfig(name="recover", epochs=1.0, learning_rate=5e-5, losses=[
        LossConfig(name="kl", temperature=2.0), LossConfig(name="ce", weight=0.5), LossConfig(name="hidden_mse")])


@dataclass
class PruneConfig:
    """Prune (and optionally factorise or sparsify) a fine-tuned model, recovering by distillation; then
    optionally prune its vocabulary and compress its word embedding."""
    model: str = "runs/teacher/model"
    """The fine-tuned classifier to prune (a path, `offline:NAME` or a Hub id); its tokenizer tokenizes `data`."""
    teacher: Optional[str] = None
    """The unpruned reference that recovery distils from; None uses `model`."""
    output_dir: str = "runs/pruned"
    """The run folder: config.yaml, metrics.jsonl, a `round-<r>/` folder per round (resume state), then the pruned
    model in `model/` and metrics.json."""
    seed: int = 0
    """Random seed of the run: the calibration batches, `random` scores and recovery training."""
    data: DataConfig = field(default_factory=DataConfig)
    """The classification task: calibration batches, recovery training, evaluation, and the texts whose tokens
    vocabulary pruning keeps."""
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    """How heads, FFN neurons and layers are scored before each round."""
    heads: UnitPruneConfig = field(default_factory=UnitPruneConfig)
    """Attention heads to remove."""
    ffn: UnitPruneConfig = field(default_factory=UnitPruneConfig)
    """FFN neurons to remove."""
    layers: LayerDropConfig = field(default_factory=LayerDropConfig)
    """Whole layers to drop."""
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    """Weight sparsity of the Linears inside the layers."""
    low_rank: LowRankConfig = field(default_factory=LowRankConfig)
    """Low-rank factorization of the Linears inside the layers, in the last round."""
    vocab: VocabConfig = field(default_factory=VocabConfig)
    """Applied after the last round, without training after it."""
    embeddings: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    """Applied after vocabulary pruning, without training after it."""
    rounds: int = 1
    """Prune in this many equal steps towards the targets, recovering after each (iterative pruning). With
    `target_parameters`, the most rounds allowed."""
    target_parameters: Optional[int] = None
    """A parameter budget: each round removes `heads.fraction` / `ffn.fraction` of the heads / FFN neurons still
    there, until the model has at most this many parameters (the last round removes only what is needed)."""
    recover: bool = True
    """After each round, distil the pruned model from `teacher` with `recovery`; False: no training."""
    recovery: StageConfig = field(default_factory=default_recovery)
    """The training stage of each round's recovery; hidden-state losses match each kept layer to its original."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop's settings for recovery; `batch_size` also sizes the calibration batches."""


@dataclass
class WidthConfig:
    """Minitron's width axes for a causal LM: the sizes to keep (None keeps that axis whole)."""
    hidden_size: Optional[int] = None
    """Hidden (embedding) channels kept, the same in every layer and norm."""
    intermediate_size: Optional[int] = None
    """FFN neurons kept per layer (gate, up and down projections together)."""
    key_value_heads: Optional[int] = None
    """Key/value heads kept per layer; the query heads of their groups go with them (grouped-query attention)."""
    uniform: bool = True
    """Every layer keeps the same FFN width and head count, so the output is the family's stock architecture, loaded
    by plain `from_pretrained` and by serving engines. False ranks FFN neurons and head groups across layers: the
    per-layer widths need this framework's modeling code (`trust_remote_code`), which vLLM, TGI and llama.cpp do not
    run."""
    multiple_of: int = 64
    """With `target_parameters`: the hidden and FFN sizes it picks are multiples of this, and the hidden size also of
    the query head count. 64 is bitsandbytes' 4-bit block (its CPU kernels miscompute rows of another length) and
    two of llama.cpp's 32-value blocks (its K-quants want 256)."""


@dataclass
class DepthConfig:
    """Whole decoder layers to remove."""
    count: int = 0
    """How many layers to remove."""
    strategy: str = "block_influence"
    """`block_influence` (ShortGPT: the layers whose output is most like their input, on calibration text),
    `perplexity` (the layers whose removal alone raises the calibration loss least), `alternate` (every other layer
    from the top, as a layer-subset student) or `explicit` (`layers`)."""
    layers: Optional[list[int]] = None
    """For `explicit`: the 0-based layers to remove."""


@dataclass
class LMPruneConfig:
    """Structured pruning of a causal LM, Minitron-style: score heads, FFN neurons, hidden channels and layers on
    calibration text, then remove them; recover afterwards with the causal-LM distillation job."""
    model: str = "offline:SmolLM2-135M-Instruct"
    """The causal LM to prune (a path, `offline:NAME` or a Hub id)."""
    output_dir: str = "runs/pruned-lm"
    """The run folder: config.yaml, metrics.json and the pruned model in `model/`."""
    seed: int = 0
    """Seed of the `random` criterion."""
    data: CorpusConfig = field(default_factory=CorpusConfig)
    """The corpus, split as the causal-LM distillation job splits it (`validation_examples`, `test_examples`):
    calibration comes from its training part, the reported perplexity from its validation slice."""
    validation_examples: int = 50
    """Held-out texts before the test slice: the perplexity reported before and after pruning."""
    test_examples: int = 200
    """The last texts of the corpus: never read here, kept out of calibration."""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    """The calibration text."""
    importance: str = "activation"
    """The criterion ranking heads, FFN neurons and hidden channels: `activation` (mean |activation|, Minitron),
    `activation_squared`, `magnitude`, `taylor`, `fisher` or `random` (`taylor` and `fisher` do not rank hidden
    channels)."""
    width: WidthConfig = field(default_factory=WidthConfig)
    """The widths to keep."""
    depth: DepthConfig = field(default_factory=DepthConfig)
    """The layers to remove."""
    target_parameters: Optional[int] = None
    """A parameter count to end at or just below: it picks the sizes of the `target_axes` (scaled by one common
    factor, rounded to `width.multiple_of`; `depth` removes layers instead, one at a time), instead of giving them in
    `width` / `depth`."""
    target_axes: list[str] = field(default_factory=lambda: ["hidden", "ffn"])
    """What `target_parameters` shrinks: any of `hidden`, `ffn`, `heads`, or `depth` alone."""
    eval_batch_size: int = 8
    """Texts per forward pass when measuring perplexity."""
