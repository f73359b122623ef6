"""The configs of the classifier jobs: fine-tuning a teacher, and distilling it (single teacher, several teachers,
mutual learning, born-again generations)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from distill.core.config import DataConfig, LayerMapConfig, StageConfig, StudentConfig, TrainConfig


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
    """The model to fine-tune (a path, `offline:NAME` or a Hub id), loaded as a sequence classifier over the data's
    labels; its tokenizer tokenizes `data`."""
    output_dir: str = "runs/teacher"
    """The run folder: config.yaml, metrics.jsonl, checkpoints while it runs, then the teacher in `model/` and
    metrics.json."""
    seed: int = 0
    """Random seed of the run: weight initialisation, dropout and the order of training batches."""
    data: DataConfig = field(default_factory=DataConfig)
    """The classification task."""
    stage: StageConfig = field(default_factory=lambda: StageConfig(name="finetune", learning_rate=5e-5))
    """The one training stage: its epochs, learning rate and losses."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop's settings."""


@dataclass
class DistillConfig:
    """Distil a fine-tuned teacher into a smaller student, in one or more stages."""
    teacher: str = "runs/teacher/model"
    """The fine-tuned teacher classifier (a path, `offline:NAME` or a Hub id); its tokenizer tokenizes `data`."""
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
    """The run folder: config.yaml, metrics.jsonl, checkpoints while it runs, then the student in `model/` and
    metrics.json (one folder per generation with `generations` > 1)."""
    seed: int = 0
    """Random seed of the run: weight initialisation, dropout and the order of training batches."""
    data: DataConfig = field(default_factory=DataConfig)
    """The classification task."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """How the student is built."""
    mutual: MutualConfig = field(default_factory=MutualConfig)
    """Deep mutual learning's peer students."""
    layer_map: LayerMapConfig = field(default_factory=LayerMapConfig)
    """Which teacher layer each student layer matches, for the losses on hidden states and attention maps."""
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    """The training stages, run in order, each with its own losses, epochs and learning rate."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop's settings."""
