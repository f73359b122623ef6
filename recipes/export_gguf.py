"""Export a causal LM to GGUF for llama.cpp (F16, Q8_0, Q4_K_M, ...) with llama.cpp's own converter and
quantizer, and check every file in llama.cpp: greedy continuations against the transformers model, perplexity on the
held-out test texts.

    python recipes/export_gguf.py --config recipes/export_gguf.yaml [key.sub=value ...]
    python recipes/export_gguf.py --config recipes/export_gguf.yaml types=[f16,q4_k_m]

A bad config ends with one line, `config error: ...` (exit 2); add --debug for the traceback.
"""
import sys

from distill.core.cli import run_recipe
from quant.export.gguf import EXPORT_GGUF


def main(argv: list[str]) -> None:
    run_recipe(EXPORT_GGUF, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
