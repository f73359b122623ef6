"""A quantization run: the saved classifier `cfg.model` becomes each configured variant, saved under
`output_dir/<variant>/`, reloaded from there (outputs compared with the in-memory model's) and measured (see
`quant.measure.classifier_metrics`). `output_dir` gets `config.yaml` (the resolved config), `metrics.json` (every
number, per variant) and `report.md` (the table). Everything runs on the CPU, in one process: bitsandbytes' CPU backend
and PyTorch's int8 kernels."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from distill.core.data import collator, label_names, load_splits, tokenize
from distill.core.errors import ConfigError
from distill.core.evaluate import alternating_latencies, latency_batch
from distill.core.io import write_json_atomic
from distill.core.jobs import Job, register_job
from distill.core.models import load_tokenizer
from distill.core.run import check_class_count, new_accelerator, open_run
from quant.config import QuantConfig, ReportConfig
from quant.measure.classifier_metrics import markdown_table, measure_variant
from quant.schemes.loading import auto_class, empty_model, load_config, skip_patterns
from quant.schemes.variants import build_variant, check_variants, load_variant

SPLITS = ("validation", "test")


@dataclass
class QuantRun:
    models: dict[str, PreTrainedModel]
    """Each variant as reloaded from its folder."""
    metrics: dict
    run_dir: Path


@dataclass
class Evaluation:
    """What every variant is measured on: the split's loader and a fixed latency batch."""
    tokenizer: PreTrainedTokenizerBase
    loader: DataLoader
    batch: dict[str, torch.Tensor]
    accelerator: Accelerator


def quantize(cfg: QuantConfig) -> QuantRun:
    check_quant_config(cfg)
    config = load_config(cfg.model)
    check_classifier(cfg.model, config)
    run_dir = open_run(cfg)
    quiet_int8_cast_warning()
    if cfg.latency.threads:
        torch.set_num_threads(cfg.latency.threads)
    evaluation = evaluation_for(cfg, config.num_labels)
    skip = skip_patterns(empty_model(cfg.model), cfg.skip_modules)
    models, rows = {}, {}
    for variant in cfg.variants:
        models[variant], rows[variant] = build_and_measure(cfg, variant, run_dir / variant, evaluation, skip)
    latency = cfg.latency
    for variant, ms in alternating_latencies(models, dict.fromkeys(models, evaluation.batch), latency.rounds,
                                             latency.warmup, latency.repeats).items():
        rows[variant]["latency_ms"] = ms
    metrics = {"model": cfg.model, "split": cfg.split, "examples": len(evaluation.loader.dataset),
               "skip_modules": skip, "latency_batch": [cfg.latency.batch_size, cfg.latency.max_length],
               "threads": torch.get_num_threads(), "torch": torch.__version__, "variants": rows}
    write_json_atomic(metrics, run_dir / "metrics.json")
    table = markdown_table(list(rows.values()), (cfg.latency.batch_size, cfg.latency.max_length))
    (run_dir / "report.md").write_text(table + "\n")
    return QuantRun(models, metrics, run_dir)


def evaluation_for(cfg: QuantConfig | ReportConfig, num_labels: int, tokenizer_source: Optional[str] = None
                   ) -> Evaluation:
    """The split tokenized by `cfg.model`'s tokenizer (or by `tokenizer_source`'s), and the latency batch."""
    tokenizer = load_tokenizer(tokenizer_source or cfg.model)
    raw = load_splits(cfg.data)
    check_class_count(num_labels, label_names(raw), cfg.model)
    split = tokenize(raw, tokenizer, cfg.data.max_length)[cfg.split]
    texts = list(raw[cfg.split]["text"][:cfg.latency.batch_size])
    return Evaluation(tokenizer, DataLoader(split, cfg.eval_batch_size, collate_fn=collator(tokenizer)),
                      latency_batch(tokenizer, texts, cfg.latency.batch_size, cfg.latency.max_length),
                      new_accelerator(cpu=True))


def build_and_measure(cfg: QuantConfig, variant: str, folder: Path, evaluation: Evaluation, skip: list[str]
                      ) -> tuple[PreTrainedModel, dict]:
    """Build and save the variant, reload it, and measure the reloaded model (all but latency)."""
    built = build_variant(cfg.model, variant, evaluation.tokenizer, folder, cfg.bnb, cfg.skip_modules)
    expected = logits(built, evaluation.batch)
    del built
    model = load_variant(folder)
    row = {"variant": variant, "reload_equal": torch.equal(logits(model, evaluation.batch), expected),
           **measure_variant(model, folder, evaluation.loader, evaluation.accelerator, evaluation.batch, skip)}
    return model, row


def check_quant_config(cfg: QuantConfig) -> None:
    """Config-only checks, before any model is loaded."""
    check_variants(cfg.variants, cfg.bnb)
    check_measurement(cfg)


def check_measurement(cfg: QuantConfig | ReportConfig) -> None:
    """The split and the evaluation and latency settings, shared by quantization runs and compression reports."""
    if cfg.split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}; got '{cfg.split}'")
    lat = cfg.latency
    for name, value in (("eval_batch_size", cfg.eval_batch_size), ("latency.batch_size", lat.batch_size),
                        ("latency.max_length", lat.max_length), ("latency.repeats", lat.repeats),
                        ("latency.rounds", lat.rounds)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1; got {value}")
    if lat.warmup < 0:
        raise ConfigError(f"latency.warmup must be 0 or more; got {lat.warmup}")


def check_classifier(model: str, config: PretrainedConfig) -> None:
    if auto_class(config) is not AutoModelForSequenceClassification:
        raise ConfigError(f"a quantization run measures classification accuracy; {model} is not a sequence "
                          "classifier (quant.schemes.variants.build_variant quantizes causal LMs too)")


@torch.inference_mode()
def logits(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.eval()(**batch).logits


def quiet_int8_cast_warning() -> None:
    """bitsandbytes' int8 matmul logs on every call that it casts fp32 inputs to fp16: thousands of lines a run."""
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


QUANTIZE = register_job(Job("quantize", QuantConfig, check_quant_config, quantize,
                            lambda cfg, result: (result.run_dir / "report.md").read_text()))
