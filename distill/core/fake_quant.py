"""How quantization-aware distillation (QAD) enters a training job: a serving format's fake quantization of the
student, registered under the format's name by the module that knows the format. Those modules live above the core
(in `quant`), so they are named here as text, as the job table names jobs, and imported on first use."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.core.errors import ConfigError, did_you_mean
from distill.core.io import save_model
from distill.core.registry import Registry


@dataclass
class FakeQuantized:
    """A student whose weights are projected onto the format's grid in every forward pass (straight-through)."""
    summary: dict
    """What was projected (e.g. the number of tensors of each type), for metrics.json."""
    remove: Callable[[], None]
    """Takes the projection off: the student's weights are the latent ones again."""

    def save(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path,
             files: Optional[dict[str, str | bytes]] = None) -> None:
        """Saves the latent weights (the projection off): the format's own export puts them on the grid again."""
        self.remove()
        save_model(model, tokenizer, folder, files)


@dataclass(frozen=True)
class FakeQuantFormat:
    check: Callable[[Any, str], None]
    """(the `qad` section, the starting model's name) -> a ConfigError for what cannot be trained; config only."""
    apply: Callable[[PreTrainedModel, PreTrainedTokenizerBase, Any, Path], FakeQuantized]
    """(the student, its tokenizer, the `qad` section, a folder for scratch files) -> the fake-quantized student."""


FAKE_QUANT: Registry[FakeQuantFormat] = Registry("fake-quant format")
FORMAT_MODULES = {"gguf": "quant.qad.gguf"}
"""The module that registers each format."""


def fake_quant_format(name: str) -> FakeQuantFormat:
    if name not in FORMAT_MODULES:
        raise ConfigError(f"qad.format: no fake quantization for '{name}'; {did_you_mean(name, sorted(FORMAT_MODULES))}")
    importlib.import_module(FORMAT_MODULES[name])
    return FAKE_QUANT[name]
