"""PyTorch dynamic int8 quantization of Linear layers (the classic CPU path), and half precision.

Dynamic int8: each selected Linear's weight becomes int8 with one scale per output row (symmetric, from the row's
min/max); activations are quantized on the fly per batch, and the products run in fbgemm/oneDNN int8 kernels. The
task heads, pooler and LM head stay in full precision, as in the bitsandbytes variants (`loading.skip_patterns`).
torch marks `torch.ao.quantization` deprecated in favour of torchao, which this project does not install; its
deprecation warnings are silenced here.

Saving. A dynamically quantized Linear keeps its weight as a packed quantized tensor that neither `save_pretrained`
nor safetensors stores. Instead of a private file format, a dynamic-int8 checkpoint is the full-precision model
(`save_pretrained`, safetensors, the remote code of compressed checkpoints included) plus a note in its config,
`quantization = {"method": "dynamic_int8", "skip_modules": [...]}`; `load_dynamic_int8` loads it and quantizes it
again. Quantizing weights is deterministic, so the reloaded model's outputs equal the in-memory ones. The costs,
stated in the report: the folder is as large as the fp32 model's, and a plain `from_pretrained` of it returns the
unquantized model."""
from __future__ import annotations

import warnings

import torch
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
from transformers import PreTrainedModel

from distill.core.errors import ConfigError
from quant.schemes.loading import load_pretrained, skip_patterns, target_linears

METHOD = "dynamic_int8"
HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def mark_dynamic_int8(model: PreTrainedModel, skip_modules: list[str] | None = None) -> None:
    """Record in the config of the full-precision `model` that it is to be loaded dynamically quantized."""
    model.config.quantization = {"method": METHOD, "skip_modules": skip_patterns(model, skip_modules)}


def quantize_dynamic_int8(model: PreTrainedModel) -> PreTrainedModel:
    """Quantize, in place, the Linears that the config's `quantization` note (`mark_dynamic_int8`) selects."""
    note = getattr(model.config, "quantization", None)
    if not note or note.get("method") != METHOD:
        raise ConfigError(f"the model's config has no {METHOD} note; call mark_dynamic_int8 first")
    names = [name for name, module in target_linears(model, note["skip_modules"]).items()
             if type(module) is torch.nn.Linear]
    if not names:
        raise ConfigError(f"skip_modules {note['skip_modules']} leave no Linear to quantize")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")
        warnings.filterwarnings("ignore", message="torch.quantize_per_tensor, torch.quantize_per_channel")
        return quantize_dynamic(model, dict.fromkeys(names, per_channel_dynamic_qconfig), inplace=True).eval()


def load_dynamic_int8(path: str) -> PreTrainedModel:
    """Load a checkpoint saved after `mark_dynamic_int8` and quantize it again."""
    return quantize_dynamic_int8(load_pretrained(path))


def load_half(source: str, variant: str) -> PreTrainedModel:
    """Load `source` with its floating-point weights in bf16 or fp16 (int8 buffers of compressed embeddings stay
    int8). Loading in the dtype, rather than casting a loaded model, keeps buffers that transformers computes in
    fp32 (rotary frequencies) as a reload of the saved model has them."""
    if variant not in HALF_DTYPES:
        raise ConfigError(f"'{variant}' is not a half-precision variant; those are {', '.join(HALF_DTYPES)}")
    return load_pretrained(source, dtype=HALF_DTYPES[variant])
