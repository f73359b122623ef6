"""GGUF export of a causal LM for llama.cpp (and the engines built on it: Ollama, LM Studio), through llama.cpp's own
tools: its converter `convert_hf_to_gguf.py` (with its `gguf-py`, unpacked from the llama-cpp-python source
distribution by scripts/setup.sh) writes F32, F16, BF16 and Q8_0; its quantizer (`llama_model_quantize`, through the
`llama_cpp` bindings) makes every other type (Q4_0, Q4_K_M, ...) from the F16 file. Each file is then checked in
llama.cpp itself: its greedy continuation of fixed prompts against the transformers model's (token by token), and its
perplexity on the test texts beside the transformers model's on the same token ids.

Outputs in `output_dir`: `config.yaml`, `model-<type>.gguf` per type (each written beside, then renamed into place)
and `metrics.json`."""
from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.core.conversion_cache import cache_root
from distill.core.errors import ConfigError, did_you_mean, require_package
from distill.core.io import write_json_atomic
from distill.core.jobs import Job, register_job
from distill.core.models import is_compressed, load_causal_lm, load_tokenizer, resolve_model
from distill.core.run import RunResult, continues, open_run
from distill.lm.data import calibration_ids, evaluation_texts
from quant.config import GgufConfig
from quant.export.imatrix import QuantizerMatrix, activation_importance, gguf_named
from quant.measure.divergence import divergence_summary, log_softmax, token_divergences

CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
"""Types llama.cpp's converter writes itself; the quantizer makes the others from F16."""
GGUF_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
logger = logging.getLogger(__name__)
LLAMA_CPP_INSTALL = "bash scripts/setup.sh (it builds llama-cpp-python once and caches the wheel)"
IMATRIX_TOKENS = 512
"""Fewest calibration tokens for an importance matrix: one chunk of `llama-imatrix`'s default size."""
SLIDING_PERIOD = {"gemma2": 2, "gemma3_text": 6}
"""The layout llama.cpp assumes for these families: layer i attends through the sliding window unless i + 1 is a
multiple of the period. Its converter writes the window's size, not which layers use it, so `layer_types` is lost."""


# ----- llama.cpp's tools ----------------------------------------------------------------------------------------
def llama_cpp():
    return require_package("llama_cpp", "GGUF export and its checks need llama.cpp's bindings,", LLAMA_CPP_INSTALL)


def quantizer_types() -> dict[str, int]:
    """Every type llama.cpp's quantizer knows, by lower-case name (`q4_k_m`), and its ftype number."""
    module = llama_cpp()
    prefix = "LLAMA_FTYPE_MOSTLY_"
    return {name[len(prefix):].lower(): getattr(module, name) for name in dir(module) if name.startswith(prefix)}


def converter_folder() -> Path:
    """Where scripts/setup.sh unpacked llama.cpp's converter for the installed bindings' version."""
    return cache_root() / f"llama.cpp-{llama_cpp().__version__}"


def check_gguf_types(types: list[str]) -> None:
    if not types:
        raise ConfigError("types lists nothing; e.g. types=[f16,q8_0,q4_k_m]")
    known = {*CONVERTER_TYPES, *quantizer_types()}
    for name in types:
        if name not in known:
            raise ConfigError(f"types: llama.cpp knows no GGUF type '{name}'; {did_you_mean(name, sorted(known))}")
    if len(set(types)) < len(types):
        raise ConfigError(f"types lists a type twice: {types}")


def check_exportable(model: str) -> None:
    """A stock architecture of a family the converter handles (and that this project tests), before any work. A model
    that does not exist yet (an earlier pipeline stage's) is checked when the export runs."""
    if not Path(model).exists() and (model.count("/") > 1 or model.startswith((".", "/", "~"))):
        return
    path = resolve_model(model)
    config_file = Path(path, "config.json")
    if not config_file.is_file():
        return  # a Hub id: its config is read when it loads
    config = json.loads(config_file.read_text())
    if is_compressed(path):
        raise ConfigError(f"{model} has per-layer shapes (config.compression, modeling code of this framework) that "
                          "llama.cpp cannot run: GGUF export needs uniform widths (prune with width.uniform: true)")
    family = config.get("model_type")
    if family not in GGUF_FAMILIES:
        raise ConfigError(f"GGUF export supports the families {', '.join(GGUF_FAMILIES)}; '{family}' is not one of "
                          "them")
    check_window_layout(config, model)


def window_matters(config: dict) -> bool:
    """Whether the sliding window is shorter than the context, so that which layers use it changes the outputs."""
    window, context = config.get("sliding_window"), config.get("max_position_embeddings")
    return window is not None and (context is None or window < context)


def check_window_layout(config: dict, model: str) -> None:
    """A Gemma whose `layer_types` are not the layout llama.cpp assumes (after dropping layers, say) is refused: its
    GGUF would attend differently from the model on every text longer than the window."""
    period = SLIDING_PERIOD.get(config.get("model_type"))
    layer_types = config.get("layer_types")
    if period is None or not layer_types or not window_matters(config):
        return
    assumed = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(len(layer_types))]
    differ = [i for i, (kind, expected) in enumerate(zip(layer_types, assumed)) if kind != expected]
    if differ:
        raise ConfigError(f"llama.cpp runs {config['model_type']} with every {period}th layer on full attention and "
                          f"the others on the sliding window, whatever layer_types says; layers {differ} of {model} "
                          f"differ, so its GGUF would attend differently beyond {config['sliding_window']} tokens "
                          "(drop layers in whole periods to keep the layout)")


def ignored_window(config: dict) -> Optional[str]:
    """What llama.cpp leaves out of a Mistral's or Qwen's sliding window (it attends to the whole context there), or
    None. Texts within the window run alike, so this is reported, not refused."""
    family = config.get("model_type")
    if family == "mistral" and window_matters(config):
        return (f"llama.cpp ignores Mistral's sliding_window={config['sliding_window']}: on longer texts its GGUF "
                "attends to the whole context")
    if family in ("qwen2", "qwen3") and config.get("use_sliding_window") and window_matters(config):
        return (f"llama.cpp ignores {family}'s use_sliding_window (window {config['sliding_window']}): on longer "
                "texts its GGUF attends to the whole context")
    return None


def convert(model_dir: Path, out: Path, outtype: str) -> None:
    """llama.cpp's converter, in a process of its own, into `out` (written beside it, then renamed)."""
    script = converter_folder() / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise ConfigError(f"llama.cpp's converter is not at {script}: {LLAMA_CPP_INSTALL}")
    tmp = out.with_suffix(".tmp")
    # the converter puts its own gguf-py ahead of the installed `gguf` unless NO_LOCAL_GGUF is set
    env = {name: value for name, value in os.environ.items() if name != "NO_LOCAL_GGUF"}
    done = subprocess.run([sys.executable, str(script), str(model_dir), "--outfile", str(tmp), "--outtype", outtype],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {model_dir} ({outtype}):\n{tail}")
    os.replace(tmp, out)


def quantize(source: Path, out: Path, ftype: int, threads: int, matrix: Optional[dict[str, np.ndarray]] = None
             ) -> None:
    """llama.cpp's quantizer (the library function its quantize tool calls), weighing each column by `matrix` (the
    importance matrix, by GGUF tensor name) when given."""
    module = llama_cpp()
    params = module.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, threads
    entries = None  # holds the matrix's C array and its data until the quantizer returns
    if matrix is not None:
        entries = QuantizerMatrix.of(module, matrix)
        params.imatrix = entries.pointer(module)
    tmp = out.with_suffix(".tmp")
    with native_output_captured() as captured:
        failed = module.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params)) != 0
    if failed:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {out.name}:\n{captured[0][-2000:]}")
    os.replace(tmp, out)


@contextlib.contextmanager
def native_output_captured():
    """The process's stdout and stderr (where llama.cpp's C code prints a line per tensor) go to a temporary file
    inside the block; the yielded list holds what was printed, once the block ends."""
    printed: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield printed
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            printed.append(sink.read())


@contextlib.contextmanager
def loaded(path: Path, threads: int, context: int = 2048):
    """A llama.cpp model (every position's logits kept), closed on exit, with flash attention as llama.cpp's own
    tools and server run it (llama-cpp-python turns it off). It also makes a few tokens' logits in one batch equal
    those one token at a time, for Q8_0 weights at least, which lossless speculative decoding needs."""
    model = llama_cpp().Llama(str(path), n_ctx=context, n_threads=threads, n_threads_batch=threads, logits_all=True,
                              flash_attn=True, verbose=False)
    try:
        yield model
    finally:
        model.close()


# ----- checks in llama.cpp ----------------------------------------------------------------------------------------
def greedy_ids(llm, prompt_ids: list[int], new_tokens: int) -> list[int]:
    llm.reset()
    ids = []
    for token in llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
        ids.append(int(token))
        if len(ids) == new_tokens:
            break
    return ids


def gguf_logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `ids`, (positions, vocabulary)."""
    llm.reset()
    llm.eval(ids)
    return np.asarray(llm.scores[:len(ids)], dtype=np.float64)


def text_nll(logits: np.ndarray, ids: list[int]) -> float:
    """The summed next-token NLL of a text from its logits at every position."""
    return -float(log_softmax(logits)[np.arange(len(ids) - 1), ids[1:]].sum())


def predicted_tokens(texts: list[list[int]]) -> int:
    return max(sum(len(ids) - 1 for ids in texts), 1)


def scores_perplexity(logits: Iterable[np.ndarray], texts: list[list[int]]) -> float:
    """exp of the mean next-token NLL over `texts` (token ids), from each text's llama.cpp logits (float32 or float64:
    the NLL is summed in float64 either way)."""
    return math.exp(sum(text_nll(rows, ids) for rows, ids in zip(logits, texts)) / predicted_tokens(texts))


@torch.no_grad()
def torch_greedy_ids(model: PreTrainedModel, prompt_ids: list[int], new_tokens: int) -> list[int]:
    inputs = torch.tensor([prompt_ids])
    output = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, pad_token_id=model.config.eos_token_id)
    return output[0, len(prompt_ids):].tolist()


@torch.inference_mode()
def gguf_scores(llms: dict, model: PreTrainedModel, texts: list[list[int]]) -> dict[str, dict[str, float]]:
    """Per llama.cpp model of `llms`, from one pass over each text: its test perplexity, and its next-token
    distributions against the transformers model's on the same ids, at every position that predicts a token of the
    text (`quant.measure.divergence`). The transformers model runs once per text, whatever the number of files."""
    nll, kls, same = dict.fromkeys(llms, 0.0), {name: [] for name in llms}, {name: [] for name in llms}
    for ids in tqdm(texts, desc="checking in llama.cpp", unit="text"):
        reference = model(torch.tensor([ids])).logits[0, :-1].double().numpy()
        for name, llm in llms.items():
            logits = gguf_logits(llm, ids)
            nll[name] += text_nll(logits, ids)
            kl, agree = token_divergences(reference, logits[:-1])
            kls[name].append(kl)
            same[name].append(agree)
    return {name: {"test_perplexity": math.exp(nll[name] / predicted_tokens(texts)),
                   **divergence_summary(kls[name], same[name])} for name in llms}


@torch.no_grad()
def torch_perplexity(model: PreTrainedModel, texts: list[list[int]]) -> float:
    nll, count = 0.0, 0
    for ids in texts:
        logits = model(torch.tensor([ids])).logits[0].double()
        nll -= torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item()
        count += len(ids) - 1
    return math.exp(nll / max(count, 1))


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[list[int]]:
    return [tokenizer(prompt, add_special_tokens=True)["input_ids"] for prompt in prompts]


# ----- the job ----------------------------------------------------------------------------------------------------
def check_gguf(cfg: GgufConfig) -> None:
    check_gguf_types(cfg.types)
    check_exportable(cfg.model)
    if cfg.calibration is not None and (cfg.calibration.examples < 1 or cfg.calibration.batch_size < 1):
        raise ConfigError("calibration.examples and calibration.batch_size must be at least 1")
    for name in ("validation_examples", "test_examples", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be at least 1; got {getattr(cfg, name)}")
    if cfg.eval_examples is not None and cfg.eval_examples < 1:
        raise ConfigError(f"eval_examples must be at least 1 (or null: all); got {cfg.eval_examples}")
    if not cfg.prompts:
        raise ConfigError("prompts lists nothing: the greedy check needs at least one")


def export_gguf(cfg: GgufConfig) -> RunResult:
    """Convert (and quantize) each type, then check every file in llama.cpp against the transformers model."""
    check_gguf(cfg)
    tokenizer = load_tokenizer(cfg.model)
    calibration = calibration_texts(cfg, tokenizer)
    keep = continues(cfg)
    run_dir = open_run(cfg)
    threads = cfg.threads or torch.get_num_threads()
    model_dir = Path(resolve_model(cfg.model))
    model = load_causal_lm(cfg.model, dtype=torch.float32).eval()
    matrix = None
    if calibration:
        importance, tokens = activation_importance(model, calibration)
        matrix = gguf_named(importance, model.config.model_type, model.config.num_hidden_layers)
    files = write_files(cfg, model_dir, run_dir, threads, matrix, keep)
    texts = evaluation_texts(cfg, tokenizer)["test"]
    prompts = prompt_ids(tokenizer, cfg.prompts)
    expected = [torch_greedy_ids(model, ids, cfg.max_new_tokens) for ids in prompts]
    rows = {"transformers_fp32": {"test_perplexity": torch_perplexity(model, texts)}}
    with contextlib.ExitStack() as stack:
        llms = {name: stack.enter_context(loaded(path, threads)) for name, path in files.items()}
        scores = gguf_scores(llms, model, texts)
        for name, llm in llms.items():
            got = [greedy_ids(llm, ids, cfg.max_new_tokens) for ids in prompts]
            rows[name] = {"file": files[name].name, "disk_mb": files[name].stat().st_size / 1e6,
                          "imatrix": matrix is not None and name not in CONVERTER_TYPES, **scores[name],
                          "greedy_equal": got == expected,
                          "greedy_token_agreement": agreement(got, expected),
                          "tokenizer_equal": [llm.tokenize(p.encode(), add_bos=False, special=True) for p in
                                              cfg.prompts] == [strip_bos(ids, tokenizer) for ids in prompts]}
    metrics = {"model": cfg.model, "threads": threads, "texts": len(texts), "prompts": cfg.prompts,
               "new_tokens": cfg.max_new_tokens, "llama_cpp": llama_cpp().__version__, "types": rows,
               "imatrix": {"texts": len(calibration), "tokens": tokens, "tensors": len(matrix)} if matrix else None}
    caveat = ignored_window(model.config.to_dict())
    if caveat:
        logger.warning(caveat)
        metrics["llama_cpp_caveat"] = caveat
    write_json_atomic(metrics, run_dir / "metrics.json")
    return RunResult(model, metrics, run_dir)


def calibration_texts(cfg: GgufConfig, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """The importance matrix's texts (the first training texts, as pruning's calibration), or none: no calibration
    section, or no type that the quantizer makes. Too few tokens are refused before the model loads."""
    if cfg.calibration is None or all(name in CONVERTER_TYPES for name in cfg.types):
        return []
    texts = calibration_ids(cfg, tokenizer)
    tokens = sum(len(ids) for ids in texts)
    if tokens < IMATRIX_TOKENS:
        raise ConfigError(f"calibration has {tokens} tokens ({len(texts)} texts of at most {cfg.data.max_length}); "
                          f"an importance matrix needs at least {IMATRIX_TOKENS}: raise calibration.examples or "
                          "data.max_length")
    return texts


def check_matrix_names(f16: Path, matrix: dict[str, np.ndarray]) -> None:
    """Every name of the importance matrix is a tensor of the converted file, with as many columns: a name the
    quantizer does not find would leave that tensor unweighted without a word."""
    gguf = require_package("gguf", "the importance matrix needs", LLAMA_CPP_INSTALL)
    shapes = {tensor.name: int(tensor.shape[0]) for tensor in gguf.GGUFReader(f16).tensors}
    wrong = [name for name, values in matrix.items() if shapes.get(name) != values.size]
    if wrong:
        raise RuntimeError(f"importance-matrix entries that match no tensor of {f16.name} in name and width: {wrong}")


def write_files(cfg: GgufConfig, model_dir: Path, run_dir: Path, threads: int,
                matrix: Optional[dict[str, np.ndarray]] = None, keep: bool = False) -> dict[str, Path]:
    """Each type's file, F16 first when a quantizer type needs it; the quantizer's types weighed by `matrix` when
    given. With `keep` (a rerun of the same config) files already written are kept: the rerun resumes; without it,
    files of an earlier run of another config are written again."""
    files = {name: run_dir / f"model-{name}.gguf" for name in cfg.types}
    if not keep:
        for path in [*files.values(), run_dir / "model-f16.gguf"]:
            path.unlink(missing_ok=True)
    quantized = [name for name in cfg.types if name not in CONVERTER_TYPES]
    f16 = files.get("f16", run_dir / "model-f16.gguf")
    needed = [*(["f16"] if quantized else []), *(name for name in cfg.types if name in CONVERTER_TYPES)]
    for name in dict.fromkeys(needed):
        path = files.get(name, f16)
        if not path.is_file():
            convert(model_dir, path, name)
    ftypes = quantizer_types()
    if matrix is not None and quantized:
        check_matrix_names(f16, matrix)
    for name in quantized:
        if not files[name].is_file():
            quantize(f16, files[name], ftypes[name], threads, matrix)
    if "f16" not in cfg.types and f16.exists():
        f16.unlink()
    return files


def agreement(got: list[list[int]], expected: list[list[int]]) -> float:
    """The share of positions where the two greedy continuations agree, up to their first difference."""
    same = total = 0
    for a, b in zip(got, expected):
        total += len(b)
        for x, y in zip(a, b):
            if x != y:
                break
            same += 1
    return same / max(total, 1)


def strip_bos(ids: list[int], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return ids[1:] if ids and ids[0] == tokenizer.bos_token_id and tokenizer.bos_token_id is not None else ids


def gguf_summary(cfg: GgufConfig, result: RunResult) -> dict:
    return {"files": {name: str(result.run_dir / row["file"]) for name, row in result.metrics["types"].items()
                      if "file" in row}, **result.metrics}


EXPORT_GGUF = register_job(Job("export_gguf", GgufConfig, check_gguf, export_gguf, gguf_summary))
