"""Speculative decoding end to end, side by side in one run: the teacher alone and the teacher with each draft at each
k (draft tokens per teacher pass), batch 1, greedy, on CPU, in transformers (fp32, assisted generation) and in
llama.cpp (a GGUF teacher with GGUF drafts), through `quant.measure.speculative`. Each runtime is measured in a fresh
process of its own; in it the variants take turns over `--rounds` rounds (rotated, so that none always runs first)
after one warm-up generation each. Per variant: tokens/s (new tokens over the wall time of generating them, prompt
included, summed over the prompts; the median over rounds), its speed-up over the teacher alone, the acceptance
(accepted draft tokens / proposed), tokens per teacher pass; per draft, the best k; per model, the milliseconds of one
pass over 1 to max(k) + 1 tokens (what verifying k proposals costs the teacher). The teacher's tokens must be the
same with every draft as alone, token for token: the table says so per variant, and the run fails (after writing the
table and the JSON) if any draft changed them.

    python scripts/bench_speculative.py --teacher offline:SmolLM2-135M-Instruct --draft layers6=runs/draft-6/model \\
        --gguf-teacher runs/gguf-teacher/model-f16.gguf --gguf-draft layers6=runs/gguf-draft/model-f16.gguf \\
        --k 1 2 3 4 5 6 --threads 2 --rounds 3 --json runs/speculative.json

The prompts are the first `--prompt-tokens` tokens of the last `--prompts` of 1,250 shuffled texts of `--corpus` (IMDB
reviews, as in bench_generation.py). A draft whose vocabulary differs from its teacher's is refused before any model
loads; a draft at least as large as its teacher is warned about."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

import torch

from benchmarks.harness import rotated_order
from distill.core.cli import config_errors, split_debug
from distill.core.config import CorpusConfig
from distill.core.data import corpus_token_ids
from distill.core.errors import ConfigError
from distill.core.models import load_causal_lm, load_tokenizer
from distill.core.probe import run_probe
from distill.lm.acceptance import check_draft_tokenizer
from quant.export.gguf import loaded
from quant.measure.speculative import (check_gguf_vocabularies, check_k, gguf_speculative, pass_seconds,
                                       torch_speculative, warn_if_larger)

RUNTIMES = {"transformers": ("teacher", "draft"), "llama.cpp": ("gguf_teacher", "gguf_draft")}
"""Each runtime's teacher and drafts among the arguments."""
ALONE = "teacher alone"
PASS_REPEATS = 10


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", help="a transformers model (folder, offline: name or Hub id)")
    parser.add_argument("--draft", action="append", default=[], help="name=model, a draft of --teacher; repeatable")
    parser.add_argument("--gguf-teacher", help="a .gguf file")
    parser.add_argument("--gguf-draft", action="append", default=[], help="name=file.gguf; repeatable")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--corpus", default="offline:imdb")
    parser.add_argument("--tokenizer", default="offline:SmolLM2-135M-Instruct", help="for the prompts")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--runtime", choices=RUNTIMES, help=argparse.SUPPRESS)  # the child process's runtime
    return parser.parse_args(argv)


def drafts_of(args: argparse.Namespace, runtime: str) -> dict[str, str]:
    entries = getattr(args, RUNTIMES[runtime][1])
    if any("=" not in entry for entry in entries):
        raise ConfigError(f"--{RUNTIMES[runtime][1].replace('_', '-')} takes name=model; got {entries}")
    return dict(entry.split("=", 1) for entry in entries)


def runtimes(args: argparse.Namespace) -> list[str]:
    """The runtimes whose teacher and drafts were given, checked: shared vocabularies, k >= 1."""
    check_k(args.k)
    chosen = []
    for runtime, (teacher_key, _) in RUNTIMES.items():
        teacher, drafts = getattr(args, teacher_key), drafts_of(args, runtime)
        if bool(teacher) != bool(drafts):
            raise ConfigError(f"{runtime} needs a teacher and at least one draft; got teacher {teacher}, drafts "
                              f"{list(drafts.values())}")
        for draft in drafts.values():
            (check_gguf_vocabularies if runtime == "llama.cpp" else check_draft_tokenizer)(draft, teacher)
            warn_if_larger(draft, teacher)
        if teacher:
            chosen.append(runtime)
    if not chosen:
        raise ConfigError("nothing to measure: give --teacher with --draft, or --gguf-teacher with --gguf-draft")
    return chosen


def prompts_of(args: argparse.Namespace) -> list[list[int]]:
    corpus = CorpusConfig(source=args.corpus, shuffle_seed=0, limit=1250, max_length=args.prompt_tokens)
    return corpus_token_ids(corpus, load_tokenizer(args.tokenizer))[-args.prompts:]


def measure(args: argparse.Namespace, stack: ExitStack) -> dict[str, dict]:
    """In this process: every variant of `args.runtime`, its rounds' tokens/s and counts, and its tokens (`rows`);
    the milliseconds of one pass of the teacher and of each draft over 1 to max(k) + 1 tokens (`pass_ms`)."""
    torch.set_num_threads(args.threads)
    drafts = drafts_of(args, args.runtime)
    if args.runtime == "transformers":
        teacher = load_causal_lm(args.teacher).eval()
        models = {name: load_causal_lm(path).eval() for name, path in drafts.items()}
        generate = torch_speculative
    else:
        teacher = stack.enter_context(loaded(Path(args.gguf_teacher), args.threads))
        models = {name: stack.enter_context(loaded(Path(path), args.threads)) for name, path in drafts.items()}
        generate = gguf_speculative
    variants = {ALONE: (None, 1), **{f"{name}, k={k}": (models[name], k) for name in models for k in args.k}}
    prompts = prompts_of(args)
    for draft, k in variants.values():
        generate(teacher, draft, prompts[0], 4, k)  # warm-up
    rows = {name: {"tokens": [], "tokens_per_s": [], "accepted": 0, "proposed": 0, "target_passes": 0}
            for name in variants}
    for name in rotated_order(list(variants), args.rounds):
        row, (draft, k) = rows[name], variants[name]
        runs = [generate(teacher, draft, prompt, args.new_tokens, k) for prompt in prompts]
        row["tokens"].append([run.tokens for run in runs])
        row["tokens_per_s"].append(sum(len(run.tokens) for run in runs) / sum(run.seconds for run in runs))
        for key in ("accepted", "proposed", "target_passes"):
            row[key] += sum(getattr(run, key) for run in runs)
    passes = {name: {size: 1000 * pass_seconds(model, prompts[0], size, PASS_REPEATS)
                     for size in range(1, max(args.k) + 2)} for name, model in {"teacher": teacher, **models}.items()}
    return {"rows": rows, "pass_ms": passes}


def summary(rows: dict[str, dict]) -> dict[str, dict]:
    """Medians, speed-ups and acceptance per variant, and whether its teacher tokens are the teacher's own: `lossless`
    (every prompt of every round) and, where not, `first_difference` (the earliest position where they differ)."""
    alone = rows[ALONE]
    expected = alone["tokens"][0]
    base = statistics.median(alone["tokens_per_s"])
    results = {}
    for name, row in rows.items():
        differences = [next(i for i, (a, b) in enumerate(zip(got + [None], want + [None])) if a != b)
                       for run in row["tokens"] for got, want in zip(run, expected) if got != want]
        made = sum(len(ids) for run in row["tokens"] for ids in run)
        results[name] = {"tokens_per_s": statistics.median(row["tokens_per_s"]),
                         "speed_up": statistics.median(row["tokens_per_s"]) / base,
                         "acceptance": row["accepted"] / row["proposed"] if row["proposed"] else None,
                         "tokens_per_pass": made / row["target_passes"],
                         "rounds": row["tokens_per_s"], "lossless": not differences,
                         "first_difference": min(differences, default=None)}
    return results


def check_lossless(results: dict[str, dict[str, dict]]) -> None:
    """Fails, after everything is written, if a draft changed the teacher's tokens in any runtime."""
    changed = [f"{runtime} '{name}' (first at token {row['first_difference']})"
               for runtime, rows in results.items() for name, row in rows.items() if not row["lossless"]]
    if changed:
        raise RuntimeError(f"the teacher's greedy tokens with a draft differ from its tokens alone, so speculative "
                           f"decoding was not lossless: {', '.join(changed)}")


def table(results: dict[str, dict[str, dict]]) -> str:
    lines = ["| runtime | variant | tokens/s | speed-up | acceptance | tokens per teacher pass | "
             "teacher's own tokens |",
             "|---|---|---|---|---|---|---|"]
    for runtime, rows in results.items():
        for name, row in rows.items():
            acceptance = "-" if row["acceptance"] is None else f"{row['acceptance']:.1%}"
            same = "yes" if row["lossless"] else f"no (from token {row['first_difference']})"
            lines.append(f"| {runtime} | {name} | {row['tokens_per_s']:.1f} | {row['speed_up']:.2f}x | {acceptance} | "
                         f"{row['tokens_per_pass']:.2f} | {same} |")
    return "\n".join(lines)


def pass_table(passes: dict[str, dict[str, dict[str, float]]]) -> str:
    """Milliseconds per pass over n tokens, per runtime and model, n from 1 to max(k) + 1."""
    sizes = max(len(costs) for models in passes.values() for costs in models.values())
    lines = ["| runtime | model | " + " | ".join(f"{n} token{'s' * (n > 1)}" for n in range(1, sizes + 1)) + " |",
             "|---|---|" + "---|" * sizes]
    for runtime, models in passes.items():
        for name, costs in models.items():
            lines.append(f"| {runtime} | {name} | " + " | ".join(f"{ms:.1f} ms" for ms in costs.values()) + " |")
    return "\n".join(lines)


def best_k(results: dict[str, dict[str, dict]]) -> dict[str, dict[str, str]]:
    """Per runtime and draft, the variant with the most tokens/s."""
    best: dict[str, dict[str, str]] = {}
    for runtime, rows in results.items():
        for name, row in rows.items():
            if name == ALONE:
                continue
            draft, chosen = name.rsplit(", k=", 1)[0], best.setdefault(runtime, {})
            if draft not in chosen or row["tokens_per_s"] > rows[chosen[draft]]["tokens_per_s"]:
                chosen[draft] = name
    return best


def main(argv: list[str]) -> None:
    debug, argv = split_debug(argv)
    args = parse(argv)
    if args.runtime:
        with ExitStack() as stack:
            print(json.dumps(measure(args, stack)))
        return
    with config_errors(debug):
        chosen = runtimes(args)
        prompts_of(args)  # a corpus or tokenizer that does not load fails here, before any model does
    measured = {runtime: run_probe([sys.executable, __file__, *argv, "--runtime", runtime]) for runtime in chosen}
    results = {runtime: summary(out["rows"]) for runtime, out in measured.items()}
    passes = {runtime: out["pass_ms"] for runtime, out in measured.items()}
    best = best_k(results)
    print(f"{args.prompts} prompts of {args.prompt_tokens} tokens, {args.new_tokens} greedy new tokens each, batch 1, "
          f"{args.threads} threads, median of {args.rounds} rounds")
    print(table(results))
    for runtime, drafts in best.items():
        for draft, name in drafts.items():
            print(f"best in {runtime}, {draft}: {name} ({results[runtime][name]['speed_up']:.2f}x)")
    print(f"one pass over n tokens after the first prompt (median of {PASS_REPEATS}):")
    print(pass_table(passes))
    if args.json:
        args.json.write_text(json.dumps({"args": {key: value for key, value in vars(args).items() if key != "json"},
                                         "results": results, "best": best, "pass_ms": passes},
                                        indent=2))
    check_lossless(results)


if __name__ == "__main__":
    main(sys.argv[1:])
