"""Quantization of a causal LM, measured by what an LM is for: each variant of the saved model (bf16, dynamic int8,
bitsandbytes int8 / NF4 / FP4, as for classifiers; int4 and int8 compressed-tensors for vLLM, rounded to nearest or
calibrated by GPTQ or SmoothQuant + GPTQ on the first training texts) is built, saved into `output_dir/<variant>/`,
reloaded (logits compared with the in-memory model) and measured from the reloaded folder on the held-out texts of the
corpus, split as the distillation job splits it: validation and test perplexity, agreement of its greedy next token
with the teacher's at every real position of the test texts, the mean and 99th percentile KL divergence from the
unquantized model's next-token distribution and how often their top-1 tokens agree (llama.cpp's
`perplexity --kl-divergence` figures), weight memory, size on disk and the seconds it took to make. Everything runs on
the CPU, in one process.

`output_dir` gets `config.yaml`, `metrics.json` and `report.md`."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Iterable

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from distill.core.errors import ConfigError
from distill.core.evaluate import count_parameters, disk_size_mb
from distill.core.io import write_json_atomic
from distill.core.jobs import Job, register_job
from distill.core.models import ensure_pad_token, load_causal_lm, load_tokenizer
from distill.core.run import RunResult, open_run
from distill.lm.data import calibration_ids, evaluation_texts
from quant.config import LMQuantConfig
from quant.measure.classifier_metrics import weight_memory
from quant.measure.divergence import divergence_summary, token_divergences
from quant.quantize import quiet_int8_cast_warning
from quant.schemes.compressed import CALIBRATED, COMPRESSED_VARIANTS, check_compressed, check_scheme
from quant.schemes.loading import auto_class, empty_model, load_config, skip_patterns
from quant.schemes.variants import build_variant, check_variants, load_variant

TextIds = list[list[int]]


def check_lm_quant(cfg: LMQuantConfig) -> None:
    check_variants(cfg.variants, cfg.bnb)
    check_scheme(cfg.scheme)
    if cfg.calibration.examples < 1:
        raise ConfigError(f"calibration.examples must be at least 1; got {cfg.calibration.examples}")
    for name in ("validation_examples", "test_examples", "eval_batch_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be at least 1; got {getattr(cfg, name)}")
    if cfg.eval_examples is not None and cfg.eval_examples < 1:
        raise ConfigError(f"eval_examples must be at least 1 (or null: all); got {cfg.eval_examples}")


def check_causal_lm(name: str) -> None:
    if auto_class(load_config(name)) is not AutoModelForCausalLM:
        raise ConfigError(f"an LM quantization run measures perplexity; {name} is not a causal LM (classifiers: "
                          "recipes/quantize_model.py)")


def quantize_lm(cfg: LMQuantConfig) -> RunResult:
    check_lm_quant(cfg)
    check_causal_lm(cfg.model)
    tokenizer = ensure_pad_token(load_tokenizer(cfg.model))
    calibration = calibration_ids(cfg, tokenizer) if set(cfg.variants) & set(CALIBRATED) else []
    if set(cfg.variants) & set(COMPRESSED_VARIANTS):
        check_compressed(cfg.model, cfg.variants, cfg.scheme, calibration, cfg.skip_modules)
    run_dir = open_run(cfg)
    quiet_int8_cast_warning()
    texts = evaluation_texts(cfg, tokenizer)
    unquantized = load_causal_lm(cfg.model, dtype=torch.float32).eval()
    teacher = load_causal_lm(cfg.teacher, dtype=torch.float32).eval() if cfg.teacher else unquantized
    reference = greedy_next_tokens(teacher, texts["test"])
    del teacher
    skip = skip_patterns(empty_model(cfg.model), cfg.skip_modules)
    rows, models = {}, {}
    for variant in cfg.variants:
        models[variant], rows[variant] = build_and_measure(cfg, variant, run_dir / variant, tokenizer, texts,
                                                           reference, skip, unquantized, calibration)
    metrics = {"model": cfg.model, "teacher": cfg.teacher or cfg.model, "texts": {k: len(v) for k, v in texts.items()},
               "calibration": {"texts": len(calibration), "tokens": sum(map(len, calibration))},
               "skip_modules": skip, "torch": torch.__version__, "variants": rows}
    write_json_atomic(metrics, run_dir / "metrics.json")
    (run_dir / "report.md").write_text(markdown_table(list(rows.values())) + "\n")
    return RunResult(models[cfg.variants[-1]], metrics, run_dir)


def build_and_measure(cfg: LMQuantConfig, variant: str, folder: Path, tokenizer, texts: dict[str, TextIds],
                      reference: list[torch.Tensor], skip: list[str], unquantized: PreTrainedModel,
                      calibration: TextIds) -> tuple[PreTrainedModel, dict]:
    start = time.perf_counter()
    built = build_variant(cfg.model, variant, tokenizer, folder, cfg.bnb, cfg.skip_modules, cfg.scheme, calibration)
    seconds = time.perf_counter() - start
    probe = torch.tensor([texts["test"][0]])
    expected = logits_of(built, probe)
    del built
    model = load_variant(folder).eval()
    logits = [logits_of(model, torch.tensor([ids]))[0] for ids in texts["test"]]  # one pass for the test figures
    row = {"variant": variant, "reload_equal": torch.equal(logits_of(model, probe), expected),
           "validation_perplexity": text_perplexity(model, texts["validation"]),
           "test_perplexity": logits_perplexity(logits, texts["test"]),
           "next_token_agreement": next_token_agreement(logits, reference),
           **divergence_from(unquantized, logits, texts["test"]),
           "parameters": count_parameters(model), **weight_memory(model, skip), "disk_mb": disk_size_mb(folder),
           "seconds": seconds}
    return model, row


@torch.no_grad()
def logits_of(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits.float()


@torch.no_grad()
def text_perplexity(model: PreTrainedModel, texts: TextIds) -> float:
    """exp of the mean next-token NLL over every real token of `texts`, one text per forward pass (no padding, so
    every variant sees exactly the same computation)."""
    return logits_perplexity((logits_of(model, torch.tensor([ids]))[0] for ids in texts), texts)


def logits_perplexity(logits: Iterable[torch.Tensor], texts: TextIds) -> float:
    """`text_perplexity` from each text's logits at every position, (positions, vocabulary), float32."""
    nll = sum(torch.nn.functional.cross_entropy(rows[:-1], torch.tensor(ids[1:]), reduction="sum").item()
              for rows, ids in zip(logits, texts))
    return math.exp(nll / max(sum(len(ids) - 1 for ids in texts), 1))


@torch.no_grad()
def greedy_next_tokens(model: PreTrainedModel, texts: TextIds) -> list[torch.Tensor]:
    """The model's most likely next token at every position of each text."""
    return [logits_of(model, torch.tensor([ids]))[0].argmax(-1) for ids in texts]


def next_token_agreement(logits: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """The share of positions where the most likely next token (of each text's `logits`) is the reference model's."""
    same = sum((rows.argmax(-1) == r).sum().item() for rows, r in zip(logits, reference))
    return same / max(sum(len(r) for r in reference), 1)


@torch.no_grad()
def divergence_from(reference: PreTrainedModel, logits: list[torch.Tensor], texts: TextIds) -> dict[str, float]:
    """KL(reference || model) of the next-token distributions (the model's as `logits` of each text), and whether
    their top-1 tokens agree, at every position that predicts a token of the text (`quant.measure.divergence`)."""
    kls, same = [], []
    for rows, ids in zip(logits, texts):
        kl, agree = token_divergences(logits_of(reference, torch.tensor([ids]))[0, :-1].numpy(), rows[:-1].numpy())
        kls.append(kl)
        same.append(agree)
    return divergence_summary(kls, same)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| variant | val. ppl | test ppl | next-token agreement | mean KLD | same top-1 | weights MB | disk MB | "
             "seconds | reload equal |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['validation_perplexity']:.2f} | {r['test_perplexity']:.2f} | "
              f"{r['next_token_agreement']:.2%} | {r['kld_mean']:.4f} | {r['same_top1']:.2%} | {r['weight_mb']:.1f} | "
              f"{r['disk_mb']:.1f} | {r['seconds']:.1f} | {r['reload_equal']} |" for r in rows]
    return "\n".join(lines)


QUANTIZE_LM = register_job(Job("quantize_lm", LMQuantConfig, check_lm_quant, quantize_lm,
                               lambda cfg, result: (result.run_dir / "report.md").read_text()))
