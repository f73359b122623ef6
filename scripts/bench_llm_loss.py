"""Peak memory and time of the chunked causal distillation loss against the naive one (full float32 logits of both
models), forward + backward, on synthetic final hidden states and LM heads: forward KL alone, or with `--with-ce`
the default stage mix, 0.5 forward KL + 0.5 next-token CE (one fused pass when chunked). Each variant runs in its
own process; its peak is the growth of the process's maximum resident set over the inputs (CPU), or torch's peak
allocation (CUDA).

    python scripts/bench_llm_loss.py [--batch 2 --length 512 --vocab 32000 --hidden 64 --chunk-size 256 --with-ce]
    python scripts/bench_llm_loss.py --lengths 512 1024 2048 4096 --vocabs 32000 49152 [--repeats 3]   # scaling
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.harness import peak_mb, ratio
from distill.core.probe import run_probe
from distill.losses.causal.divergences import forward_kl
from distill.losses.causal.fused import LogitSource, fused_means
from distill.losses.causal.registered import cross_entropy_rows, scaled_divergence

TEMPERATURE = 2.0


def naive_loss(states_s, head_s, states_t, head_t, labels, with_ce):
    """What one writes first: every position's float32 logits of both models, then masked means."""
    student_logits = head_s(states_s[:, :-1]).float()
    ce = F.cross_entropy(student_logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100) if with_ce else None
    log_q = F.log_softmax(student_logits / TEMPERATURE, -1)
    del student_logits  # backward keeps the log-probabilities only
    log_p = F.log_softmax(head_t(states_t[:, :-1]).float() / TEMPERATURE, -1)
    kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    keep = labels[:, 1:] != -100
    kl = (kl * keep).sum() / keep.sum() * TEMPERATURE ** 2
    return 0.5 * kl + 0.5 * ce if with_ce else kl


def chunked_loss(states_s, head_s, states_t, head_t, labels, with_ce, chunk_size):
    """The same through `fused_means`: one pass over chunks of positions for both losses."""
    losses = {"forward_kl": scaled_divergence(forward_kl, TEMPERATURE)}
    weights = {"forward_kl": 1.0}
    if with_ce:
        losses["next_token_ce"] = cross_entropy_rows
        weights = {"forward_kl": 0.5, "next_token_ce": 0.5}
    return fused_means(losses, weights, LogitSource(states_s, head_s), labels, LogitSource(states_t, head_t),
                       chunk_size=chunk_size)[0]


def run_variant(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)  # the heads' initialisation
    generator = torch.Generator().manual_seed(0)
    states_s = torch.randn(args.batch, args.length, args.hidden, generator=generator).to(device).requires_grad_()
    states_t = torch.randn(args.batch, args.length, args.hidden, generator=generator).to(device)
    head_s = torch.nn.Linear(args.hidden, args.vocab, bias=False).to(device)
    head_t = torch.nn.Linear(args.hidden, args.vocab, bias=False).to(device).requires_grad_(False)
    labels = torch.randint(0, args.vocab, (args.batch, args.length), generator=generator).to(device)
    labels[:, : args.length // 8] = -100  # a prompt
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = peak_mb(device)
    start = time.perf_counter()
    if args.variant == "naive":
        loss = naive_loss(states_s, head_s, states_t, head_t, labels, args.with_ce)
    else:
        loss = chunked_loss(states_s, head_s, states_t, head_t, labels, args.with_ce, args.chunk_size)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"variant": args.variant, "peak_mb": round(peak_mb(device) - before, 1), "seconds": round(seconds, 3),
            "loss": loss.item(), "grad_norm": head_s.weight.grad.norm().item()}


def probe(args, variant: str, length: int, vocab: int) -> dict:
    """One variant at one shape in its own process."""
    shape = ["--batch", str(args.batch), "--length", str(length), "--vocab", str(vocab), "--hidden", str(args.hidden),
             "--chunk-size", str(args.chunk_size), "--device", args.device, *(["--with-ce"] if args.with_ce else [])]
    return run_probe([sys.executable, __file__, *shape, "--variant", variant])


def scaling_table(args) -> str:
    """Peak memory and median time of both variants over the grid of lengths x vocabularies, as a Markdown table.
    Each shape's variants alternate over the repeats."""
    lines = ["| L | V | one model's fp32 logits MB | naive peak MB | chunked peak MB | memory ratio | naive s | "
             "chunked s | time ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for length in args.lengths:
        for vocab in args.vocabs:
            runs = {"naive": [], "chunked": []}
            for _ in range(args.repeats):
                for variant in runs:
                    runs[variant].append(probe(args, variant, length, vocab))
            peak = {v: statistics.median(r["peak_mb"] for r in rows) for v, rows in runs.items()}
            secs = {v: statistics.median(r["seconds"] for r in rows) for v, rows in runs.items()}
            logits_mb = args.batch * length * vocab * 4 / 2**20
            lines.append(f"| {length} | {vocab} | {logits_mb:.0f} | {peak['naive']:.0f} | {peak['chunked']:.0f} | "
                         f"{ratio(peak['chunked'], peak['naive'])} | {secs['naive']:.2f} | {secs['chunked']:.2f} | "
                         f"{secs['chunked'] / secs['naive']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--with-ce", action="store_true", help="0.5 forward KL + 0.5 next-token CE")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", type=int, nargs="+", help="with --vocabs: a scaling table over this grid")
    parser.add_argument("--vocabs", type=int, nargs="+")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant per grid shape (medians)")
    parser.add_argument("--variant", choices=["naive", "chunked"], help="run one variant in this process")
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    mix = "forward KL + CE" if args.with_ce else "forward KL"
    if args.lengths or args.vocabs:
        args.lengths, args.vocabs = args.lengths or [args.length], args.vocabs or [args.vocab]
        print(f"{mix}, B={args.batch} H={args.hidden} chunk={args.chunk_size} on {args.device}, forward + backward, "
              f"medians of {args.repeats}:\n{scaling_table(args)}")
        return
    logits_mb, chunk_mb = (rows * args.vocab * 4 / 2**20 for rows in (args.batch * args.length, args.chunk_size))
    print(f"{mix}, B={args.batch} L={args.length} V={args.vocab} H={args.hidden} chunk={args.chunk_size} "
          f"on {args.device}: "
          f"one model's float32 logits are {logits_mb:.0f} MB, one chunk's {chunk_mb:.0f} MB")
    for variant in ("naive", "chunked"):
        row = probe(args, variant, args.length, args.vocab)
        print(f"{variant:>8}: peak +{row['peak_mb']:>8.1f} MB  {row['seconds']:>7.3f} s  loss {row['loss']:.6f}  "
              f"|grad| {row['grad_norm']:.6f}")


if __name__ == "__main__":
    main(sys.argv[1:])
