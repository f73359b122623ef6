"""Typed configuration of a quantization run: which model, which variants, the bitsandbytes settings, which
modules stay in full precision, and how accuracy, memory and latency are measured. Loaded like every other config:
YAML plus `key.sub=value` overrides."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from distill.config import DataConfig


@dataclass
class BnbConfig:
    """bitsandbytes settings, passed to transformers' `BitsAndBytesConfig`."""
    int8_threshold: float = 6.0
    """LLM.int8 outlier threshold: input features with a magnitude above it are multiplied in 16-bit
    (`llm_int8_threshold`); 0 disables the decomposition."""
    double_quant: bool = True
    """4-bit: quantize the per-block scales too (`bnb_4bit_use_double_quant`), saving about 0.4 bits per weight."""
    compute_dtype: str = "float32"
    """4-bit: dtype of the matrix multiplication, `float32`, `bfloat16` or `float16` (`bnb_4bit_compute_dtype`)."""


@dataclass
class LatencyConfig:
    """Latency of one forward pass on a fixed batch of the evaluation texts, padded to `max_length`."""
    batch_size: int = 32
    max_length: int = 64
    warmup: int = 3
    repeats: int = 10
    """Timed forward passes per round; a round's number is their median."""
    rounds: int = 3
    """Rounds alternating between the variants; the reported number is the median of the rounds."""
    threads: Optional[int] = None
    """torch CPU threads while measuring; None leaves torch's choice."""


@dataclass
class QuantConfig:
    """Quantize a saved model into each variant, save every variant, reload it, and compare them on one table."""
    model: str = "runs/student/model"
    output_dir: str = "runs/student-quant"
    data: DataConfig = field(default_factory=DataConfig)
    split: str = "test"
    """The split whose accuracy the report shows: `validation` or `test`."""
    eval_batch_size: int = 128
    variants: list[str] = field(default_factory=lambda: ["fp32", "bf16", "dynamic_int8", "bnb_int8", "bnb_nf4"])
    """Any of `quant.variants.VARIANTS`: fp32, bf16, fp16, dynamic_int8, bnb_int8, bnb_nf4, bnb_fp4."""
    skip_modules: Optional[list[str]] = None
    """Modules kept in full precision by the bitsandbytes and dynamic-int8 variants, matched as transformers
    matches `llm_int8_skip_modules` (a path prefix, a regex, or a name suffix). None: the task heads, pooler and
    LM head of the architecture (`distill.arch.Arch.task_heads`); [] quantizes every Linear."""
    bnb: BnbConfig = field(default_factory=BnbConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
