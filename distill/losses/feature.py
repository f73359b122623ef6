"""Feature-based distillation (FitNets, Romero et al. 2015): one teacher layer's hidden states are a hint for one
guided student layer, which a learned regressor lifts to the teacher's width. Run it as its own stage before a
response-based one (see recipes/distill_fitnet.yaml)."""
import torch
from torch import nn

from distill.core.config import LossConfig
from distill.core.loss_interface import DistillLoss, LossInputs, LossSetup, register
from distill.losses.hidden import chosen_layers, hidden_mse


def hint_regressor(width_student: int, width_teacher: int) -> nn.Linear:
    """Linear from the student's width to the teacher's; the identity when they are equal, so it starts neutral."""
    regressor = nn.Linear(width_student, width_teacher)
    if width_student == width_teacher:
        with torch.no_grad():
            regressor.weight.copy_(torch.eye(width_student))
            regressor.bias.zero_()
    return regressor


@register("hint")
class Hint(DistillLoss):
    """Masked MSE between the regressed guided student layer and the teacher's hint layer."""
    needs_hidden_states = True
    options = ("student_layer", "teacher_layer", "learning_rate")

    def __init__(self, spec: LossConfig, setup: LossSetup):
        super().__init__(spec, setup)
        middle = (setup.student_config.num_hidden_layers + 1) // 2
        self.student_layer, self.teacher_layer = chosen_layers(spec, setup, default_student_layer=middle)
        self.regressor = hint_regressor(setup.student_config.hidden_size, setup.teacher_config.hidden_size)

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        guided = self.regressor(inputs.student.hidden_states[self.student_layer])
        hint = inputs.teacher.hidden_states[self.teacher_layer]
        return hidden_mse(guided, hint, inputs.attention_mask)
