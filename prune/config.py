"""Typed configuration of a pruning run: what to remove, by which criterion, in how many rounds, and how each
round recovers (distillation from the unpruned model). Loaded like every other config: YAML plus overrides."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from distill.config import DataConfig, LossConfig, StageConfig, TrainConfig


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
    count: Optional[int] = None
    scope: str = "global"
    """`global` (one ranking over all layers, scores normalised per layer) or `layer` (same share per layer)."""

    @property
    def active(self) -> bool:
        return bool(self.fraction) or bool(self.count)


@dataclass
class LayerDropConfig:
    count: int = 0
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
    m: int = 4
    patterns: Optional[list[str]] = None
    """Regexes on module paths; None selects every Linear inside the transformer layers."""


@dataclass
class LowRankConfig:
    rank: Optional[int] = None
    rank_fraction: Optional[float] = None
    """Fraction of each Linear's full rank min(in, out): 0.5 halves it."""
    energy: Optional[float] = None
    """Smallest rank keeping this fraction of the squared singular values."""
    patterns: Optional[list[str]] = None

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.rank, self.rank_fraction, self.energy))


@dataclass
class VocabConfig:
    """Vocabulary pruning (WordPiece tokenizers): keep the tokens of the training texts and of `extra_texts`."""
    enabled: bool = False
    extra_texts: Optional[list[str]] = None
    """Text files, one text per line, whose tokens are kept too (e.g. unlabelled in-domain text)."""
    max_examples: Optional[int] = None
    """Use only the first this many training examples; None uses all."""


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
    teacher: Optional[str] = None
    """The unpruned reference that recovery distils from; None uses `model`."""
    output_dir: str = "runs/pruned"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    heads: UnitPruneConfig = field(default_factory=UnitPruneConfig)
    ffn: UnitPruneConfig = field(default_factory=UnitPruneConfig)
    layers: LayerDropConfig = field(default_factory=LayerDropConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    low_rank: LowRankConfig = field(default_factory=LowRankConfig)
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
    recovery: StageConfig = field(default_factory=default_recovery)
    train: TrainConfig = field(default_factory=TrainConfig)
