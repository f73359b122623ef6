"""Causal-LM pieces that several benchmarks run: `distill_lm` stopped after its timed steps, and the held-out
perplexities of models on a config's slices."""
from __future__ import annotations

from accelerate import Accelerator
from torch.utils.data import DataLoader

from distill.core.data import corpus_tokens
from distill.core.errors import ConfigError
from distill.core.models import ensure_pad_token, load_tokenizer
from distill.lm.config import LMDistillConfig
from distill.lm.data import LMCollator, held_out_splits
from distill.lm.job import distill_lm
from distill.lm.metrics import perplexity

from .harness import StepClock


class StepsDone(Exception):
    """Raised after the last timed step: what the run would do next (evaluate, save) is not measured."""


def run_variant(cfg: LMDistillConfig, total: int, warmup: int, keep_going: bool = False) -> dict:
    """`distill_lm` on `cfg`, stopped at the end of step `total` (with `keep_going`, left to evaluate and save its
    student): the clock's step times and peak."""
    clock = StepClock(total, warmup)

    def on_step(state) -> None:
        if clock.tick() and not keep_going:
            raise StepsDone

    try:
        distill_lm(cfg, on_step)
    except StepsDone:
        pass
    if len(clock.ends) < total:
        raise ConfigError(f"the run ended after {len(clock.ends)} of its {total} steps: its train slice is too "
                          "small; raise data.limit or lower --steps")
    return clock.result()


def held_out_perplexities(model, splits, collate, batch_size: int, accelerator: Accelerator) -> dict[str, float]:
    model = accelerator.prepare(model.eval())
    return {name: perplexity(model, accelerator.prepare(DataLoader(splits[name], batch_size, collate_fn=collate)),
                             accelerator)
            for name in ("validation", "test")}


def measure(cfg: LMDistillConfig, models: dict) -> dict:
    """The held-out slices' [start, end) ranges, and each model's validation and test perplexity on them."""
    accelerator = Accelerator()
    tokenizer = ensure_pad_token(load_tokenizer(cfg.teacher))
    tokenizer.padding_side = "right"
    splits, ranges = held_out_splits(corpus_tokens(cfg.data, tokenizer), cfg, with_cache_index=False)
    collate, batch = LMCollator(tokenizer), cfg.train.eval_batch_size
    return {"splits": ranges, **{name: held_out_perplexities(model, splits, collate, batch, accelerator)
                                 for name, model in models.items()}}
