"""CPU generation speed of one model at batch 1, in a process of its own so that its resident peak is its own:
prefill (one prompt of `prompt_tokens` tokens, tokens per second) and decode (`new_tokens` greedy tokens after it,
tokens per second, end of stream ignored), for a transformers folder (in its saved dtype or a quantized variant,
through `quant.schemes.variants.load_variant`) or a GGUF file in llama.cpp. The median over `repeats` runs counts.

    python -m quant.measure.generation_speed MODEL PROMPT_IDS_JSON NEW_TOKENS THREADS REPEATS

prints one JSON line: prefill_tokens_per_s, decode_tokens_per_s, peak_rss_mb (this program's own resident
high-water mark: `distill.core.probe.resident_peak_mb`), load_s."""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from distill.core.probe import resident_peak_mb, run_probe


def measure(model: str, prompt: list[int], new_tokens: int, threads: int, repeats: int) -> dict:
    """The probe itself (`speed` runs it in a subprocess)."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    run = gguf_runner(model, threads) if model.endswith(".gguf") else torch_runner(model)
    load_s = time.perf_counter() - start
    run(prompt[:8], 2)  # warm-up
    prefill, decode = [], []
    for _ in range(repeats):
        p, d = run(prompt, new_tokens)
        prefill.append(len(prompt) / p)
        decode.append(new_tokens / d)
    return {"prefill_tokens_per_s": statistics.median(prefill), "decode_tokens_per_s": statistics.median(decode),
            "peak_rss_mb": resident_peak_mb(), "load_s": load_s}


def torch_runner(folder: str):
    from distill.core.models import cache_keyword  # here, not at the top: a GGUF row's process never loads transformers
    from quant.schemes.variants import load_variant

    model = load_variant(folder).eval()
    name = cache_keyword(model)

    @torch.inference_mode()
    def run(prompt: list[int], new_tokens: int) -> tuple[float, float]:
        ids = torch.tensor([prompt])
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill = time.perf_counter() - start
        cache, token = out[name], out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(token, use_cache=True, **{name: cache})
            cache, token = out[name], out.logits[:, -1].argmax(-1, keepdim=True)
        return prefill, time.perf_counter() - start

    return run


def gguf_runner(path: str, threads: int):
    import llama_cpp

    llm = llama_cpp.Llama(path, n_ctx=4096, n_threads=threads, n_threads_batch=threads, n_batch=1024,
                          flash_attn=True, verbose=False)  # as llama.cpp serves it

    def run(prompt: list[int], new_tokens: int) -> tuple[float, float]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = llm.sample(temp=0.0, top_k=1)
            llm.eval([token])
        return prefill, time.perf_counter() - start

    return run


def speed(model: str | Path, prompt: list[int], new_tokens: int, threads: int, repeats: int) -> dict:
    """`measure` in a fresh process."""
    return run_probe([sys.executable, "-m", "quant.measure.generation_speed", str(model), json.dumps(prompt),
                      str(new_tokens), str(threads), str(repeats)])


if __name__ == "__main__":
    name, prompt_json, new, threads_arg, repeats_arg = sys.argv[1:6]
    print(json.dumps(measure(name, json.loads(prompt_json), int(new), int(threads_arg), int(repeats_arg))))
