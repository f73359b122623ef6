"""The loss interface the training loop knows: a loss is a `DistillLoss` registered by name, built from its
`LossConfig` entry and a `LossSetup`, called on `LossInputs`. It declares which model outputs it reads (so that only
those are computed) and which options of `LossConfig` it takes; losses that share one `group` run together in one
call of their class's `run_group` (the causal token losses share each chunk's logits that way). The loss families
live in `distill.losses`, which registers them when imported."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.utils import ModelOutput

from distill.core.config import LossConfig, StageConfig
from distill.core.errors import ConfigError, closest
from distill.core.mapping import LayerMap
from distill.core.registry import Registry
from distill.core.schedule import check_schedule, scheduled


@dataclass
class LossSetup:
    """What a loss may need to know when it is built: both model configs and the layer map."""
    student_config: PretrainedConfig
    teacher_config: Optional[PretrainedConfig]
    layer_map: Optional[LayerMap]
    vocab_size: Optional[int] = None
    """Token-level causal losses: how many leading token ids both models' logits share (`distill.lm.vocab`);
    their logits are sliced to it. None: the logits as they are."""
    shared_vocab: Optional[object] = None
    """Cross-tokenizer losses: the tokens both vocabularies share, in buckets (`distill.lm.align.SharedVocab`)."""


TEACHER_LOGITS = "teacher_logits"
"""The batch key of a classifier teacher's cached logits (`distill.encoder.teacher_logits`): with it in a batch, the
trainer uses them instead of running the teacher."""
IGNORED_LABEL = -100
"""The label of an example without one (a transfer-set or augmented example): hard-label losses skip it."""
TEACHER_PREFIX = "teacher_"
"""Batch keys that start with it carry what a teacher computed (cached logits, a cache's top-k rows): never a model
input."""


TEACHER_INPUTS = ("teacher_input_ids", "teacher_attention_mask")
"""The batch keys of the teacher's own tokenization of the batch's texts, for a teacher whose tokenizer is not the
student's (`distill.lm.align`)."""


POSITION_IDS = "position_ids"
"""The batch key of a packed batch's position ids, which restart at 0 at every text (`distill.lm.packing`)."""


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | bool]:
    """The entries of a batch that a model's forward takes: not the labels, nor cached teacher rows. A packed batch
    (one with `position_ids`) goes without its attention mask and KV cache: only then do transformers' masks read the
    restarts of the position ids as text boundaries (a block-diagonal causal mask); its padding comes last, so no
    real token sees it."""
    inputs = {name: value for name, value in batch.items() if name != "labels" and not name.startswith(TEACHER_PREFIX)}
    if POSITION_IDS in inputs:
        del inputs["attention_mask"]
        inputs["use_cache"] = False
    return inputs


def token_targets(labels: torch.Tensor) -> int:
    """The next-token targets of a batch of token labels (B, L): the positions t whose labels[t + 1] is not -100;
    0 for labels of whole examples (B,)."""
    return int((labels[:, 1:] != IGNORED_LABEL).sum()) if labels.ndim == 2 else 0


def teacher_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the teacher's forward takes: its own tokenization of the texts when the batch carries one, else the
    student's inputs."""
    if TEACHER_INPUTS[0] in batch:
        return {"input_ids": batch[TEACHER_INPUTS[0]], "attention_mask": batch[TEACHER_INPUTS[1]]}
    return model_inputs(batch)


@dataclass
class LossInputs:
    student: ModelOutput
    teacher: Optional[ModelOutput]
    labels: torch.Tensor
    attention_mask: torch.Tensor
    peer_logits: Optional[list[torch.Tensor]] = None
    """The other students' logits, in mutual learning."""
    batch: Optional[dict[str, torch.Tensor]] = None
    """The whole batch, for losses that read what a collator added (a teacher cache's rows)."""
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
    """Given the output heads (`LossInputs.student_head` / `teacher_head`), the loss reads the final hidden states and
    projects them itself, instead of reading the logits; when every loss of a stage does, the models compute none."""
    group: Optional[str] = None
    """Losses of one stage with the same group run together: one call of `run_group` on their class."""
    options: tuple[str, ...] = ()
    """The `LossConfig` fields this loss reads beyond `COMMON_OPTIONS`; any other field set away from its default is
    an error (`check_loss`)."""

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

    @classmethod
    def run_group(cls, losses: dict[str, DistillLoss], inputs: LossInputs
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """For a `group`: the sum of `losses` each at its current `weight`, and each one's detached value."""
        raise NotImplementedError(f"{cls.__name__} declares group '{cls.group}' but no run_group")

    def saved_files(self) -> dict[str, str | bytes]:
        """Files that this loss adds to the saved model folder (name -> text or bytes): what it learned that
        outlives training, such as early-exit heads."""
        return {}


LOSSES: Registry[type[DistillLoss]] = Registry("loss")
register = LOSSES.register
COMMON_OPTIONS = ("name", "weight", "schedule", "final_weight")
"""`LossConfig` fields every loss takes."""
IMPLIED_OPTIONS = {"temperature": ("final_temperature",)}
"""Fields a loss takes because it takes another: a temperature can be scheduled."""


def require_loss(name: str, where: str = "") -> type[DistillLoss]:
    """The registered loss class, or an error naming the closest known loss."""
    return LOSSES.require(name, where)


def accepted_options(cls: type[DistillLoss]) -> list[str]:
    own = [implied for option in cls.options for implied in (option, *IMPLIED_OPTIONS.get(option, ()))]
    return [*COMMON_OPTIONS, *own]


def check_option_names(spec: LossConfig, cls: type[DistillLoss], where: str = "") -> None:
    """Refuse an option (a field away from its default) that the loss does not read: it would be silently dropped."""
    accepted = accepted_options(cls)
    for field in dataclasses.fields(LossConfig):
        if field.name in accepted or getattr(spec, field.name) == _default(field):
            continue
        close = closest(field.name, accepted)
        hint = f"did you mean '{close}'? " if close else ""
        raise ConfigError(f"{where}loss '{spec.name}' takes no option '{field.name}'; {hint}its options: "
                          f"{', '.join(accepted[1:])}")


def _default(field: dataclasses.Field):
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def check_loss(spec: LossConfig, where: str = "") -> type[DistillLoss]:
    """Config-only checks of one loss entry (name, schedule, the loss's own options); returns its class."""
    cls = require_loss(spec.name, where)
    check_option_names(spec, cls, where)
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


def check_stages(stages: list[StageConfig], peers: int = 0) -> None:
    """Config-only checks of training stages, before anything is loaded. `peers`: how many students train beside
    each one (mutual learning); losses between peers need some, and peers need such a loss."""
    if not stages:
        raise ConfigError("at least one stage is needed")
    for i, stage in enumerate(stages):
        if stage.epochs <= 0 or stage.learning_rate <= 0:
            raise ConfigError(f"stages[{i}] ('{stage.name}'): epochs and learning_rate must be positive")
        if not stage.losses:
            raise ConfigError(f"stages[{i}] ('{stage.name}') lists no losses")
        for loss in stage.losses:
            if check_loss(loss, where=f"stages[{i}]: ").needs_peers and not peers:
                raise ConfigError(f"stages[{i}]: loss '{loss.name}' needs peer students; list them in mutual.peers")
    if peers and not any(LOSSES[loss.name].needs_peers for stage in stages for loss in stage.losses):
        raise ConfigError(
            f"mutual.peers lists {peers} student(s) but no stage has the 'peer_kl' loss: the students would not "
            "learn from each other"
        )


def attention_implementation(stages: list[StageConfig]) -> str:
    """`eager` when a loss reads attention maps (with SDPA, transformers 5 returns none), else `sdpa`."""
    needs_attentions = any(LOSSES[loss.name].needs_attentions for stage in stages for loss in stage.losses)
    return "eager" if needs_attentions else "sdpa"
