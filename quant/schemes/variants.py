"""The variants one saved model can be turned into: each is built from the saved full-precision folder, saved into
a folder of its own, and loaded back by `load_variant`, which reads from the folder's config which kind it is."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.core.errors import ConfigError
from distill.core.io import save_model
from distill.core.registry import Registry
from quant.config import BnbConfig, WeightSchemeConfig
from quant.schemes.bnb import BNB_VARIANTS, check_bnb_config, load_bnb, quantize_bnb, require_bitsandbytes
from quant.schemes.compressed import COMPRESSED_VARIANTS, quantize_compressed, require_llmcompressor
from quant.schemes.dynamic import (
    HALF_DTYPES,
    METHOD,
    load_dynamic_int8,
    load_half,
    mark_dynamic_int8,
    quantize_dynamic_int8,
)
from quant.schemes.loading import load_pretrained

VARIANTS: Registry[str] = Registry("variant")
"""Each variant's name -> how it is made: `full` precision, a `half` dtype, PyTorch `dynamic` int8, `bitsandbytes`,
llm-compressor's `compressed_tensors`."""
for name, family in [("fp32", "full"), *((dtype, "half") for dtype in HALF_DTYPES), (METHOD, "dynamic"),
                     *((variant, "bitsandbytes") for variant in BNB_VARIANTS),
                     *((variant, "compressed_tensors") for variant in COMPRESSED_VARIANTS)]:
    VARIANTS.add(name, family)


def check_variants(variants: list[str], bnb: BnbConfig) -> None:
    """Config-only checks: known, distinct names; bitsandbytes settings and the packages when they are asked for."""
    if not variants:
        raise ConfigError(f"variants lists nothing; choose from {', '.join(VARIANTS)}")
    for name in variants:
        VARIANTS.require(name, "variants: ")
    if len(set(variants)) < len(variants):
        raise ConfigError(f"variants lists a name twice: {variants}")
    if any(name in BNB_VARIANTS for name in variants):
        check_bnb_config(bnb)
        require_bitsandbytes()
    if any(name in COMPRESSED_VARIANTS for name in variants):
        require_llmcompressor()


def build_variant(source: str, variant: str, tokenizer: PreTrainedTokenizerBase, folder: str | Path,
                  bnb: BnbConfig | None = None, skip_modules: list[str] | None = None,
                  scheme: WeightSchemeConfig | None = None, calibration: list[list[int]] = ()) -> PreTrainedModel:
    """Turn the saved model `source` into `variant`, save it (atomically) into `folder`, and return the in-memory
    model in eval mode. `skip_modules` (None: the architecture's heads) applies to every quantized variant;
    `scheme` and `calibration` (token ids) to the compressed-tensors ones."""
    if variant == METHOD:  # saved as the full-precision model with its note, before the Linears are quantized
        model = marked_for_dynamic_int8(source, skip_modules)
        save_model(model, tokenizer, Path(folder))
        return quantize_dynamic_int8(model)
    model = make_variant(source, variant, bnb, skip_modules, scheme=scheme, calibration=calibration)
    save_model(model, tokenizer, Path(folder))
    return model


def make_variant(source: str, variant: str, bnb: BnbConfig | None = None, skip_modules: list[str] | None = None,
                 device: str = "cpu", scheme: WeightSchemeConfig | None = None,
                 calibration: list[list[int]] = ()) -> PreTrainedModel:
    """The saved model `source` as `variant`, in memory only, in eval mode on `device` (dynamic int8: the CPU only)."""
    check_variants([variant], bnb or BnbConfig())
    if variant == METHOD:
        if torch.device(device).type != "cpu":
            raise ConfigError(f"{METHOD} runs on the CPU only (PyTorch's fbgemm/oneDNN kernels); asked for {device}")
        return quantize_dynamic_int8(marked_for_dynamic_int8(source, skip_modules))
    if variant in BNB_VARIANTS:
        return quantize_bnb(source, variant, bnb or BnbConfig(), skip_modules, device)
    if variant in COMPRESSED_VARIANTS:
        return quantize_compressed(source, variant, scheme or WeightSchemeConfig(), list(calibration),
                                   skip_modules).to(device)
    model = load_half(source, variant) if variant in HALF_DTYPES else load_pretrained(source)
    return model.to(device)


def marked_for_dynamic_int8(source: str, skip_modules: list[str] | None) -> PreTrainedModel:
    model = load_pretrained(source)
    mark_dynamic_int8(model, skip_modules)
    return model


def load_variant(folder: str | Path) -> PreTrainedModel:
    """Reload a folder that `build_variant` wrote, as the variant it holds."""
    config = json.loads(Path(folder, "config.json").read_text())
    if config.get("quantization_config", {}).get("quant_method") == "compressed-tensors":
        return load_pretrained(str(folder))  # decompressed by transformers where no kernel runs it
    if "quantization_config" in config:
        return load_bnb(str(folder))
    if config.get("quantization", {}).get("method") == METHOD:
        return load_dynamic_int8(str(folder))
    return load_pretrained(str(folder))

