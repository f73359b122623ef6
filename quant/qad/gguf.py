"""Quantization-aware distillation on llama.cpp's grid (`qad.format: gguf`). A `*_M` or `*_S` type mixes tensor
types (Q4_K_M keeps some tensors in Q6_K; a row width that its blocks do not divide falls back to another type), so
each weight trains in exactly the type llama.cpp gives it: the starting student is exported once as export_gguf
would (converter to F16, then llama.cpp's quantizer, no importance matrix), the file's tensor types are read back,
and each Linear weight and the token embedding (the output head too, tied or not) is projected with its own type by
`quant.schemes.gguf_grid`. The projection uses no importance matrix, so the export of the trained model must use
none either (export_gguf without `calibration`)."""
from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.core.errors import ConfigError
from distill.core.fake_quant import FAKE_QUANT, FakeQuantFormat, FakeQuantized
from distill.core.io import save_model
from distill.core.models import resolve_model
from distill.lm.config import QADConfig
from quant.config import GgufConfig
from quant.export.gguf import CONVERTER_TYPES, check_exportable, check_gguf_types, write_files
from quant.export.imatrix import gguf_names
from quant.schemes.gguf_grid import GridProjection, gguf_package, projectable

NOT_TRAINABLE = {
    **dict.fromkeys(("f32", "f16", "bf16"), "is not quantized: there is no grid to train on"),
    **dict.fromkeys(("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "q2_k_s"),
                    "needs an importance matrix (llama.cpp's quantize tool refuses it without one), which QAD's "
                    "projection does not use"),
    **dict.fromkeys(("q1_0", "q2_0"), "has no dequantizer in the gguf package"),
}
"""GGUF types QAD refuses, and why."""


def check_gguf_qad(cfg: QADConfig, start: str) -> None:
    """The type, and the model the student starts from: a float model of a family the exporter takes."""
    check_gguf_types([cfg.type])
    if cfg.type in NOT_TRAINABLE:
        raise ConfigError(f"qad.type {cfg.type} {NOT_TRAINABLE[cfg.type]}; e.g. q4_k_m, q3_k_m or q2_k")
    if start.endswith(".gguf"):
        raise ConfigError(f"{start} is a GGUF file, already quantized: QAD starts from a float model (a "
                          "safetensors folder), whose own export it then trains for")
    check_exportable(start)
    config = Path(resolve_model(start), "config.json")
    if config.is_file() and {"quantization_config", "quantization"} & set(json.loads(config.read_text())):
        raise ConfigError(f"{start} is already quantized (bitsandbytes, compressed-tensors or int8 in its "
                          "config.json): QAD trains float weights; start from its full-precision model")


def file_types(student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, gguf_type: str, scratch: Path
               ) -> tuple[dict[str, int], set[str]]:
    """The type of every tensor in the student's GGUF file of `gguf_type`, by GGUF name; and the names the quantizer
    reads from float16 (those the F16 file holds as F16; the converter's own types read the float32 model)."""
    gguf = gguf_package()
    via_f16 = gguf_type not in CONVERTER_TYPES
    with tempfile.TemporaryDirectory(dir=scratch, prefix="qad-ptq-") as folder:
        save_model(student, tokenizer, Path(folder, "model"))
        cfg = GgufConfig(types=[*(["f16"] if via_f16 else []), gguf_type])
        files = write_files(cfg, Path(folder, "model"), Path(folder), torch.get_num_threads())
        types = {tensor.name: int(tensor.tensor_type) for tensor in gguf.GGUFReader(files[gguf_type]).tensors}
        rounded = {tensor.name for tensor in gguf.GGUFReader(files["f16"]).tensors
                   if tensor.tensor_type == gguf.GGMLQuantizationType.F16} if via_f16 else set()
    return types, rounded


def projected_modules(model: PreTrainedModel, types: dict[str, int]) -> dict[str, tuple[nn.Module, str]]:
    """Each Linear or Embedding whose weight the file quantizes, by module name, with its GGUF tensor name (a head
    tied to the embedding takes the embedding's). A quantized tensor of the file that no weight matches is an error:
    the export would leave the trained grid."""
    modules = {name: module for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Embedding))}
    names = gguf_names([f"{name}.weight" for name in modules], model.config.model_type,
                       model.config.num_hidden_layers)
    embedding = names[f"{find_name(modules, model.get_input_embeddings())}.weight"]
    quantized = {name for name, kind in types.items() if kind != gguf_package().GGMLQuantizationType.F32}
    found = {}
    for name, module in modules.items():
        tensor = names[f"{name}.weight"]
        if tensor not in types and module.weight is model.get_input_embeddings().weight:
            tensor = embedding
        if tensor in quantized:
            found[name] = (module, tensor)
    missing = quantized - {tensor for _, tensor in found.values()}
    if missing:
        raise RuntimeError(f"quantized tensors of the GGUF file that match no weight of the model: {sorted(missing)}")
    return found


def find_name(modules: dict[str, nn.Module], module: nn.Module) -> str:
    return next(name for name, candidate in modules.items() if candidate is module)


def fake_quantize(student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: QADConfig, scratch: Path
                  ) -> FakeQuantized:
    """Put each quantized weight of the student on the grid of its type in the GGUF file of `cfg.type`."""
    types, rounded = file_types(student, tokenizer, cfg.type, scratch)
    modules = projected_modules(student, types)
    unknown = sorted({tensor for _, tensor in modules.values() if not projectable(types[tensor])})
    if unknown:
        raise ConfigError(f"qad.type {cfg.type}: llama.cpp puts {unknown[0]} in a type with no fake quantization "
                          f"here ({gguf_package().GGMLQuantizationType(types[unknown[0]]).name})")
    projections: dict[int, GridProjection] = {}  # a weight tied to another shares its projection
    for module, tensor in modules.values():
        projections.setdefault(id(module.weight), GridProjection(types[tensor], tensor in rounded))
    for module, tensor in modules.values():
        parametrize.register_parametrization(module, "weight", projections[id(module.weight)])

    def remove() -> None:
        for module, _ in modules.values():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)

    kinds = Counter(gguf_package().GGMLQuantizationType(types[tensor]).name.lower()
                    for tensor in {tensor for _, tensor in modules.values()})
    return FakeQuantized({"format": "gguf", "type": cfg.type, "tensors": dict(sorted(kinds.items()))}, remove)


FAKE_QUANT.add("gguf", FakeQuantFormat(check_gguf_qad, fake_quantize))
