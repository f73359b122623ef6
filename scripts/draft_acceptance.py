"""How good each model is as a speculative-decoding draft of a target, measured offline on held-out prompts (the
first `--prompt-tokens` tokens of the first `--prompts` test texts of an LM distillation config): the share of the
target's greedy tokens the draft would propose, greedy tokens per target pass at each k (exact), the sampled rule's
acceptance rate alpha and its expected tokens per pass (`distill.lm.acceptance`). A draft must share the target's
tokenizer.

    python scripts/draft_acceptance.py --config recipes/distill_lm.yaml --target offline:SmolLM2-135M-Instruct \\
        --draft runs/student-lm/model --draft runs/lm-pipeline/prune/model --k 1 2 4 8 --json runs/acceptance.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distill.core.cli import config_errors, split_debug
from distill.core.config import parse_args
from distill.core.data import corpus_tokens
from distill.core.models import load_causal_lm, load_tokenizer
from distill.lm.acceptance import acceptance, check_draft_tokenizer
from distill.lm.config import LMDistillConfig
from distill.lm.data import held_out_splits


def prompts_of(cfg: LMDistillConfig, tokenizer, count: int, length: int) -> list[list[int]]:
    """The first `length` tokens of the first `count` test texts, split as the distillation job splits the corpus."""
    splits, _ = held_out_splits(corpus_tokens(cfg.data, tokenizer), cfg, with_cache_index=False)
    return [ids[:length] for ids in splits["test"]["input_ids"][:count]]


def table(rows: dict[str, dict], ks: list[int]) -> str:
    head = " | ".join(f"greedy / sampled tokens per pass, k={k}" for k in ks)
    lines = [f"| draft | parameters | greedy match | alpha | {head} |", "|---|---|---|---|" + "---|" * len(ks)]
    for name, row in rows.items():
        cells = " | ".join(f"{row['per_k'][k]['greedy_tokens_per_pass']:.2f} / "
                           f"{row['per_k'][k]['sampled_tokens_per_pass']:.2f}" for k in ks)
        lines.append(f"| {name} | {row['parameters'] / 1e6:.1f}M | {row['greedy_match']:.1%} | {row['alpha']:.3f} | "
                     f"{cells} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    debug, argv = split_debug(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--draft", action="append", required=True, help="a draft model; repeat for several")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8], help="proposals per target pass")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", help="also write every figure here")
    args, config_args = parser.parse_known_args(argv)
    with config_errors(debug):
        cfg = parse_args(LMDistillConfig, config_args)
        for draft in args.draft:
            check_draft_tokenizer(draft, args.target)
        tokenizer = load_tokenizer(args.target)
        prompts = prompts_of(cfg, tokenizer, args.prompts, args.prompt_tokens)
        target = load_causal_lm(args.target).eval()
        rows = {}
        for draft in args.draft:
            model = load_causal_lm(draft).eval()
            rows[draft] = {"parameters": sum(p.numel() for p in model.parameters()),
                           **acceptance(target, model, prompts, args.new_tokens, args.k)}
    print(table(rows, args.k))
    if args.json:
        Path(args.json).write_text(json.dumps({"target": args.target, "drafts": rows}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
