"""Multi-teacher distillation: several teachers of one task, run together as one teacher.

Response losses see the ensemble: `kl` targets the weighted mixture of the teachers' softened distributions
(`mixture_log_probs`), and anything reading `logits` gets the weighted mean of the teachers' logits. Hidden states
and attention maps (all losses on them: hidden, attention, hint, relation) come from the first teacher alone: the
others may differ in depth and width, and their layers would not line up with one layer map."""
from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.core.errors import ConfigError
from distill.core.models import load_classifier, load_tokenizer, vocabulary_difference
from distill.encoder.config import DistillConfig
from distill.losses.response import EnsembleOutput


class TeacherEnsemble(nn.Module):
    """Called like one teacher; each batch runs every teacher once (the trainer calls it in eval mode, under
    no_grad). Only the first teacher computes hidden states and attention maps."""

    def __init__(self, teachers: list[PreTrainedModel], weights: list[float]):
        super().__init__()
        self.teachers = nn.ModuleList(teachers)
        self.register_buffer("weights", torch.tensor(weights), persistent=False)

    def forward(self, output_hidden_states: bool = False, output_attentions: bool = False,
                **inputs: torch.Tensor) -> EnsembleOutput:
        first = self.teachers[0](**inputs, output_hidden_states=output_hidden_states,
                                 output_attentions=output_attentions)
        others = [teacher(**inputs).logits for teacher in self.teachers[1:]]
        member_logits = torch.stack([first.logits, *others])
        mean_logits = (self.weights.view(-1, 1, 1) * member_logits.float()).sum(0)  # fp32 even under autocast
        return EnsembleOutput(logits=mean_logits, hidden_states=first.hidden_states, attentions=first.attentions,
                              member_logits=member_logits, weights=self.weights)


def normalised_teacher_weights(cfg: DistillConfig) -> list[float]:
    """Config-only check of `teacher_weights`: one non-negative weight per teacher, normalised to sum to 1."""
    count = 1 + len(cfg.extra_teachers)
    if cfg.teacher_weights is None:
        return [1.0 / count] * count
    weights = cfg.teacher_weights
    if len(weights) != count:
        raise ConfigError(
            f"teacher_weights lists {len(weights)} weights for {count} teachers (`teacher` first, then each of "
            "`extra_teachers`)"
        )
    for i, weight in enumerate(weights):
        if weight < 0:
            raise ConfigError(f"teacher_weights[{i}] is {weight}; weights must not be negative")
    total = sum(weights)
    if total <= 0:
        raise ConfigError("teacher_weights sum to 0; give at least one teacher a positive weight")
    return [weight / total for weight in weights]


def add_extra_teachers(teacher: PreTrainedModel, extra_teachers: list[str], weights: list[float],
                       tokenizer: PreTrainedTokenizerBase) -> nn.Module:
    """`teacher` alone when there are no extra teachers (the single-teacher path is unchanged); otherwise the
    ensemble, after checking each extra teacher's labels and tokenizer against `teacher`'s."""
    if not extra_teachers:
        return teacher
    extras = [load_extra_teacher(name, teacher, tokenizer) for name in extra_teachers]
    return TeacherEnsemble([teacher, *extras], weights)


def load_extra_teacher(name: str, first: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    differ = vocabulary_difference(load_tokenizer(name), tokenizer)
    if differ:
        raise ConfigError(f"extra teacher '{name}': its tokenizer differs from the first teacher's ({differ})")
    teacher = load_classifier(name)
    labels, first_labels = label_list(teacher), label_list(first)
    if labels != first_labels:
        raise ConfigError(
            f"extra teacher '{name}' predicts the labels {labels}, the first teacher {first_labels}: the teachers "
            "must share one label space, in the same order"
        )
    return teacher


def label_list(model: PreTrainedModel) -> list[str]:
    return [model.config.id2label[i] for i in range(model.config.num_labels)]
