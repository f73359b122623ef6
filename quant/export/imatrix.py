"""llama.cpp's importance matrix, computed in PyTorch on calibration text: per weight matrix, the mean over the
calibration tokens of each input column's squared activation, the statistic `llama-imatrix` collects. llama.cpp's
quantizer weighs each column's rounding error by it, which is what makes its 2- and 3-bit types usable. The matrix is
keyed by the GGUF tensor name the converter gives each weight, and handed to `llama_model_quantize` as its C array of
`{name, data, size}` entries."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from distill.core.errors import require_package

GGUF_ARCH = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3", "gemma2": "GEMMA2",
             "gemma3_text": "GEMMA3", "phi3": "PHI3"}
"""The llama.cpp architecture each family converts to (Mistral converts as Llama)."""


@torch.inference_mode()
def activation_importance(model: PreTrainedModel, texts: list[list[int]]) -> tuple[dict[str, np.ndarray], int]:
    """Per Linear weight (its transformers name), the mean squared input of each column over every token of `texts`
    (each text run alone, so no padding enters the mean); and the token count. The output head is left out, as
    `llama-imatrix` leaves it out by default."""
    sums: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
        return hook

    head = model.get_output_embeddings()
    hooks = [module.register_forward_pre_hook(record(f"{name}.weight")) for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and module is not head]
    try:
        for ids in tqdm(texts, desc="importance matrix", unit="text", leave=False):
            model(torch.tensor([ids]))
    finally:
        for hook in hooks:
            hook.remove()
    tokens = sum(len(ids) for ids in texts)
    return {name: (total / tokens).float().numpy() for name, total in sums.items()}, tokens


def gguf_named(importance: dict[str, np.ndarray], family: str, layers: int) -> dict[str, np.ndarray]:
    """The same matrix keyed by GGUF tensor names (`blk.0.attn_q.weight`)."""
    names = gguf_names(importance, family, layers)
    return {names[name]: values for name, values in importance.items()}


def gguf_names(names: Iterable[str], family: str, layers: int) -> dict[str, str]:
    """The GGUF tensor name the converter gives each transformers parameter name, through the `gguf` package's map."""
    gguf = require_package("gguf", "GGUF tensor names need", "bash scripts/setup.sh")
    tensor_names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, GGUF_ARCH[family]), layers)
    mapped = {}
    for name in names:
        mapped[name] = tensor_names.get_name(name, try_suffixes=(".weight",))
        if mapped[name] is None:
            raise RuntimeError(f"no GGUF tensor name for {name} ({family})")
    return mapped


@dataclass
class QuantizerMatrix:
    """The C array `llama_model_quantize_params.imatrix` points to (a last entry with no name ends it), with the
    arrays its entries point into, kept alive as long as it is."""
    entries: ctypes.Array
    arrays: list[np.ndarray]

    @classmethod
    def of(cls, bindings, matrix: dict[str, np.ndarray]) -> QuantizerMatrix:
        entries = (bindings.llama_model_imatrix_data * (len(matrix) + 1))()
        arrays = [np.ascontiguousarray(values, dtype=np.float32) for values in matrix.values()]
        for entry, name, values in zip(entries, matrix, arrays):
            entry.name = name.encode()
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = values.size
        return cls(entries, arrays)

    def pointer(self, bindings):
        return ctypes.cast(self.entries, ctypes.POINTER(bindings.llama_model_imatrix_data))
