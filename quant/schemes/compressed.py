"""Weight quantization through llm-compressor, saved in the compressed-tensors format that vLLM and SGLang load
natively: int4 weights in groups along each row with one scale per group, activations and every other tensor in
16 bits (W4A16; `scheme.dtype`, bf16 by default, as vLLM runs it and at half the disk of float32), rounded to
nearest (`rtn_w4a16`, no calibration: the baseline) or by GPTQ (`gptq_w4a16`: each column's rounding error is
compensated in the columns not yet rounded, through the Hessian of the layer's inputs on calibration text); and
`w8a8_int8`, SmoothQuant's migration of activation outliers into the weights, then GPTQ int8 weights (one scale per
row) with int8 activations quantized per token at run time. AWQ is left out: llm-compressor 0.14's AWQ pins its
cached activations in page-locked memory, which needs a GPU ("Cannot access accelerator device").

After `oneshot`, the model's `save_pretrained` saves compressed (llm-compressor's wrapper, `save_compressed=True` by
default): packed weights and the `quantization_config` vLLM reads;
a plain `from_pretrained` of the folder, with the compressed-tensors package installed, decompresses it on the CPU
into the same fake-quantized model, so the reloaded logits equal the in-memory ones.

llm-compressor 0.14 pins transformers 5.17; it is installed without its dependencies (`scripts/setup.sh`): measured
here, its GPTQ and SmoothQuant run on the CPU with the project's transformers."""
from __future__ import annotations

import torch
from datasets import Dataset
from transformers import PreTrainedModel

from distill.core.errors import ConfigError, require_package
from distill.core.models import load_tokenizer
from quant.config import WeightSchemeConfig
from quant.schemes.dynamic import HALF_DTYPES
from quant.schemes.loading import empty_model, is_linear, load_pretrained, skip_patterns, target_linears

INSTALL = ("bash scripts/setup.sh (pip install --no-deps llmcompressor==0.14.0.1 compressed-tensors==0.20.0 "
           "loguru==0.8.0)")
CALIBRATED = ("gptq_w4a16", "w8a8_int8")
"""The variants that read calibration text."""
COMPRESSED_VARIANTS = ("rtn_w4a16", *CALIBRATED)
W4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group"}


def require_llmcompressor() -> None:
    require_package("llmcompressor", "the compressed-tensors variants need", INSTALL)


DTYPES = {**HALF_DTYPES, "fp32": torch.float32}


def check_scheme(cfg: WeightSchemeConfig) -> None:
    if cfg.group_size < 1:
        raise ConfigError(f"scheme.group_size must be at least 1; got {cfg.group_size}")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"scheme.dtype must be one of {', '.join(DTYPES)}; got {cfg.dtype!r}")


def quantized_linears(source: str, skip_modules: list[str] | None) -> dict[str, int]:
    """Each Linear a variant quantizes (its path) -> its input width, read from the model's config alone."""
    model = empty_model(source)
    return {name: module.in_features for name, module in target_linears(model, skip_patterns(model, skip_modules))
            .items()}


def check_group_size(linears: dict[str, int], group_size: int) -> None:
    """Every quantized row must hold whole groups: vLLM's kernels and compressed-tensors refuse a partial one."""
    for name, width in linears.items():
        if width % group_size:
            fits = [size for size in (128, 64, 32, 16) if all(w % size == 0 for w in linears.values())]
            raise ConfigError(f"scheme.group_size {group_size} does not divide the {width} input features of {name}"
                              f"{f'; {fits[0]} does' if fits else ''}")


def check_compressed(source: str, variants: list[str], scheme: WeightSchemeConfig, calibration: list[list[int]],
                     skip_modules: list[str] | None = None) -> dict[str, int]:
    """Before any work: the group size fits every quantized Linear of `source` (4-bit variants), and calibrated
    variants get at least as many calibration tokens as the widest quantized Linear has input features, so that
    every layer's Hessian (GPTQ) can have full rank. Returns the quantized Linears' input widths by path."""
    check_scheme(scheme)
    linears = quantized_linears(source, skip_modules)
    if any(name.endswith("w4a16") for name in variants):
        check_group_size(linears, scheme.group_size)
    needed, tokens = max(linears.values()), sum(map(len, calibration))
    calibrated = [name for name in variants if name in CALIBRATED]
    if calibrated and tokens < needed:
        raise ConfigError(f"{calibrated[0]} needs at least {needed} calibration tokens (the widest quantized input); "
                          f"calibration has {tokens} in {len(calibration)} texts: raise calibration.examples or "
                          "data.max_length")
    return linears


def recipe(variant: str, group_size: int, ignore: list[str]) -> list:
    """llm-compressor's modifiers for `variant` (imported here: the package is optional and slow to import)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import SmoothQuantModifier
    if variant == "w8a8_int8":
        return [SmoothQuantModifier(smoothing_strength=0.8),
                GPTQModifier(scheme="W8A8", targets=["Linear"], ignore=ignore)]
    w4 = {"group_0": QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**W4, group_size=group_size))}
    return [(GPTQModifier if variant == "gptq_w4a16" else QuantizationModifier)(config_groups=w4, ignore=ignore)]


def quantize_compressed(source: str, variant: str, scheme: WeightSchemeConfig, calibration: list[list[int]],
                        skip_modules: list[str] | None = None) -> PreTrainedModel:
    """The saved model `source` quantized as `variant` in memory (fake-quantized: it computes what the saved folder
    will), in `scheme.dtype`, on the CPU, in eval mode. `calibration` (token ids, each text run alone) feeds the
    calibrated variants."""
    require_llmcompressor()
    from llmcompressor import oneshot
    linears = check_compressed(source, [variant], scheme, calibration, skip_modules)
    model = load_pretrained(source, dtype=DTYPES[scheme.dtype])  # loaded so, as a reload of the folder is
    ignore = [name for name, module in model.named_modules() if is_linear(module) and name not in linears]
    data = {} if variant not in CALIBRATED else {
        "dataset": Dataset.from_dict({"input_ids": calibration, "attention_mask": [[1] * len(i) for i in calibration]}),
        "num_calibration_samples": len(calibration), "shuffle_calibration_samples": False,
        "max_seq_length": max(map(len, calibration)), "processor": load_tokenizer(source)}
    oneshot(model=model, recipe=recipe(variant, scheme.group_size, ignore), **data)
    return model.eval()
