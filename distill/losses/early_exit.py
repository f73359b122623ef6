"""Self-distillation into early exits ("Be Your Own Teacher"): heads on intermediate layers learn the model's own
final prediction. No teacher is needed, so the loss also works when fine-tuning. The heads are saved in the model
folder (`early_exit.safetensors`, `early_exit.json`, which `from_pretrained` ignores); `distill.encoder.early_exit`
runs a model with them."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from distill.core.config import LossConfig
from distill.core.errors import ConfigError
from distill.core.loss_interface import DistillLoss, LossInputs, LossSetup, register
from distill.losses.pooling import check_pooling, pool
from distill.losses.response import hard_label_ce, soft_kl

WEIGHTS_FILE, CONFIG_FILE = "early_exit.safetensors", "early_exit.json"
SUPPORTED = ("bert", "roberta", "xlm-roberta")
"""Encoders whose forward pass (embeddings, layers, pooler if any, classifier) `EarlyExitClassifier` replays."""


def require_supported(config: PretrainedConfig) -> None:
    if config.model_type not in SUPPORTED:
        raise ConfigError(
            f"early exit supports {', '.join(SUPPORTED)} classifiers; '{config.model_type}' is not supported"
        )


def check_exit_layers(layers: list[int], num_layers: int) -> None:
    if not layers:
        raise ConfigError(f"early exit: a {num_layers}-layer model has no layer before the last to exit at")
    bad = [k for k in layers if not 1 <= k < num_layers]
    if bad:
        raise ConfigError(
            f"exit_layers {bad} out of range: exits go after layers 1..{num_layers - 1} of {num_layers} "
            "(the last layer's exit is the model's own classifier)"
        )


def exit_head(hidden_size: int, num_labels: int) -> nn.Sequential:
    """Dense + tanh + linear: BERT's pooler and classifier, for one intermediate layer."""
    return nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, num_labels))


def final_head_linears(model: PreTrainedModel) -> tuple[nn.Linear, nn.Linear]:
    """The dense and output Linears of the model's own head, the same shape as an exit head (BERT: pooler dense +
    classifier; RoBERTa / XLM-R: the classification head's dense + out_proj)."""
    pooler = getattr(model.base_model, "pooler", None)
    if pooler is not None:
        return pooler.dense, model.classifier
    return model.classifier.dense, model.classifier.out_proj


class ExitHeads(nn.Module):
    """One head per exit layer, each reading that layer's pooled hidden state and predicting the labels."""

    def __init__(self, layers: list[int], pooling: str, hidden_size: int, num_labels: int):
        super().__init__()
        self.layers, self.pooling, self.hidden_size, self.num_labels = list(layers), pooling, hidden_size, num_labels
        self.heads = nn.ModuleList(exit_head(hidden_size, num_labels) for _ in layers)

    @torch.no_grad()
    def start_from(self, dense: nn.Linear, out: nn.Linear) -> None:
        """Every head starts as a copy of the model's own head: intermediate layers of a trained (or copied) encoder
        live near the last layer's space, so an exit predicts well from the first step, where a random head would
        need many steps at a distillation learning rate."""
        for head in self.heads:
            head[0].load_state_dict(dense.state_dict())
            head[2].load_state_dict(out.state_dict())

    def logits_at(self, layer: int, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.heads[self.layers.index(layer)](pool(hidden, mask, self.pooling))

    def forward(self, hidden_states: Sequence[torch.Tensor], mask: torch.Tensor) -> list[torch.Tensor]:
        """Each exit's logits, given all hidden states (embedding output first)."""
        return [self.logits_at(layer, hidden_states[layer], mask) for layer in self.layers]

    def description(self) -> dict:
        return {"layers": self.layers, "pooling": self.pooling, "hidden_size": self.hidden_size,
                "num_labels": self.num_labels}

    def to_files(self) -> dict[str, str | bytes]:
        """The two files that hold the heads in a model folder."""
        weights = save({name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()})
        return {WEIGHTS_FILE: weights, CONFIG_FILE: json.dumps(self.description(), indent=2)}

    @classmethod
    def from_folder(cls, folder: str | Path) -> ExitHeads:
        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file():
            raise ConfigError(f"{folder} has no early-exit heads ({CONFIG_FILE}); train it with the early_exit loss")
        heads = cls(**json.loads((folder / CONFIG_FILE).read_text()))
        heads.load_state_dict(load_file(folder / WEIGHTS_FILE))
        return heads



def exit_loss(exit_logits: torch.Tensor, final_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
              label_mix: float) -> torch.Tensor:
    """(1 - mix) * KL(final || exit) * T^2 + mix * CE(labels). The final logits are a target only: detached, so
    the exits never pull the final prediction towards their own."""
    soft = soft_kl(exit_logits, final_logits.detach(), temperature)
    return (1 - label_mix) * soft + label_mix * hard_label_ce(exit_logits, labels)


@register("early_exit")
class EarlyExitLoss(DistillLoss):
    """Owns the exit heads (saved with the model); the loss is the mean over exits of `exit_loss`."""
    needs_teacher = False
    needs_hidden_states = True
    options = ("temperature", "pooling", "exit_layers", "exit_label_mix", "learning_rate")

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
