"""Embedding compression: int8 storage with one scale per row, and low-rank factorization by truncated SVD.

int8: each row w becomes round(w / s) with s = max|w| / 127 (symmetric), so every element is off by at most s/2.
Low rank: W (rows x width) ~ U_r S_r V_r^T becomes a thin embedding U_r sqrt(S_r) (rows x r) and a projection
sqrt(S_r) V_r^T (a Linear r -> width, no bias). With both, the thin embedding is the one stored as int8.

The modules are `remote_modeling.Int8Embedding` and `LowRankEmbedding`; `saving.save_compressed` records them in
`config.compression`, so the checkpoint reloads with `from_pretrained`. Paths are relative to `model.base_model`."""
from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from distill.core.errors import ConfigError
from prune.remote_modeling import (
    Int8Embedding,
    LowRankEmbedding,
    int8_embedding_like,
    low_rank_embedding_like,
    set_submodule,
)

INT8_MAX = 127


def compress_word_embedding(model: PreTrainedModel, int8: bool = False, rank: int | None = None) -> dict:
    """Factorize the word embedding to `rank` (if given), then store it (or its thin half) as int8 (if asked).
    Returns what was done: `{"low_rank_embeddings": {path: rank}, "int8_embeddings": [path]}`."""
    path, embedding = word_embedding_path(model)
    done = {}
    if rank is not None:
        check_rank(rank, embedding)
        set_submodule(model.base_model, path, factorized_embedding(embedding, rank))
        done["low_rank_embeddings"] = {path: rank}
        path, embedding = f"{path}.embed", model.base_model.get_submodule(f"{path}.embed")
    if int8:
        set_submodule(model.base_model, path, quantized_embedding(embedding))
        done["int8_embeddings"] = [path]
    return done


def word_embedding_path(model: PreTrainedModel) -> tuple[str, nn.Embedding]:
    """The input embedding and its path from the base model; refused when an output layer is tied to it."""
    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    if type(embedding) is not nn.Embedding:
        raise ConfigError(f"embedding compression needs the word embedding as a plain nn.Embedding; got "
                          f"{type(embedding).__name__} (is it compressed already?)")
    if output is not None and output.weight is embedding.weight:
        raise ConfigError(f"{type(model).__name__} ties its output layer to the word embedding; embedding "
                          "compression supports untied models only")
    return next(path for path, module in model.base_model.named_modules() if module is embedding), embedding


def check_rank(rank: int, embedding: nn.Embedding) -> None:
    full = min(embedding.num_embeddings, embedding.embedding_dim)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise ConfigError(f"embeddings.rank must be an integer from 1 to {full} (the embedding's full rank); "
                          f"got {rank!r}")


@torch.no_grad()
def quantized_embedding(embedding: nn.Embedding) -> Int8Embedding:
    """`embedding` as int8 rows with per-row scales max|row| / 127 (an all-zero row gets scale 1)."""
    weight = embedding.weight.detach().float()
    scale = weight.abs().amax(dim=1) / INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantized = int8_embedding_like(embedding)
    quantized.weight_int8.copy_(torch.round(weight / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8))
    quantized.scale.copy_(scale.to(quantized.scale.dtype))
    return quantized


@torch.no_grad()
def factorized_embedding(embedding: nn.Embedding, rank: int) -> LowRankEmbedding:
    """`embedding` as thin embedding x projection holding its truncated SVD, sqrt(S) on each side."""
    u, s, vh = torch.linalg.svd(embedding.weight.detach().float(), full_matrices=False)
    root = s[:rank].sqrt()
    factorized = low_rank_embedding_like(embedding, rank)
    factorized.embed.weight.copy_((u[:, :rank] * root).to(embedding.weight.dtype))
    factorized.project.weight.copy_((vh[:rank].T * root).to(embedding.weight.dtype))
    return factorized
