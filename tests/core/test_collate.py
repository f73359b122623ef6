"""`IndexedRowsCollator`: examples that carry their row index are padded without it, and the rows kept for those
indices (in batch order) join the batch; examples without it (held-out splits) are collated as they are."""
import torch
from transformers import DataCollatorWithPadding

from distill.core.collate import CACHE_INDEX, IndexedRowsCollator
from tests.conftest import make_tokenizer

KEPT = torch.arange(50.0).reshape(10, 5)
"""What was kept for rows 0..9 (a teacher's cached logits, say)."""


def collator():
    calls = []

    def rows(indices, batch):
        calls.append((indices, batch["input_ids"].shape))
        return {"teacher_logits": KEPT[indices]}

    return IndexedRowsCollator(rows, DataCollatorWithPadding(make_tokenizer(["good", "bad", "film"]))), calls


def features(indexed: bool):
    ids = [[2, 5, 3], [2, 6, 7, 5, 3], [2, 3]]
    return [{"input_ids": row, **({CACHE_INDEX: index} if indexed else {})} for row, index in zip(ids, (7, 2, 4))]


def test_indexed_examples_get_their_rows_in_batch_order_and_lose_the_index():
    collate, calls = collator()
    batch = collate(features(indexed=True))
    assert CACHE_INDEX not in batch
    assert batch["input_ids"].shape == (3, 5) and batch["attention_mask"].sum(1).tolist() == [3, 5, 2]
    assert torch.equal(batch["teacher_logits"], KEPT[[7, 2, 4]])
    assert calls == [([7, 2, 4], (3, 5))]  # the rows see the padded batch


def test_examples_without_an_index_are_collated_as_they_are():
    collate, calls = collator()
    batch = collate(features(indexed=False))
    assert set(batch) == {"input_ids", "attention_mask"} and not calls
