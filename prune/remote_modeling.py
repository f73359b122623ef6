"""Model classes for checkpoints whose Linears were pruned or factorised to shapes the stock config cannot express.

distill-compress copies this file next to config.json as `modeling_compressed.py` and appends one line per class
it maps in `config.auto_map`. `config.compression` lists, for modules inside the base model, the (in, out) shape of
every resized Linear and the rank of every factorised one. Load with `from_pretrained(path, trust_remote_code=True)`.
This file imports only torch and transformers so that it works without distill-compress installed."""
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


def apply_compression(base_model: nn.Module, spec: dict) -> None:
    for path, (in_features, out_features) in spec.get("linear_shapes", {}).items():
        set_submodule(base_model, path, resized_linear(base_model.get_submodule(path), in_features, out_features))
    for path, rank in spec.get("low_rank", {}).items():
        set_submodule(base_model, path, low_rank_linear(base_model.get_submodule(path), rank))


def compressed(cls: type) -> type:
    """A subclass of the stock class `cls` that reshapes its modules as `config.compression` says."""
    def __init__(self, config, *args, **kwargs):
        cls.__init__(self, config, *args, **kwargs)
        apply_compression(self.base_model, getattr(config, "compression", None) or {})

    return type(f"Compressed{cls.__name__}", (cls,), {"__init__": __init__})
