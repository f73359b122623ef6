"""Post-training quantization with bitsandbytes, through transformers' `BitsAndBytesConfig`: LLM.int8 (int8
weights with one scale per row, input features above an outlier threshold multiplied in 16-bit) and 4-bit NF4 or
FP4 (blocks of 64 weights with one scale each, optionally double-quantized, with a chosen compute dtype).

A saved model folder is loaded with `from_pretrained(..., quantization_config=...)`. The task heads, the pooler and
the LM head stay in full precision (`distill.core.arch`, overridable). The quantized model saves with `save_pretrained`
as safetensors (int8 weights and row scales; packed 4-bit weights, block scales and the quantization state), and
`load_bnb` reloads it with outputs equal to the in-memory model's.

On CPUs with avx512_bf16, bitsandbytes repacks a 4-bit weight into a CPU-only layout at the first eval-mode no-grad
forward pass; saving after that writes a corrupt checkpoint, and training through the layer fails. Every model
this module returns has that repacking switched off on each `Linear4bit`.

bitsandbytes writes a 4-bit layer's quantization state (block scales, code book, settings) into `state_dict` but
does not read it back, and an 8-bit layer reads its row scales back only before its first training-mode forward
pass; so a strict `load_state_dict` of a quantized model fails. `accept_frozen_quantized_state` makes it read back
where the quantized weights are frozen (LoRA training, whose checkpoints hold the whole model)."""
from __future__ import annotations

from types import ModuleType

import torch
from transformers import BitsAndBytesConfig, PreTrainedModel

from distill.core.errors import ConfigError, require_package
from quant.config import BnbConfig
from quant.schemes.loading import empty_model, load_pretrained, skip_patterns, target_linears

BNB_VARIANTS = {"bnb_int8": None, "bnb_nf4": "nf4", "bnb_fp4": "fp4"}
"""Variant name -> 4-bit quantization type (None: 8-bit)."""
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BLOCK_4BIT = 64
"""bitsandbytes' default 4-bit block size (values sharing one scale)."""
INSTALL = 'pip install "bitsandbytes>=0.45"'


def require_bitsandbytes() -> ModuleType:
    return require_package("bitsandbytes", "the bitsandbytes variants need", INSTALL)


def check_bnb_config(cfg: BnbConfig) -> None:
    if cfg.compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"bnb.compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}; got '{cfg.compute_dtype}'")
    if cfg.int8_threshold < 0:
        raise ConfigError(f"bnb.int8_threshold must be 0 (no outlier decomposition) or positive; "
                          f"got {cfg.int8_threshold}")


def bnb_quantization_config(variant: str, cfg: BnbConfig, skip: list[str]) -> BitsAndBytesConfig:
    if variant not in BNB_VARIANTS:
        raise ConfigError(f"'{variant}' is not a bitsandbytes variant; those are {', '.join(BNB_VARIANTS)}")
    check_bnb_config(cfg)
    quant_type = BNB_VARIANTS[variant]
    if quant_type is None:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=cfg.int8_threshold,
                                  llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=cfg.double_quant,
                              bnb_4bit_compute_dtype=COMPUTE_DTYPES[cfg.compute_dtype], llm_int8_skip_modules=skip)


def quantize_bnb(source: str, variant: str, cfg: BnbConfig, skip_modules: list[str] | None = None,
                 device: str = "cpu") -> PreTrainedModel:
    """Load the saved model `source` quantized as `variant` (bnb_int8, bnb_nf4 or bnb_fp4) onto `device`, keeping
    the modules `skip_patterns(model, skip_modules)` names in full precision; in eval mode, ready to run and to save.
    The device is explicit because transformers puts a quantized model on the GPU whenever CUDA is available."""
    require_bitsandbytes()
    skip = skip_patterns(empty_model(source), skip_modules)
    if BNB_VARIANTS[variant] is not None and torch.device(device).type == "cpu":
        check_4bit_rows(empty_model(source), skip)
    quantization = bnb_quantization_config(variant, cfg, skip)
    model = load_pretrained(source, quantization_config=quantization, device_map={"": device})
    if not target_linears(model, skip):
        raise ConfigError(f"skip_modules {skip} leave no Linear of {source} to quantize")
    keep_out_of_cpu_repacking(model)
    return model


def check_4bit_rows(model: torch.nn.Module, skip: list[str]) -> None:
    """bitsandbytes' CPU 4-bit quantization assumes each weight row holds whole blocks of `BLOCK_4BIT` values: a row
    of another length comes back with several times the usual error (docs/llm-compression.md), so such a model is
    refused rather than silently broken."""
    for name, linear in target_linears(model, skip).items():
        if linear.in_features % BLOCK_4BIT:
            raise ConfigError(f"bitsandbytes' CPU 4-bit kernels miscompute rows whose length is not a multiple of "
                              f"{BLOCK_4BIT}: {name} has {linear.in_features} inputs; keep it out (skip_modules), "
                              f"use another variant, or prune to multiples of {BLOCK_4BIT} (width.multiple_of)")


def load_bnb(path: str) -> PreTrainedModel:
    """Reload a model that `quantize_bnb` quantized and `save_pretrained` saved (its config carries the
    quantization settings)."""
    require_bitsandbytes()
    model = load_pretrained(path)
    keep_out_of_cpu_repacking(model)
    return model


def keep_out_of_cpu_repacking(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU-only layout (see the module docstring)."""
    bnb = require_bitsandbytes()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False



def accept_frozen_quantized_state(model: torch.nn.Module) -> None:
    """Let `load_state_dict` take the quantized layers' entries that `state_dict` wrote, for a model whose quantized
    weights never change (adapters train beside them): the packed weight and its quantization state must equal the
    layer's own, and a state dict of another base fails with the names of the entries that differ."""
    bnb = require_bitsandbytes()
    for module in model.modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            module.register_load_state_dict_pre_hook(check_and_drop_quantized_state)


def check_and_drop_quantized_state(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: dict,
                                   strict: bool, missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """A load_state_dict pre-hook of one bitsandbytes Linear: compare, then remove the quantization-state entries
    (the packed weight stays, to be copied in as usual)."""
    for key, value in quantized_state(module).items():
        loaded = state_dict.get(prefix + key)
        if loaded is not None and not torch.equal(loaded.to(value.device), value):
            error_msgs.append(f"{prefix}{key} differs from the frozen quantized weights of this model")
        if key != "weight":
            state_dict.pop(prefix + key, None)


def quantized_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The entries `state_dict` writes for a bitsandbytes Linear beside its bias: the packed weight and, for 4 bits,
    the quantization state (block scales, code book, settings), for 8 bits the row scales."""
    bnb = require_bitsandbytes()
    if isinstance(module, bnb.nn.Linear4bit):
        quant_state = module.weight.quant_state.as_dict(packed=True)
        return {"weight": module.weight.data, **{f"weight.{key}": value for key, value in quant_state.items()}}
    return {"weight": module.weight.data, "SCB": int8_row_scales(module)}


def int8_row_scales(module: torch.nn.Module) -> torch.Tensor:
    """A `Linear8bitLt`'s row scales: on its weight until the first training-mode forward pass moves them to its
    state."""
    return module.weight.SCB if module.weight.SCB is not None else module.state.SCB
