"""Self-distillation into early exits ("Be Your Own Teacher"): heads on intermediate layers learn the model's own
final prediction. No teacher is needed, so the loss also works when fine-tuning."""
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, LossConfig
from ..early_exit import ExitHeads, check_exit_layers, final_head_linears, require_supported
from ..pooling import check_pooling
from .base import DistillLoss, LossInputs, LossSetup, register
from .response import soft_kl


def exit_loss(exit_logits: torch.Tensor, final_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
              label_mix: float) -> torch.Tensor:
    """(1 - mix) * KL(final || exit) * T^2 + mix * CE(labels). The final logits are a target only: detached, so
    the exits never pull the final prediction towards their own."""
    soft = soft_kl(exit_logits, final_logits.detach(), temperature)
    return (1 - label_mix) * soft + label_mix * F.cross_entropy(exit_logits.float(), labels)


@register("early_exit")
class EarlyExitLoss(DistillLoss):
    """Owns the exit heads (saved with the model); the loss is the mean over exits of `exit_loss`."""
    needs_teacher = False
    needs_hidden_states = True

    @classmethod
    def check_options(cls, spec: LossConfig, where: str = "") -> None:
        prefix = f"{where}loss '{spec.name}': "
        check_pooling(spec, where)
        if not 0 <= spec.exit_label_mix <= 1:
            raise ConfigError(f"{prefix}exit_label_mix is a share, in 0..1; got {spec.exit_label_mix}")
        layers = spec.exit_layers
        if layers is not None and len(set(layers)) != len(layers):
            raise ConfigError(f"{prefix}exit_layers {layers} repeats a layer")

    def __init__(self, spec: LossConfig, setup: LossSetup):
        super().__init__(spec, setup)
        self.check_options(spec)
        config = setup.student_config
        require_supported(config)
        count = config.num_hidden_layers
        layers = sorted(spec.exit_layers) if spec.exit_layers is not None else list(range(1, count))
        check_exit_layers(layers, count)
        self.heads = ExitHeads(layers, spec.pooling, config.hidden_size, config.num_labels)

    def attach(self, student: nn.Module) -> None:
        self.heads.start_from(*final_head_linears(student))

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        model = inputs.student
        losses = [exit_loss(logits, model.logits, inputs.labels, self.temperature, self.spec.exit_label_mix)
                  for logits in self.heads(model.hidden_states, inputs.attention_mask)]
        return torch.stack(losses).mean()

    def saved_files(self) -> dict[str, str | bytes]:
        return self.heads.to_files()
