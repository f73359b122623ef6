"""Batches that carry more than the model inputs: examples keep their row index (`cache_index`) through shuffling,
epochs and resume, and the collator adds what was kept for those rows (a teacher's cached logits or top-k rows)."""
from __future__ import annotations

from typing import Callable

import torch

CACHE_INDEX = "cache_index"


class IndexedRowsCollator:
    """Collates examples that carry their row index as `cache_index`: `collate` pads the rest, and `rows(indices,
    batch)` gives what was kept for those rows, added to the batch. Examples without the index (held-out splits) are
    collated as they are."""

    def __init__(self, rows: Callable[[list[int], dict], dict], collate: Callable[[list[dict]], dict]):
        self.rows, self.collate = rows, collate

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if CACHE_INDEX not in features[0]:
            return self.collate(features)
        indices = [feature[CACHE_INDEX] for feature in features]
        batch = self.collate([{name: value for name, value in feature.items() if name != CACHE_INDEX}
                              for feature in features])
        batch.update(self.rows(indices, batch))
        return batch
