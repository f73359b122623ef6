"""Compare two teacher caches of the same corpus (a served teacher's and the in-process teacher's, say), row by row:
how often their most likely next token agrees, how much their top k overlap, and the KL from the first cache's rows
(top k plus the rest of the mass as one bucket, as `topk_kl` reads them) to the in-process teacher's full
distribution, next to the same KL of the second cache's rows (0 when that cache is the teacher's own top k: the
bucketed KL of a distribution's own top k is 0), and how many of the first cache's slots are padding (a served
cache's entries that named no single token id).

    python scripts/compare_teacher_caches.py --config recipes/cache_teacher_served.yaml \
        --first runs/teacher-cache-served --second runs/teacher-cache-local
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
from tqdm.auto import tqdm

from distill.core.config import parse_args
from distill.core.data import corpus_token_ids
from distill.core.models import load_causal_lm, load_tokenizer
from distill.lm.cache.store import TeacherCache
from distill.lm.config import CacheConfig
from distill.lm.served import PAD_LOGPROB
from distill.losses.causal.divergences import topk_kl


@torch.no_grad()
def compare(config: str, first: str, second: str, limit: int | None = None) -> dict:
    cfg = parse_args(CacheConfig, ["--config", config])
    tokenizer = load_tokenizer(cfg.teacher)
    examples = corpus_token_ids(cfg.data, tokenizer)
    caches = TeacherCache.open(first), TeacherCache.open(second)
    teacher = load_causal_lm(cfg.teacher).eval()
    count = min(len(examples), limit or len(examples))
    rows = agree = padded = empty = 0
    overlap = kl_first = kl_second = covered_first = covered_second = 0.0
    for i in tqdm(range(count), desc="rows"):
        (lp_a, id_a), (lp_b, id_b) = caches[0][i], caches[1][i]
        logits = teacher(input_ids=torch.tensor([examples[i]])).logits[0].float()
        agree += (id_a[:, 0] == id_b[:, 0]).sum().item()
        k = min(id_a.shape[1], id_b.shape[1])
        overlap += sum(len(set(a[:k].tolist()) & set(b[:k].tolist())) / k for a, b in zip(id_a, id_b))
        kl_first += topk_kl(logits, lp_a, id_a, 1.0, tail=True).sum().item()
        kl_second += topk_kl(logits, lp_b, id_b, 1.0, tail=True).sum().item()
        covered_first += lp_a.exp().sum(-1).sum().item()
        missing = lp_a < PAD_LOGPROB / 2  # slots a served cache could not fill
        padded += missing.sum().item()
        empty += missing.all(-1).sum().item()
        covered_second += lp_b.exp().sum(-1).sum().item()
        rows += len(examples[i])
    return {"examples": count, "rows": rows, "top1_agreement": agree / rows, "topk_overlap": overlap / rows,
            "kl_to_teacher_first": kl_first / rows, "kl_to_teacher_second": kl_second / rows,
            "mass_in_slots_first": covered_first / rows, "mass_in_slots_second": covered_second / rows,
            "padded_slots_first": padded / (rows * caches[0].k), "rows_without_tokens_first": empty}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the cache config both were built from (corpus, teacher)")
    parser.add_argument("--first", required=True)
    parser.add_argument("--second", required=True)
    parser.add_argument("--limit", type=int, default=None, help="compare the first N examples only")
    args = parser.parse_args(argv)
    print(json.dumps(compare(args.config, args.first, args.second, args.limit), indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
