"""The report of a causal-LM pipeline: the teacher and every model the earlier stages saved (each quantized variant,
each GGUF file), measured side by side on the same held-out texts: validation and test perplexity, agreement of the
greedy next token with the teacher's, parameters, size on disk, and CPU generation speed at batch 1 (prefill of one
`speed.prompt_tokens`-token prompt, decode of `speed.new_tokens` tokens, each model in a process of its own so that
its resident peak is its own: `quant.measure.generation_speed`). GGUF files are measured in llama.cpp.

Written as `lm_report.json`, a Markdown table (`.md`) and a plot of perplexity against decode speed and against disk
size (`.png`). The pipeline's `report_lm` stage (`quant.stages`) writes them beside the served model, with its
GGUF files and card."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distill.core.errors import ConfigError
from distill.core.evaluate import count_parameters
from distill.core.models import load_causal_lm, load_tokenizer, resolve_model
from distill.lm.data import evaluation_texts
from quant.config import LMReportConfig
from quant.export.gguf import gguf_perplexity, loaded
from quant.measure.classifier_metrics import weight_memory
from quant.measure.compression_report import require_matplotlib
from quant.measure.generation_speed import speed
from quant.quantize_lm import greedy_next_tokens, text_perplexity
from quant.schemes.variants import load_variant

REPORT_NAME = "lm_report"
PLOT_FILE = f"{REPORT_NAME}.png"


@dataclass
class LMCandidate:
    """A model to measure: a transformers folder or a GGUF file, and the stage that saved it."""
    label: str
    stage: str
    kind: str
    path: Path

    @property
    def gguf(self) -> bool:
        return self.path.suffix == ".gguf"


def check_lm_report(cfg: LMReportConfig) -> None:
    for name in ("validation_examples", "test_examples", "eval_batch_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be at least 1; got {getattr(cfg, name)}")
    if cfg.speed.prompt_tokens < 1 or cfg.speed.new_tokens < 1 or cfg.speed.repeats < 1:
        raise ConfigError("speed.prompt_tokens, speed.new_tokens and speed.repeats must be at least 1")
    require_matplotlib()


def measure_candidates(cfg: LMReportConfig, candidates: list[LMCandidate]) -> list[dict]:
    tokenizer = load_tokenizer(cfg.teacher)
    texts = evaluation_texts(cfg, tokenizer)
    prompt = speed_prompt(texts["test"], cfg.speed.prompt_tokens)
    threads = cfg.speed.threads or torch.get_num_threads()
    reference = None
    rows = []
    for candidate in candidates:
        row = {"model": candidate.label, "stage": candidate.stage, "kind": candidate.kind, "path": str(candidate.path),
               **(measure_gguf(candidate.path, texts, threads) if candidate.gguf else measure_torch(candidate.path,
                                                                                                     texts))}
        predictions = row.pop("predictions")
        reference = predictions if reference is None else reference
        row["next_token_agreement"] = agreement(predictions, reference)
        row.update(speed(candidate.path, prompt, cfg.speed.new_tokens, threads, cfg.speed.repeats))
        rows.append(row)
    return rows


def measure_torch(path: Path, texts: dict) -> dict:
    model = load_variant(path).eval() if path.is_dir() else load_causal_lm(str(path), dtype=torch.float32).eval()
    return {"validation_perplexity": text_perplexity(model, texts["validation"]),
            "test_perplexity": text_perplexity(model, texts["test"]),
            "predictions": greedy_next_tokens(model, texts["test"]), "parameters": count_parameters(model),
            "weight_mb": weight_memory(model, [])["weight_mb"], "disk_mb": folder_mb(path)}


def measure_gguf(path: Path, texts: dict, threads: int) -> dict:
    with loaded(path, threads) as llm:
        predictions = []
        for ids in texts["test"]:
            llm.reset()
            llm.eval(ids)
            predictions.append(torch.from_numpy(np.asarray(llm.scores[:len(ids)]).argmax(-1)))
        return {"validation_perplexity": gguf_perplexity(llm, texts["validation"]),
                "test_perplexity": gguf_perplexity(llm, texts["test"]), "predictions": predictions,
                "parameters": None, "weight_mb": path.stat().st_size / 1e6, "disk_mb": path.stat().st_size / 1e6}


def agreement(predictions: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    same = sum((a == b).sum().item() for a, b in zip(predictions, reference))
    return same / max(sum(len(r) for r in reference), 1)


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 1e6


def speed_prompt(texts: list[list[int]], tokens: int) -> list[int]:
    """The test texts, concatenated and repeated, cut to `tokens` token ids: a prefill prompt of real text."""
    joined = [token for ids in texts for token in ids]
    return (joined * (tokens // max(len(joined), 1) + 1))[:tokens]


def markdown_table(rows: list[dict], prompt_tokens: int, new_tokens: int) -> str:
    base = rows[0]
    lines = [f"| model | stage kind | val. ppl | test ppl | next-token agreement | parameters | disk MB | "
             f"peak RSS MB | prefill tok/s ({prompt_tokens}) | decode tok/s ({new_tokens}) | decode speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        params = f"{row['parameters'] / 1e6:.1f}M" if row["parameters"] else "-"
        lines.append(f"| {row['model']} | {row['kind']} | {row['validation_perplexity']:.2f} | "
                     f"{row['test_perplexity']:.2f} | {row['next_token_agreement']:.2%} | {params} | "
                     f"{row['disk_mb']:.1f} | {row['peak_rss_mb']:.0f} | {row['prefill_tokens_per_s']:.0f} | "
                     f"{row['decode_tokens_per_s']:.1f} | "
                     f"{row['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    require_matplotlib().use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, cost, label in zip(axes, ("decode_tokens_per_s", "disk_mb"), ("decode tokens/s (batch 1, CPU)",
                                                                             "disk MB")):
        for i, row in enumerate(rows):
            point = (row[cost], row["test_perplexity"])
            axis.scatter(*point, marker="*" if i == 0 else "o", s=160 if i == 0 else 40,
                         color="tab:red" if i == 0 else ("tab:green" if row["path"].endswith(".gguf") else "tab:blue"))
            axis.annotate(row["model"], point, textcoords="offset points", xytext=(5, 4), fontsize=8)
        axis.set_xlabel(label)
        axis.set_ylabel("test perplexity (lower is better)")
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
    figure.suptitle("Perplexity against decode speed and size (red star: teacher; green: GGUF in llama.cpp)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_lm_report(rows: list[dict], folder: Path, header: dict, speed_cfg) -> str:
    (folder / f"{REPORT_NAME}.json").write_text(json.dumps({**header, "reference": rows[0]["model"], "rows": rows},
                                                           indent=2))
    table = markdown_table(rows, speed_cfg.prompt_tokens, speed_cfg.new_tokens)
    (folder / f"{REPORT_NAME}.md").write_text(f"# LM compression report\n\n{table}\n")
    plot(rows, folder / PLOT_FILE)
    return table


def lm_candidates(cfg: LMReportConfig, earlier) -> list[LMCandidate]:
    """The teacher, then every model the stages saved, in order (the served model last if no stage saved it)."""
    found = [LMCandidate("teacher", "-", "-", Path(resolve_model(cfg.teacher)))]
    found += [LMCandidate(stage.name if len(stage.models) == 1 else f"{stage.name}/{name}", stage.name,
                          stage.kind_name, path) for stage in earlier for name, path in stage.models.items()]
    if all(candidate.path != Path(cfg.model) for candidate in found):
        found.append(LMCandidate("served", "-", "-", Path(cfg.model)))
    return found
