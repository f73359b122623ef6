from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.utils import ModelOutput

from ..config import ConfigError, LossConfig
from ..mapping import LayerMap
from .schedule import check_schedule, scheduled


@dataclass
class LossSetup:
    """What a loss may need to know when it is built: both model configs and the layer map."""
    student_config: PretrainedConfig
    teacher_config: Optional[PretrainedConfig]
    layer_map: Optional[LayerMap]
    vocab_size: Optional[int] = None
    """Token-level causal losses: how many leading token ids both models' logits share (`distill.vocab_check`);
    their logits are sliced to it. None: the logits as they are."""


TOPK_KEYS = ("teacher_topk_logprobs", "teacher_topk_indices")
"""The batch keys under which a teacher cache's collator places `TeacherTopK`'s tensors."""
TEACHER_LOGITS = "teacher_logits"
"""The batch key of a classifier teacher's cached logits (`distill.teacher_outputs`)."""
NOT_MODEL_INPUTS = {"labels", TEACHER_LOGITS, *TOPK_KEYS}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a batch that a model's forward takes: not the labels, nor cached teacher rows."""
    return {name: value for name, value in batch.items() if name not in NOT_MODEL_INPUTS}


@dataclass
class TeacherTopK:
    """The teacher's next-token distribution kept as its k most likely tokens per position (a teacher cache's
    form): log-probabilities at the loss temperature (float16 or float32) and their token ids (int32 or int64), both
    (batch, length, k) and aligned with the student's logits: position t holds the distribution over token t + 1."""
    logprobs: torch.Tensor
    indices: torch.Tensor

    @classmethod
    def from_batch(cls, batch: dict[str, torch.Tensor]) -> Optional[TeacherTopK]:
        return cls(*(batch[name] for name in TOPK_KEYS)) if TOPK_KEYS[0] in batch else None

    def rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 log-probabilities and int64 ids (len(positions), k) of the flat (batch * length) `positions`."""
        k = self.indices.shape[-1]
        return (self.logprobs.reshape(-1, k)[positions].float(), self.indices.reshape(-1, k)[positions].long())


@dataclass
class LossInputs:
    student: ModelOutput
    teacher: Optional[ModelOutput]
    labels: torch.Tensor
    attention_mask: torch.Tensor
    peer_logits: Optional[list[torch.Tensor]] = None
    """The other students' logits, in mutual learning."""
    teacher_topk: Optional[TeacherTopK] = None
    """The teacher's cached top-k next-token distribution, for `topk_kl`."""
    student_head: Optional[nn.Module] = None
    """The student's LM head. With it, causal token losses read the final (normed) states `hidden_states[-1]` and
    project them chunk by chunk, so that the (batch, length, vocabulary) logits never exist; without it they read
    `logits`."""
    teacher_head: Optional[nn.Module] = None
    """The teacher's LM head, read the same way as `student_head`."""


class DistillLoss(nn.Module):
    """Base class: subclasses declare what model outputs they read, so only those are computed."""
    needs_teacher = True
    needs_hidden_states = False
    needs_attentions = False
    needs_peers = False
    reads_lm_head = False
    """Causal token losses (`causal._TokenLoss`): given the LM heads (`LossInputs.student_head` / `teacher_head`), they
    read the final hidden states instead of the logits, and a stage runs them together as one pass
    (`causal.token_losses`)."""

    def __init__(self, spec: LossConfig, setup: LossSetup):
        super().__init__()
        self.spec = spec
        self.progress = 0.0  # fraction of the stage done: moves `weight` and `temperature` along the schedule

    @classmethod
    def check_options(cls, spec: LossConfig, where: str = "") -> None:
        """Config-only checks of this loss's own options, run before any model loads."""

    @property
    def weight(self) -> float:
        return scheduled(self.spec.schedule, self.spec.weight, self.spec.final_weight, self.progress)

    @property
    def temperature(self) -> float:
        return scheduled(self.spec.schedule, self.spec.temperature, self.spec.final_temperature, self.progress)

    def scheduled_values(self) -> dict[str, float]:
        """The current value of each scheduled quantity that moves during the stage (for the metrics log)."""
        values = {}
        if self.spec.final_weight is not None:
            values["weight"] = self.weight
        if self.spec.final_temperature is not None:
            values["temperature"] = self.temperature
        return values

    def attach(self, student: nn.Module) -> None:
        """Called once with the student this loss trains, before training (early-exit heads start from its own
        head)."""

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        raise NotImplementedError

    def saved_files(self) -> dict[str, str | bytes]:
        """Files that this loss adds to the saved model folder (name -> text or bytes): what it learned that
        outlives training, such as early-exit heads."""
        return {}


LOSSES: dict[str, type[DistillLoss]] = {}


def register(name: str) -> Callable[[type[DistillLoss]], type[DistillLoss]]:
    def add(cls: type[DistillLoss]) -> type[DistillLoss]:
        if name in LOSSES:
            raise ValueError(f"loss '{name}' is already registered")
        LOSSES[name] = cls
        return cls

    return add


def require_loss(name: str, where: str = "") -> type[DistillLoss]:
    """The registered loss class, or an error naming the closest known loss."""
    if name not in LOSSES:
        close = difflib.get_close_matches(name, LOSSES, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(sorted(LOSSES))}"
        raise ConfigError(f"{where}unknown loss '{name}'; {hint}")
    return LOSSES[name]


def check_loss(spec: LossConfig, where: str = "") -> type[DistillLoss]:
    """Config-only checks of one loss entry (name, schedule, the loss's own options); returns its class."""
    cls = require_loss(spec.name, where)
    check_schedule(spec, where)
    if spec.learning_rate is not None and spec.learning_rate <= 0:
        raise ConfigError(f"{where}loss '{spec.name}': learning_rate must be positive; got {spec.learning_rate}")
    cls.check_options(spec, where)
    return cls


def build_losses(specs: list[LossConfig], setup: LossSetup) -> nn.ModuleDict:
    """Instantiate each configured loss; errors name the bad entry before any training starts."""
    built = nn.ModuleDict()
    for spec in specs:
        cls = check_loss(spec)
        if spec.name in built:
            raise ConfigError(f"loss '{spec.name}' is listed twice in one stage")
        if cls.needs_teacher and setup.teacher_config is None:
            raise ConfigError(f"loss '{spec.name}' needs a teacher, and this run has none")
        built[spec.name] = cls(spec, setup)
    return built
