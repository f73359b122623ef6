"""Offline models shipped in a form `from_pretrained` loads slowly (a quantized GGUF, dequantized at every load) are
converted once into a plain safetensors folder, with its tokenizer, under the conversion cache; later loads read
that folder.

The cache is `$DISTILL_COMPRESS_CACHE`, else `~/.cache/distill-compress`. A conversion writes into a folder of its
own beside the target and renames it into place when complete, so the target exists only whole: a killed
conversion leaves nothing that a later one would trust, and processes converting at once (one per rank) agree on
the first finished copy."""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.core.errors import ConfigError
from distill.core.intact import damage_blamed

CACHE_ENV = "DISTILL_COMPRESS_CACHE"

logger = logging.getLogger(__name__)

Convert = Callable[[Path], None]
"""Writes a complete model folder (weights, config, tokenizer) into the given empty path."""


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "distill-compress")


def converted_copy(name: str, convert: Convert) -> Path:
    """`cache_root()/name`, converted by `convert` on first use."""
    target = cache_root() / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        convert(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():  # not merely another process finishing first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def gguf_converter(folder: str, gguf_file: str) -> Convert:
    """Dequantize a causal LM's GGUF to float32 and save it as safetensors with its tokenizer."""
    def convert(out: Path) -> None:
        if importlib.util.find_spec("gguf") is None:
            raise ConfigError(f"converting {gguf_file} needs the gguf package: pip install 'gguf>=0.10'")
        start = time.perf_counter()
        with damage_blamed(Path(folder, gguf_file)):
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
        config = loaded.config
        # save_pretrained refuses a model loaded from GGUF: rebuild it as a plain model of the same config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file).save_pretrained(out)
        logger.warning("converted %s to safetensors in %.1f s (once: later loads read the copy)",
                       Path(folder, gguf_file), time.perf_counter() - start)

    return convert
