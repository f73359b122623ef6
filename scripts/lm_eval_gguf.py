"""lm-evaluation-harness on a causal LM and on its F16 GGUF file (made here with llama.cpp's converter), the same
tasks and documents: the GGUF file should score as the transformers model does, to within an example.

    python scripts/lm_eval_gguf.py [--model offline:SmolLM2-135M-Instruct] [--limit 200] [--out runs/lm-eval-gguf]

Prints, per model, each task's metrics and document count and the seconds lm-eval took; lm-eval's own results JSON
goes to `--out`/<hf|gguf>/."""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from distill.core.cli import config_errors, split_debug
from distill.core.models import load_causal_lm, load_tokenizer, resolve_model
from quant.export.gguf import convert, loaded
from quant.measure.lm_eval import DEFAULT_TASKS, check_tasks, hf_lm, run_lm_eval, task_metrics


def timed(lm, tasks: list[str], folder: Path, limit: int) -> dict:
    start = time.perf_counter()
    metrics = task_metrics(run_lm_eval(lm, tasks, folder, limit))
    return {"tasks": metrics, "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str]) -> None:
    debug, argv = split_debug(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="offline:SmolLM2-135M-Instruct")
    parser.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS)
    parser.add_argument("--limit", type=int, default=200, help="documents per task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("runs/lm-eval-gguf"))
    args = parser.parse_args(argv)
    with config_errors(debug):
        check_tasks(args.tasks)
        folder = Path(resolve_model(args.model))
        tokenizer = load_tokenizer(str(folder))
        torch.set_num_threads(args.threads)
        args.out.mkdir(parents=True, exist_ok=True)
        gguf = args.out / "model-f16.gguf"
        convert(folder, gguf, "f16")
        model = load_causal_lm(str(folder), dtype=torch.float32).eval()
        results = {"hf": timed(hf_lm(model, tokenizer, args.batch_size), args.tasks, args.out / "hf", args.limit)}
        del model
        from quant.measure.lm_eval_llama_cpp import LlamaCppLM

        with loaded(gguf, args.threads) as llm:
            results["gguf_f16"] = timed(LlamaCppLM(llm, tokenizer), args.tasks, args.out / "gguf", args.limit)
        print(json.dumps({"model": args.model, "threads": args.threads, **results}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
