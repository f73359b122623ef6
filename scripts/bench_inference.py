"""Inference latency and throughput of saved classifiers and of their quantized variants, on the CPU (and on the GPU
when CUDA is available), at several batch sizes of real sentences padded or truncated to one length.

Every model folder becomes each requested variant in each dtype, in memory (`quant.schemes.variants.make_variant`;
nothing is saved):
  full          fp32: the saved weights; bf16: loaded in bfloat16
  dynamic_int8  PyTorch's dynamic int8 Linears (fp32 activations, CPU only)
  bnb_int8      bitsandbytes LLM.int8 (no compute dtype to choose: it quantizes activations from fp16)
  bnb_nf4/fp4   bitsandbytes 4-bit; the dtype is its compute dtype, the rest of the model stays fp32
A combination that does not exist is a row marked n/a with the reason, never measured.

A latency is the median over --rounds rounds of a model's median of --repeats forward passes; each round measures
every model of one device and batch size once (`distill.core.evaluate.alternating_latencies`), so that changes in
machine load hit all of them alike. Throughput is examples per second (batch / latency); speed is the latency of the
reference (the first --model, full fp32, same device and batch size) over the row's.

    python scripts/bench_inference.py --model teacher=runs/teacher/model --model student=runs/student/model \\
        --model pruned=runs/pruned-student/model --rounds 5 --threads 2 --json runs/bench_inference.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.core.config import DataConfig
from distill.core.data import load_splits
from distill.core.errors import ConfigError
from distill.core.evaluate import alternating_latencies, examples_per_s, latency_batch
from distill.core.models import load_tokenizer, vocabulary_difference
from quant.config import BnbConfig
from quant.quantize import quiet_int8_cast_warning
from quant.schemes.variants import check_variants, make_variant

VARIANTS = ("full", "dynamic_int8", "bnb_int8", "bnb_nf4", "bnb_fp4")
DTYPES = ("fp32", "bf16")
BNB_COMPUTE_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
REFERENCE = ("full", "fp32")


def not_applicable(variant: str, dtype: str, device: str) -> str | None:
    """Why `variant` in `dtype` on `device` is not a thing to measure; None when it is."""
    if variant == "dynamic_int8" and device != "cpu":
        return "PyTorch's dynamic int8 kernels (fbgemm/oneDNN) run on the CPU only"
    if variant == "dynamic_int8" and dtype != "fp32":
        return "dynamic int8 Linears take fp32 activations only"
    if variant == "bnb_int8" and dtype != "fp32":
        return "LLM.int8 has no compute dtype: bitsandbytes casts activations to fp16 to quantize them"
    return None


def build(folder: str, variant: str, dtype: str, device: str) -> PreTrainedModel:
    if variant == "full":
        return make_variant(folder, dtype, device=device)  # quant's fp32 and bf16 variants
    return make_variant(folder, variant, BnbConfig(compute_dtype=BNB_COMPUTE_DTYPES[dtype]), device=device)


def check_request(models: dict[str, str], variants: list[str], dtypes: list[str], batch_sizes: list[int],
                  rounds: int, repeats: int) -> None:
    """Everything that can be wrong before a model loads: folders, names, the reference, counts."""
    if not models:
        raise ConfigError("no model to measure: give --model NAME=FOLDER at least once")
    missing = [f"{name}={folder}" for name, folder in models.items() if not Path(folder, "config.json").is_file()]
    if missing:
        raise ConfigError(f"not a saved model folder (no config.json): {', '.join(missing)}")
    for label, asked, known in (("variant", variants, VARIANTS), ("dtype", dtypes, DTYPES)):
        unknown = [name for name in asked if name not in known]
        if unknown or len(set(asked)) < len(asked):
            raise ConfigError(f"{label}s must be distinct names among {', '.join(known)}; got {asked}")
    if REFERENCE[0] not in variants or REFERENCE[1] not in dtypes:
        raise ConfigError(f"the speed ratios need the reference: keep '{REFERENCE[0]}' among the variants and "
                          f"'{REFERENCE[1]}' among the dtypes")
    for label, value in (("batch size", min(batch_sizes, default=0)), ("rounds", rounds), ("repeats", repeats)):
        if value < 1:
            raise ConfigError(f"{label} must be at least 1; got {value}")
    quantized = [variant for variant in variants if variant != "full"]
    if quantized:
        check_variants(quantized, BnbConfig())


def shared_tokenizer(models: dict[str, str]) -> PreTrainedTokenizerBase:
    """The first model's tokenizer, which every model must share: all are timed on the same token ids."""
    (first, folder), *others = models.items()
    tokenizer = load_tokenizer(folder)
    for name, other in others:
        difference = vocabulary_difference(tokenizer, load_tokenizer(other))
        if difference:
            raise ConfigError(f"model '{name}' has another vocabulary than '{first}' ({difference}); "
                              "this benchmark feeds every model the same token ids")
    return tokenizer


def measure(models: dict[str, str], texts: list[str], variants: list[str], dtypes: list[str], batch_sizes: list[int],
            devices: list[str], max_length: int = 64, rounds: int = 5, warmup: int = 1, repeats: int = 5
            ) -> list[dict]:
    """One row per device x batch size x model x variant x dtype, in that order; n/a rows carry a `note`."""
    check_request(models, variants, dtypes, batch_sizes, rounds, repeats)
    tokenizer = shared_tokenizer(models)
    keys = [(name, variant, dtype) for name in models for variant in variants for dtype in dtypes]
    rows = []
    for device in devices:
        built = {(name, variant, dtype): build(models[name], variant, dtype, device) for name, variant, dtype in keys
                 if not_applicable(variant, dtype, device) is None}
        for batch_size in batch_sizes:
            batch = {k: v.to(device) for k, v in latency_batch(tokenizer, texts, batch_size, max_length).items()}
            latencies = alternating_latencies(built, dict.fromkeys(built, batch), rounds, warmup, repeats)
            reference = latencies[(next(iter(models)), *REFERENCE)]
            rows += [row(device, batch_size, key, latencies.get(key), reference) for key in keys]
        del built
    return rows


def row(device: str, batch_size: int, key: tuple[str, str, str], ms: float | None, reference_ms: float) -> dict:
    name, variant, dtype = key
    measured = ms is not None
    return {"device": device, "model": name, "variant": variant, "dtype": dtype, "batch": batch_size,
            "median_ms": ms, "examples_per_s": examples_per_s(batch_size, ms) if measured else None,
            "speed_vs_reference": reference_ms / ms if measured else None,
            "note": None if measured else not_applicable(variant, dtype, device)}


def markdown(rows: list[dict], reference: str, max_length: int) -> str:
    lines = [f"| device | model | variant | dtype | batch (x{max_length} tokens) | median ms/batch | examples/s | "
             f"speed vs {reference} fp32 |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        numbers = ("n/a",) * 3 if r["median_ms"] is None else (
            f"{r['median_ms']:.2f}", f"{r['examples_per_s']:.0f}", f"{r['speed_vs_reference']:.2f}x")
        lines.append(f"| {r['device']} | {r['model']} | {r['variant']} | {r['dtype']} | {r['batch']} | "
                     f"{' | '.join(numbers)} |")
    notes = dict.fromkeys(f"- n/a, {r['variant']} {r['dtype']} on {r['device']}: {r['note']}"
                          for r in rows if r["note"])
    return "\n".join([*lines, *([""] + list(notes) if notes else [])])


def named_folder(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=FOLDER, got '{text}'")
    return name, folder


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=named_folder, action="append", required=True, metavar="NAME=FOLDER",
                        help="a saved classifier; repeat for each; the first is the reference")
    parser.add_argument("--variants", nargs="+", default=["full", "dynamic_int8", "bnb_int8", "bnb_nf4"],
                        choices=VARIANTS)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--data", default=DataConfig.source, help="dataset whose test sentences are the inputs")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed forward passes per model and round")
    parser.add_argument("--repeats", type=int, default=5, help="timed forward passes per model and round")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the settings and rows here")
    args = parser.parse_args(argv)
    models = dict(args.model)
    if len(models) < len(args.model):
        parser.error("two --model entries share a name")
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_int8_cast_warning()
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    try:  # the request is checked before the data loads, and again by `measure`
        check_request(models, args.variants, args.dtypes, args.batch_sizes, args.rounds, args.repeats)
        texts = list(load_splits(DataConfig(source=args.data))["test"]["text"][:max(args.batch_sizes)])
        rows = measure(models, texts, args.variants, args.dtypes, args.batch_sizes, devices, args.max_length,
                       args.rounds, args.warmup, args.repeats)
    except ConfigError as err:
        parser.error(str(err))
    if args.json:
        settings = {"data": args.data, "max_length": args.max_length, "rounds": args.rounds, "warmup": args.warmup,
                    "repeats": args.repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "reference": f"{args.model[0][0]} full fp32", "devices": devices}
        args.json.write_text(json.dumps({**settings, "rows": rows}, indent=2))
    print(markdown(rows, args.model[0][0], args.max_length))
    if "cuda" not in devices:
        print("\nGPU: not measured (CUDA is not available).")


if __name__ == "__main__":
    main(sys.argv[1:])
