"""Packed training data for causal LMs: examples laid end to end in blocks of `max_length` tokens, so that no step
spends its compute on padding and no text loses its end to truncation.

Plain texts are tokenized whole, each ends with eos, and the stream is cut into blocks (transformers' `run_clm`
`group_texts`); prompt/completion and chat examples are never cut: whole examples fill a block greedily, in order.
Each piece of a block (a text, the part of one that a block boundary cut, an example) gets position ids that restart
at 0. A batch that carries `position_ids` goes to the model without its attention mask and without a KV cache
(`distill.core.loss_interface.model_inputs`): transformers' masking then reads the restarts as sequence boundaries and
builds a block-diagonal causal mask (sliding windows included), for the student and the teacher alike. A piece's
first token is no target: nothing before it in the block is its context."""
from __future__ import annotations

from typing import Optional

from distill.core.chat import TokenizedCorpus
from distill.core.loss_interface import POSITION_IDS
from distill.losses.causal.fused import IGNORE_INDEX


class BlockPacker:
    """Blocks of at most `max_length` tokens, each a list of pieces: `input_ids`, `position_ids` restarting at 0 at
    every piece, and `labels` (the piece's own, -100 at its first token)."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.columns: dict[str, list[list[int]]] = {"input_ids": [], POSITION_IDS: [], "labels": []}

    def room(self) -> int:
        """Tokens the open block still takes (a full block closes: the next piece opens a new one)."""
        ids = self.columns["input_ids"]
        return self.max_length - len(ids[-1]) if ids and len(ids[-1]) < self.max_length else 0

    def add(self, ids: list[int], labels: list[int]) -> None:
        if len(ids) > self.room():
            for column in self.columns.values():
                column.append([])
        self.columns["input_ids"][-1] += ids
        self.columns[POSITION_IDS][-1] += range(len(ids))
        self.columns["labels"][-1] += [IGNORE_INDEX, *labels[1:]]


def pack_texts(texts: list[list[int]], eos_id: int, max_length: int) -> dict[str, list[list[int]]]:
    """Whole texts, each ending with `eos_id` (when the tokenizer has one), laid end to end and cut into blocks of
    `max_length` tokens (the last one shorter)."""
    packer = BlockPacker(max_length)
    for ids in texts:
        ids = ids if eos_id is None or ids[-1:] == [eos_id] else [*ids, eos_id]
        while ids:
            room = packer.room() or max_length
            packer.add(ids[:room], ids[:room])
            ids = ids[room:]
    return packer.columns


def pack_examples(examples: list[list[int]], prompt_lengths: list[int], max_length: int
                  ) -> dict[str, list[list[int]]]:
    """Whole prompt/completion examples (each at most `max_length` tokens), in order, a new block whenever the next
    does not fit in the open one; only completion tokens are targets."""
    packer = BlockPacker(max_length)
    for ids, prompt in zip(examples, prompt_lengths):
        packer.add(ids, [IGNORE_INDEX] * prompt + ids[prompt:])
    return packer.columns


def packed_training_texts(corpus: TokenizedCorpus, end: int, eos_id: int, max_length: int
                          ) -> dict[str, list[list[int]]]:
    """The blocks of the corpus's first `end` examples (its training part)."""
    if corpus.prompt_lengths is not None:
        return pack_examples(corpus.ids[:end], corpus.prompt_lengths[:end], max_length)
    return pack_texts(corpus.whole[:end], eos_id, max_length)


def packing_refusal(cfg) -> Optional[str]:
    """Why the training split of an LM distillation config `cfg` cannot be packed; None when it can."""
    if cfg.cache is not None:
        return "a teacher cache holds the rows of whole truncated texts, one example at a time"
    if cfg.student_tokenizer:
        return "student_tokenizer aligns each text's two tokenizations one text at a time"
    if cfg.on_policy.lmbda > 0:
        return "on-policy batches replace the data's examples with the student's completions of their prompts"
    return None


def packs(cfg) -> bool:
    """Whether an LM distillation run packs its training split: `data.packing`, or when None, whether it can."""
    return cfg.data.packing if cfg.data.packing is not None else packing_refusal(cfg) is None
