"""Hidden-state losses between mapped layers (embedding output included), TinyBERT-style: one learned linear
projection lifts the student's states to the teacher's width when the widths differ."""
import torch
import torch.nn.functional as F
from torch import nn

from distill.core.config import LossConfig
from distill.core.errors import ConfigError
from distill.core.loss_interface import DistillLoss, LossInputs, LossSetup, register


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` (batch, seq, ...) over the positions where `mask` (batch, seq) is 1."""
    mask = mask.to(values.dtype)
    while mask.dim() < values.dim():
        mask = mask.unsqueeze(-1)
    per_position = values[0, 0].numel()
    return (values * mask).sum() / (mask.sum() * per_position).clamp_min(1)


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_mean((student.float() - teacher.float()) ** 2, mask)


def hidden_cosine(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity per token, averaged over real tokens."""
    return masked_mean(1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1), mask)


class _HiddenLoss(DistillLoss):
    needs_hidden_states = True
    options = ("learning_rate",)
    distance = staticmethod(hidden_mse)

    def __init__(self, spec: LossConfig, setup: LossSetup):
        super().__init__(spec, setup)
        self.pairs = setup.layer_map.hidden
        width_s, width_t = setup.student_config.hidden_size, setup.teacher_config.hidden_size
        self.projection = nn.Linear(width_s, width_t) if width_s != width_t else nn.Identity()

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        s_states, t_states = inputs.student.hidden_states, inputs.teacher.hidden_states
        losses = [
            self.distance(self.projection(s_states[s]), t_states[t], inputs.attention_mask) for s, t in self.pairs
        ]
        return torch.stack(losses).mean()


@register("hidden_mse")
class HiddenMSE(_HiddenLoss):
    distance = staticmethod(hidden_mse)


@register("hidden_cosine")
class HiddenCosine(_HiddenLoss):
    distance = staticmethod(hidden_cosine)


def chosen_layers(spec: LossConfig, setup: LossSetup, default_student_layer: int) -> tuple[int, int]:
    """The (student, teacher) hidden-state indices a single-layer loss reads: `student_layer` (or the default) and
    `teacher_layer` (or the layer-map partner of the student's), each checked against its model's depth."""
    student = default_student_layer if spec.student_layer is None else spec.student_layer
    _check_index(spec, "student_layer", student, setup.student_config.num_hidden_layers, "student")
    teacher = setup.layer_map.partner(student) if spec.teacher_layer is None else spec.teacher_layer
    _check_index(spec, "teacher_layer", teacher, setup.teacher_config.num_hidden_layers, "teacher")
    return student, teacher


def _check_index(spec: LossConfig, key: str, index: int, layers: int, model: str) -> None:
    if not 0 <= index <= layers:
        raise ConfigError(f"loss '{spec.name}': {key} {index} is out of range; the {model} has hidden states "
                          f"0..{layers} (0 = embedding output)")
