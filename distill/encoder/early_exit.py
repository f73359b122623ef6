"""Early exit (DeeBERT, BERxiT, "Be Your Own Teacher"): small classifier heads on intermediate layers, trained by
the `early_exit` loss from the model's own final logits and saved in the model folder (`early_exit.safetensors`
and `early_exit.json`, which `from_pretrained` ignores).

`EarlyExitClassifier` runs the encoder layer by layer; each example leaves at the first exit whose top softmax
probability reaches the threshold, the model's own classifier being the last exit. Layers are counted from 1, as
in `hidden_states` (0 is the embedding output): an example that leaves at exit k ran k encoder layers."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask

from distill.core.arch import layer_list
from distill.core.errors import ConfigError
from distill.core.models import load_classifier
from distill.losses.early_exit import ExitHeads, check_exit_layers, require_supported


def confident(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Rows whose top softmax probability reaches `threshold`. None at 1 or above: a saturated softmax can round
    to exactly 1, and a threshold of 1 must mean the full model."""
    if threshold >= 1:
        return torch.zeros(len(logits), dtype=torch.bool, device=logits.device)
    return logits.softmax(-1).max(-1).values >= threshold


@dataclass
class EarlyExitOutput:
    logits: torch.Tensor
    """(batch, labels): each example's logits, from the exit it left at."""
    exit_layers: torch.Tensor
    """(batch,): how many encoder layers each example ran through."""


class EarlyExitClassifier(nn.Module):
    """A sequence classifier plus its exit heads, for inference."""

    def __init__(self, model: PreTrainedModel, heads: ExitHeads):
        super().__init__()
        config = model.config
        require_supported(config)
        check_exit_layers(heads.layers, config.num_hidden_layers)
        if (heads.hidden_size, heads.num_labels) != (config.hidden_size, config.num_labels):
            raise ConfigError(
                f"exit heads read width {heads.hidden_size} and predict {heads.num_labels} labels; the model has "
                f"width {config.hidden_size} and {config.num_labels} labels"
            )
        self.model, self.heads = model.eval(), heads.eval()
        self.layers = layer_list(model, "early exit")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> EarlyExitClassifier:
        return cls(load_classifier(str(folder)), ExitHeads.from_folder(folder))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @torch.no_grad()
    def exit_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """Every exit's logits (the heads', then the model's own) from one full forward pass."""
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                             output_hidden_states=True)
        return self.heads(outputs.hidden_states, attention_mask) + [outputs.logits]

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: Optional[torch.Tensor] = None, threshold: float = 1.0) -> EarlyExitOutput:
        """Run layer by layer; after each exit, only the examples not yet confident enough go on."""
        hidden = self.model.base_model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        logits = hidden.new_zeros(len(hidden), self.heads.num_labels)
        exits = torch.full((len(hidden),), self.num_layers, device=hidden.device)
        running = torch.arange(len(hidden), device=hidden.device)
        for depth, layer in enumerate(self.layers, start=1):
            mask = create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden,
                                             attention_mask=attention_mask)
            hidden = layer(hidden, mask)
            if depth == self.num_layers:
                logits[running] = self.final_logits(hidden)
            elif depth in self.heads.layers:
                layer_logits = self.heads.logits_at(depth, hidden, attention_mask)
                done = confident(layer_logits, threshold)
                logits[running[done]] = layer_logits[done]
                exits[running[done]] = depth
                running, hidden, attention_mask = running[~done], hidden[~done], attention_mask[~done]
                if not len(running):
                    break
        return EarlyExitOutput(logits, exits)

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's own head on the last layer's output (BERT: pooler, dropout, classifier; RoBERTa: its
        classification head, which reads the first token itself)."""
        pooler = getattr(self.model.base_model, "pooler", None)
        if pooler is None:
            return self.model.classifier(hidden)
        return self.model.classifier(self.model.dropout(pooler(hidden)))


@torch.no_grad()
def evaluate_thresholds(classifier: EarlyExitClassifier, loader: DataLoader, thresholds: list[float]) -> list[dict]:
    """Per threshold: accuracy, mean encoder layers used, the theoretical compute fraction (layers used over all
    layers; the embeddings and the small heads are left out) and how many examples left at each exit."""
    return [evaluate_threshold(classifier, loader, threshold) for threshold in thresholds]


def evaluate_threshold(classifier: EarlyExitClassifier, loader: DataLoader, threshold: float) -> dict:
    device = next(classifier.parameters()).device
    correct, used = 0, []
    for batch in loader:
        inputs = {name: value.to(device) for name, value in batch.items() if name != "labels"}
        output = classifier(**inputs, threshold=threshold)
        correct += (output.logits.argmax(-1).cpu() == batch["labels"]).sum().item()
        used.append(output.exit_layers.cpu())
    layers = torch.cat(used)
    average = layers.float().mean().item()
    counts = dict(zip(*(t.tolist() for t in layers.unique(return_counts=True))))
    return {"threshold": threshold, "accuracy": correct / len(layers), "average_layers": average,
            "compute_fraction": average / classifier.num_layers, "exits": counts}
