"""Model classes for checkpoints whose Linears or embeddings were pruned, factorised or quantized to shapes the
stock config cannot express.

distill-compress copies this file next to config.json as `modeling_compressed.py` and appends one line per class
it maps in `config.auto_map`. `config.compression` lists, for modules inside the base model, the (in, out) shape of
every resized Linear, the rank of every factorised Linear (`low_rank`) and embedding (`low_rank_embeddings`), and
the embeddings stored as int8 (`int8_embeddings`). Load with `from_pretrained(path, trust_remote_code=True)`.
This file imports only torch and transformers so that it works without distill-compress installed."""
from __future__ import annotations

import torch
import transformers  # noqa: F401  (the appended class lines use it)
from torch import nn


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def resized_linear(like: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=like.bias is not None,
                     dtype=like.weight.dtype, device=like.weight.device)


def low_rank_linear(like: nn.Linear, rank: int) -> nn.Sequential:
    """`like` as two thinner Linears: in -> rank (no bias), rank -> out (with `like`'s bias)."""
    factory = {"dtype": like.weight.dtype, "device": like.weight.device}
    return nn.Sequential(nn.Linear(like.in_features, rank, bias=False, **factory),
                         nn.Linear(rank, like.out_features, bias=like.bias is not None, **factory))


class Int8Embedding(nn.Module):
    """An embedding stored as int8 with one float scale per row (symmetric: row ~ weight_int8 * scale); `forward`
    dequantizes only the rows it looks up. The int8 matrix is a frozen parameter, so parameter counts still
    include it; the scales are a buffer."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.weight_int8 = nn.Parameter(torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device),
                                        requires_grad=False)
        self.register_buffer("scale", torch.ones(num_embeddings, dtype=dtype, device=device))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.weight_int8[input].to(self.scale.dtype) * self.scale[input].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}"


class LowRankEmbedding(nn.Module):
    """An embedding factorised as a thin embedding (num_embeddings x rank) followed by a projection to the
    embedding width (a Linear rank -> embedding_dim without bias)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, padding_idx: int | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.embed = nn.Embedding(num_embeddings, rank, padding_idx=padding_idx, dtype=dtype, device=device)
        self.project = nn.Linear(rank, embedding_dim, bias=False, dtype=dtype, device=device)

    @property
    def rank(self) -> int:
        return self.project.in_features

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.project(self.embed(input))


def int8_embedding_like(like: nn.Embedding) -> Int8Embedding:
    return Int8Embedding(like.num_embeddings, like.embedding_dim, like.padding_idx,
                         dtype=like.weight.dtype, device=like.weight.device)


def low_rank_embedding_like(like: nn.Embedding, rank: int) -> LowRankEmbedding:
    return LowRankEmbedding(like.num_embeddings, like.embedding_dim, rank, like.padding_idx,
                            dtype=like.weight.dtype, device=like.weight.device)


def apply_compression(base_model: nn.Module, spec: dict) -> None:
    """Reshape `base_model` as `spec` says; low-rank embeddings come before int8 ones, which may be their halves."""
    for path, (in_features, out_features) in spec.get("linear_shapes", {}).items():
        set_submodule(base_model, path, resized_linear(base_model.get_submodule(path), in_features, out_features))
    for path, rank in spec.get("low_rank", {}).items():
        set_submodule(base_model, path, low_rank_linear(base_model.get_submodule(path), rank))
    for path, rank in spec.get("low_rank_embeddings", {}).items():
        set_submodule(base_model, path, low_rank_embedding_like(base_model.get_submodule(path), rank))
    for path in spec.get("int8_embeddings", []):
        set_submodule(base_model, path, int8_embedding_like(base_model.get_submodule(path)))


def compressed(cls: type) -> type:
    """A subclass of the stock class `cls` that reshapes its modules as `config.compression` says."""
    def __init__(self, config, *args, **kwargs):
        cls.__init__(self, config, *args, **kwargs)
        apply_compression(self.base_model, getattr(config, "compression", None) or {})

    return type(f"Compressed{cls.__name__}", (cls,), {"__init__": __init__})
