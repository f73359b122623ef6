"""A tiny target and a draft that agrees with it often but not always (the target's first two of its three layers),
saved with SmolLM2's tokenizer (one that llama.cpp's GGUF converter knows), and their F32 GGUF files."""
from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from quant.export.gguf import convert
from tests.conftest import save_smollm2_tokenizer_lm


def save_draft_pair(root: Path, gguf: bool = True) -> dict[str, Path]:
    """Folders `target` and `draft` under `root`, and with `gguf` their files `target.gguf` and `draft.gguf`."""
    target = save_smollm2_tokenizer_lm(root / "target", initializer_range=0.1, num_hidden_layers=3)
    draft = AutoModelForCausalLM.from_pretrained(target)
    draft.model.layers = draft.model.layers[:2]
    draft.config.num_hidden_layers = 2
    draft.save_pretrained(root / "draft")
    AutoTokenizer.from_pretrained(target).save_pretrained(root / "draft")
    paths = {"target": target, "draft": root / "draft"}
    if gguf:
        for name in ("target", "draft"):
            convert(paths[name], root / f"{name}.gguf", "f32")
            paths[f"{name}.gguf"] = root / f"{name}.gguf"
    return paths
