"""CPU generation speed at batch 1, side by side in one run: prefill (one prompt) and decode (greedy new tokens) of
transformers folders and GGUF files (in llama.cpp), each model in a fresh process (`quant.measure.generation_speed`),
the models taking turns over `--rounds` rounds (medians). Beside each GGUF file: how close its decode comes to the
memory-bandwidth limit, tokens/s x bytes of weights read per token (every tensor of the file once: at batch 1 each new
token reads every weight matrix, the tied embedding as the output head) over the machine's memory bandwidth, measured
with the same threads two ways: STREAM's copy (bytes read + bytes written per second, torch copying a 1 GiB buffer into
another) and a read-only pass (bytes read per second, torch summing a 1 GiB buffer), best of 5 each. Decoding only reads
weights, so the read bandwidth is its limit; the copy figure is reported beside it.

    python scripts/bench_generation.py --model teacher=offline:SmolLM2-135M-Instruct \
        --model student=runs/student-lm-width/model --model q4_k_m=runs/gguf/model-q4_k_m.gguf \
        --threads 2 --rounds 3 --json runs/bench_generation.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from distill.core.config import CorpusConfig
from distill.core.data import corpus_token_ids
from distill.core.models import resolve_model
from quant.measure.generation_speed import speed


def memory_bandwidth(threads: int, megabytes: int = 1024, repeats: int = 5) -> dict[str, float]:
    """Bytes per second with `threads` torch threads: copy (read + write, as STREAM counts) and read (a sum)."""
    torch.set_num_threads(threads)
    source = torch.ones(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    copy = read = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        copy = min(copy, time.perf_counter() - start)
        start = time.perf_counter()
        source.sum()
        read = min(read, time.perf_counter() - start)
    size = source.numel() * source.element_size()
    return {"copy": 2 * size / copy, "read": size / read}


def weight_bytes(path: str) -> int:
    """Bytes of every weight tensor: a GGUF file's tensors, or a folder's safetensors files."""
    if path.endswith(".gguf"):
        from gguf import GGUFReader

        return sum(int(tensor.n_bytes) for tensor in GGUFReader(path).tensors)
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="name=path (a folder, an id or a .gguf)")
    parser.add_argument("--tokenizer", default="offline:SmolLM2-135M-Instruct")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    models = dict(entry.split("=", 1) for entry in args.model)
    models = {name: path if path.endswith(".gguf") else resolve_model(path) for name, path in models.items()}
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.tokenizer))
    texts = corpus_token_ids(CorpusConfig(source="offline:imdb", shuffle_seed=0, limit=1250, max_length=512),
                             tokenizer)[-200:]
    prompt = [token for ids in texts for token in ids][:args.prompt_tokens]
    bandwidth = memory_bandwidth(args.threads)
    runs: dict[str, list[dict]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, path in models.items():
            runs[name].append(speed(path, prompt, args.new_tokens, args.threads, 1))
    rows = []
    for name, path in models.items():
        decode = statistics.median(run["decode_tokens_per_s"] for run in runs[name])
        read = weight_bytes(path)
        rows.append({"model": name, "path": path, "weight_mb": read / 1e6,
                     "prefill_tokens_per_s": statistics.median(run["prefill_tokens_per_s"] for run in runs[name]),
                     "decode_tokens_per_s": decode,
                     "peak_rss_mb": statistics.median(run["peak_rss_mb"] for run in runs[name]),
                     "bandwidth_limit_tokens_per_s": bandwidth["read"] / read,
                     "of_bandwidth_limit": decode * read / bandwidth["read"],
                     "of_copy_bandwidth": decode * read / bandwidth["copy"]})
    base = rows[0]
    print(f"memory bandwidth, {args.threads} threads: read {bandwidth['read'] / 1e9:.1f} GB/s, copy "
          f"{bandwidth['copy'] / 1e9:.1f} GB/s (read + write); prompt "
          f"{args.prompt_tokens} tokens, {args.new_tokens} new tokens, median of {args.rounds} rounds")
    print(f"| model | weights MB | prefill tok/s | decode tok/s | vs {base['model']} | peak RSS MB | "
          "read-bandwidth limit tok/s | of the limit | weights read / copy bandwidth |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['weight_mb']:.1f} | {row['prefill_tokens_per_s']:.0f} | "
              f"{row['decode_tokens_per_s']:.1f} | {row['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x | "
              f"{row['peak_rss_mb']:.0f} | {row['bandwidth_limit_tokens_per_s']:.0f} | "
              f"{row['of_bandwidth_limit']:.0%} | {row['of_copy_bandwidth']:.0%} |")
    if args.json:
        args.json.write_text(json.dumps({"bandwidth_bytes_per_s": bandwidth, "threads": args.threads,
                                         "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                                         "rounds": args.rounds, "runs": runs, "rows": rows}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
