"""The report of a causal-LM pipeline: the teacher and every model the earlier stages saved (each quantized variant,
each GGUF file), measured side by side on the same held-out texts: test perplexity, agreement of the
greedy next token with the teacher's, generation quality (the share of greedy completions of the test texts'
openings that loop, their distinct-2 and mean length), parameters, size on disk, CPU generation speed at batch 1
(prefill of one `speed.prompt_tokens`-token prompt, decode of `speed.new_tokens` tokens, each model in a process of
its own so that its resident peak is its own: `quant.measure.generation_speed`), and the `lm_eval` tasks of
lm-evaluation-harness on each model (`quant.measure.lm_eval`; lm-eval's own results JSON in `lm_eval/<model>/`).
GGUF files are measured in llama.cpp.

Written as `lm_report.json`, a Markdown table (`.md`) and a plot of perplexity against decode speed and against disk
size (`.png`). The pipeline's `report_lm` stage (`quant.stages`) writes them beside the served model, with its
GGUF files and card."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from distill.core.errors import ConfigError
from distill.core.evaluate import count_parameters
from distill.core.gate import check_gate
from distill.core.models import ensure_pad_token, load_causal_lm, load_tokenizer, resolve_model
from distill.lm.acceptance import LogitsOf, TargetPaths, model_logits, paths_acceptance, target_paths
from distill.lm.data import evaluation_texts, text_prompts
from distill.lm.metrics import generation_scores
from distill.lm.sampling import SamplingConfig, complete, stop_tokens, until_stop
from quant.config import BudgetConfig, LMReportConfig
from quant.export.gguf import gguf_logits, greedy_ids, loaded, scores_perplexity
from quant.measure.classifier_metrics import weight_memory
from quant.measure.compression_report import pareto_front, require_matplotlib
from quant.measure.generation_speed import speed
from quant.measure.lm_eval import check_tasks, hf_lm, run_lm_eval, task_metrics
from quant.measure.divergence import token_divergences
from quant.quantize_lm import logits_of, logits_perplexity
from quant.schemes.variants import load_variant

REPORT_NAME = "lm_report"
PLOT_FILE = f"{REPORT_NAME}.png"
FIGURES = ["test_perplexity", "next_token_agreement", "kld_mean", "kld_p99", "parameters",
           "weight_mb", "disk_mb", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_mb"]
"""The figures of every row, which a gate may name."""
COMPLETION_FIGURES = ["test_loop_share", "test_completion_distinct_2", "test_completion_tokens"]
"""The figures of the greedy completions (`completions`), when they are measured."""
DRAFT_FIGURES = ["draft_alpha", "draft_tokens_per_pass"]
"""Each model as the teacher's speculative-decoding draft (`completions.draft_prompts`), when measured."""


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


@dataclass
class Openings:
    """The test texts' openings that every model completes greedily, and how."""
    prompts: list[list[int]]
    max_new_tokens: int
    stops: set[int] = field(default_factory=set)
    pad_id: int = 0
    batch_size: int = 8
    paths: Optional[TargetPaths] = None
    """The teacher's greedy continuations of the first openings, on which each model is scored as its draft."""
    draft_k: int = 4

    def draft_figures(self, logits_of: LogitsOf) -> dict[str, float]:
        """A model's acceptance as the teacher's draft (`DRAFT_FIGURES`); {} when not measured."""
        if self.paths is None:
            return {}
        metrics = paths_acceptance(self.paths, logits_of, [self.draft_k])
        return {"draft_alpha": metrics["alpha"],
                "draft_tokens_per_pass": metrics["per_k"][self.draft_k]["greedy_tokens_per_pass"]}


def check_lm_report(cfg: LMReportConfig) -> None:
    for name in ("validation_examples", "test_examples", "eval_batch_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be at least 1; got {getattr(cfg, name)}")
    if cfg.speed.prompt_tokens < 1 or cfg.speed.new_tokens < 1 or cfg.speed.repeats < 1:
        raise ConfigError("speed.prompt_tokens, speed.new_tokens and speed.repeats must be at least 1")
    completions = cfg.completions
    if completions.prompts < 0 or completions.prompt_tokens < 1 or completions.max_new_tokens < 1:
        raise ConfigError("completions.prompts must be at least 0, completions.prompt_tokens and "
                          "completions.max_new_tokens at least 1")
    if completions.draft_prompts < 0 or completions.draft_k < 1:
        raise ConfigError(f"completions.draft_prompts must be at least 0 and completions.draft_k at least 1; got "
                          f"{completions.draft_prompts} and {completions.draft_k}")
    check_gate(cfg.gate, FIGURES + (COMPLETION_FIGURES if completions.prompts else []) +
               (DRAFT_FIGURES if min(completions.prompts, completions.draft_prompts) else []))
    if cfg.lm_eval is not None:
        if (cfg.lm_eval.limit is not None and cfg.lm_eval.limit < 1) or cfg.lm_eval.batch_size < 1:
            raise ConfigError(f"lm_eval.limit and lm_eval.batch_size must be at least 1; got {cfg.lm_eval.limit} and "
                              f"{cfg.lm_eval.batch_size}")
        check_tasks(cfg.lm_eval.tasks)
    require_matplotlib()


def measure_candidates(cfg: LMReportConfig, candidates: list[LMCandidate]) -> list[dict]:
    tokenizer = ensure_pad_token(load_tokenizer(cfg.teacher))
    texts = evaluation_texts(cfg, tokenizer)
    prompt = speed_prompt(texts["test"], cfg.speed.prompt_tokens)
    threads = cfg.speed.threads or torch.get_num_threads()
    completions = cfg.completions
    openings = Openings(text_prompts(texts["test"][:completions.prompts], completions.prompt_tokens),
                        completions.max_new_tokens, stop_tokens(tokenizer), tokenizer.pad_token_id,
                        cfg.eval_batch_size, draft_k=completions.draft_k)
    if min(completions.prompts, completions.draft_prompts):
        openings.paths = target_paths(load_causal_lm(cfg.teacher, dtype=torch.float32).eval(),
                                      openings.prompts[:completions.draft_prompts], completions.max_new_tokens)
    reference = None
    rows = []
    for candidate in tqdm(candidates, desc="measuring models", unit="model"):
        harness = harness_of(cfg, tokenizer, candidate.label)
        row = {"model": candidate.label, "stage": candidate.stage, "kind": candidate.kind, "path": str(candidate.path),
               **(measure_gguf(candidate.path, texts, threads, openings, harness) if candidate.gguf
                  else measure_torch(candidate.path, texts, openings, harness))}
        logits = row.pop("logits")
        reference = logits if reference is None else reference
        row.update(next_token_agreement=agreement(logits, reference), **divergence(logits, reference))
        row.update(speed(candidate.path, prompt, cfg.speed.new_tokens, threads, cfg.speed.repeats))
        rows.append(row)
    return rows


def measure_torch(path: Path, texts: dict, openings: Openings, harness: Optional[Callable] = None) -> dict:
    """The row of a transformers model; `harness(model)`, when given, its lm-eval metrics (as in `measure_gguf`)."""
    model = load_variant(path).eval() if path.is_dir() else load_causal_lm(str(path), dtype=torch.float32).eval()
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=openings.max_new_tokens)
    written = [completion for start in range(0, len(openings.prompts), openings.batch_size)
               for completion in complete(model, openings.prompts[start:start + openings.batch_size], greedy,
                                          openings.stops, openings.pad_id)]
    logits = torch_logits(model, texts["test"])
    return {"test_perplexity": logits_perplexity(map(torch.from_numpy, logits), texts["test"]), "logits": logits,
            "parameters": count_parameters(model), "weight_mb": weight_memory(model, [])["weight_mb"],
            "disk_mb": folder_mb(path), "lm_eval": harness(model) if harness else None,
            **completion_figures(written), **openings.draft_figures(model_logits(model))}


def harness_of(cfg: LMReportConfig, tokenizer, label: str) -> Optional[Callable]:
    """What measures a loaded model (transformers, or llama.cpp's for a GGUF file) on `cfg.lm_eval`'s tasks, with
    the teacher's tokenizer, writing lm-eval's files to `lm_eval/<label>/` in the report's folder; None without the
    section."""
    if cfg.lm_eval is None:
        return None
    harness, folder = cfg.lm_eval, Path(cfg.output_dir) / "lm_eval" / label

    def measure(model) -> dict:
        if isinstance(model, torch.nn.Module):
            lm = hf_lm(model, tokenizer, harness.batch_size)
        else:
            from quant.measure.lm_eval_llama_cpp import LlamaCppLM

            lm = LlamaCppLM(model, tokenizer)
        return task_metrics(run_lm_eval(lm, harness.tasks, folder, harness.limit))
    return measure


@torch.no_grad()
def torch_logits(model, texts: list[list[int]]) -> list[np.ndarray]:
    return [logits_of(model, torch.tensor([ids]))[0].float().numpy() for ids in texts]


def measure_gguf(path: Path, texts: dict, threads: int, openings: Openings, harness: Optional[Callable] = None
                 ) -> dict:
    with loaded(path, threads) as llm:
        written = [until_stop(greedy_ids(llm, prompt, openings.max_new_tokens), openings.stops)
                   for prompt in openings.prompts]
        logits = [gguf_logits(llm, ids).astype(np.float32) for ids in texts["test"]]
        return {"lm_eval": harness(llm) if harness else None,
                "test_perplexity": scores_perplexity(logits, texts["test"]), "logits": logits,
                "parameters": None, "weight_mb": path.stat().st_size / 1e6, "disk_mb": path.stat().st_size / 1e6,
                **completion_figures(written),
                **openings.draft_figures(lambda ids: torch.from_numpy(gguf_logits(llm, ids)))}


def completion_figures(completions: list[list[int]]) -> dict[str, float]:
    """`COMPLETION_FIGURES` of a model's greedy completions; none without completions (not measured)."""
    return {f"test_{name}": value for name, value in generation_scores(completions).items()} if completions else {}


def agreement(logits: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """The share of positions whose most likely next token is the reference's."""
    same = sum((a.argmax(-1) == b.argmax(-1)).sum() for a, b in zip(logits, reference))
    return float(same / max(sum(len(r) for r in reference), 1))


def divergence(logits: list[np.ndarray], reference: list[np.ndarray]) -> dict[str, float]:
    """KL(reference || model) at every position that predicts a token of its text: mean and 99th percentile (the
    first row, the teacher, is the reference of every row)."""
    kls = [token_divergences(b[:-1], a[:-1])[0] for a, b in zip(logits, reference)]
    kl = np.concatenate(kls)
    return {"kld_mean": float(kl.mean()), "kld_p99": float(np.percentile(kl, 99))}


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 1e6


def speed_prompt(texts: list[list[int]], tokens: int) -> list[int]:
    """The test texts, concatenated and repeated, cut to `tokens` token ids: a prefill prompt of real text."""
    joined = [token for ids in texts for token in ids]
    return (joined * (tokens // max(len(joined), 1) + 1))[:tokens]


FRONTS = {"disk": lambda row: row["disk_mb"], "speed": lambda row: -row["decode_tokens_per_s"]}
"""The costs a served model is chosen by (lower is cheaper): size on disk, and decode speed."""


def fronts(rows: list[dict]) -> dict[str, list[str]]:
    """Per cost of `FRONTS`: the models on the Pareto front of test perplexity against it."""
    return {name: [row["model"] for row in pareto_front(rows, cost, lambda row: -row["test_perplexity"])]
            for name, cost in FRONTS.items()}


def recommended(rows: list[dict], budget: Optional[BudgetConfig]) -> Optional[dict]:
    """The row of lowest test perplexity within `budget`; None without a budget or when no row fits it."""
    if budget is None:
        return None
    fits = [row for row in rows if (budget.disk_mb is None or row["disk_mb"] <= budget.disk_mb) and
            (budget.decode_tokens_per_s is None or row["decode_tokens_per_s"] >= budget.decode_tokens_per_s)]
    return min(fits, key=lambda row: row["test_perplexity"], default=None)


def recommendation(rows: list[dict], budget: Optional[BudgetConfig], served: str) -> Optional[str]:
    """One paragraph naming the best artifact within `budget`, and saying so plainly when it is not the served
    model's line (the teacher's own quantized file beats the compressed student, for instance)."""
    if budget is None:
        return None
    limits = " and ".join(text for text in (f"at most {budget.disk_mb:g} MB on disk" if budget.disk_mb else "",
                                            f"at least {budget.decode_tokens_per_s:g} decode tokens/s"
                                            if budget.decode_tokens_per_s else "") if text)
    best = recommended(rows, budget)
    if best is None:
        return f"No model measured here fits the budget ({limits})."
    text = (f"Within the budget ({limits}), the best model measured here is **{best['model']}** ({best['path']}): "
            f"test perplexity {best['test_perplexity']:.2f}, {best['disk_mb']:.1f} MB, "
            f"{best['decode_tokens_per_s']:.1f} decode tokens/s.")
    if best["stage"] == "-" or best["path"] == served:
        return text
    return text + f" It is not the model this card ships ({Path(served).name}): serve {best['model']} instead."


def markdown_table(rows: list[dict], prompt_tokens: int, new_tokens: int) -> str:
    base, on_front = rows[0], fronts(rows)
    lines = [f"| model | stage kind | test ppl | next-token agreement | KLD mean | KLD p99 | loop share | "
             f"distinct-2 | completion tokens | draft alpha | draft tokens/pass | parameters | disk MB | peak RSS MB | "
             f"prefill tok/s ({prompt_tokens}) | decode tok/s ({new_tokens}) | decode speed-up | Pareto front |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        params = f"{row['parameters'] / 1e6:.1f}M" if row["parameters"] else "-"
        front = ", ".join(name for name, models in on_front.items() if row["model"] in models) or "-"
        lines.append(f"| {row['model']} | {row['kind']} | {row['test_perplexity']:.2f} | "
                     f"{row['next_token_agreement']:.2%} | {row['kld_mean']:.4f} | "
                     f"{row['kld_p99']:.3f} | {completion_cells(row)} | {draft_cells(row)} | {params} | "
                     f"{row['disk_mb']:.1f} | "
                     f"{row['peak_rss_mb']:.0f} | "
                     f"{row['prefill_tokens_per_s']:.0f} | {row['decode_tokens_per_s']:.1f} | "
                     f"{row['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x | {front} |")
    return "\n".join(lines)


def completion_cells(row: dict) -> str:
    if "test_loop_share" not in row:
        return "- | - | -"
    return (f"{row['test_loop_share']:.0%} | {row['test_completion_distinct_2']:.3f} | "
            f"{row['test_completion_tokens']:.1f}")


def draft_cells(row: dict) -> str:
    if "draft_alpha" not in row:
        return "- | -"
    return f"{row['draft_alpha']:.3f} | {row['draft_tokens_per_pass']:.2f}"


def lm_eval_table(rows: list[dict]) -> str:
    """Each measured model's lm-eval metrics, a column per task and metric ("" when no row has any)."""
    measured = [row for row in rows if row.get("lm_eval")]
    if not measured:
        return ""
    columns = [(task, metric) for task, metrics in measured[0]["lm_eval"].items() for metric in metrics
               if metric != "examples"]
    examples = {task: metrics["examples"] for task, metrics in measured[0]["lm_eval"].items()}
    lines = ["| model | " + " | ".join(f"{task} {metric} ({examples[task]})" for task, metric in columns) + " |",
             "|---|" + "---|" * len(columns)]
    lines += [f"| {row['model']} | " + " | ".join(f"{row['lm_eval'][task][metric]:.4g}" for task, metric in columns)
              + " |" for row in measured]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    require_matplotlib().use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    on_front = fronts(rows)
    for axis, cost, front, label in zip(axes, ("decode_tokens_per_s", "disk_mb"), ("speed", "disk"),
                                        ("decode tokens/s (batch 1, CPU)", "disk MB")):
        line = sorted((row for row in rows if row["model"] in on_front[front]), key=lambda row: row[cost])
        axis.plot([r[cost] for r in line], [r["test_perplexity"] for r in line], "--", color="grey",
                  label="Pareto front")
        for i, row in enumerate(rows):
            point = (row[cost], row["test_perplexity"])
            axis.scatter(*point, marker="*" if i == 0 else "o", s=160 if i == 0 else 40,
                         color="tab:red" if i == 0 else ("tab:green" if row["path"].endswith(".gguf") else "tab:blue"))
            axis.annotate(row["model"], point, textcoords="offset points", xytext=(5, 4), fontsize=8)
        axis.set_xlabel(label)
        axis.set_ylabel("test perplexity (lower is better)")
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="best")
    figure.suptitle("Perplexity against decode speed and size (red star: teacher; green: GGUF in llama.cpp)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_lm_report(rows: list[dict], folder: Path, header: dict, speed_cfg, advice: Optional[str] = None) -> str:
    """`lm_report.json` (`header`, the Pareto fronts, the rows), `.md` (the table, then `advice`) and `.png`;
    returns the Markdown table."""
    report = {**header, "reference": rows[0]["model"], "pareto_fronts": fronts(rows), "rows": rows}
    (folder / f"{REPORT_NAME}.json").write_text(json.dumps(report, indent=2))
    table = markdown_table(rows, speed_cfg.prompt_tokens, speed_cfg.new_tokens)
    harness = lm_eval_table(rows)
    if harness:
        table += f"\n\nlm-evaluation-harness (documents per task in brackets):\n\n{harness}"
    (folder / f"{REPORT_NAME}.md").write_text(f"# LM compression report\n\n{table}\n" +
                                              (f"\n{advice}\n" if advice else ""))
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
