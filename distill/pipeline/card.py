"""The model card (README.md) of a compressed model, in the Hub's format: YAML front matter (base_model, datasets,
library_name, tags, model-index with the served model's figures: `model_index`), then every compression step with
its settings, the metrics table, the gate's outcome, how to load the model (the flags its checkpoint needs) and its
limitations."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional

import yaml

from distill.core.gate import outcome_text
from distill.core.offline import DATASET_ALIASES, MODEL_ALIASES

KIND_TAGS = {"distill": ["distillation"], "distill_lm": ["distillation"], "prune": ["pruning"], "prune_lm": ["pruning"],
             "quantize": ["quantization"], "quantize_lm": ["quantization"], "export_gguf": ["gguf"],
             "qlora": ["quantization", "lora"]}
PLACEHOLDER_REPO = "path/or/hub-id/of/this/model"
BNB_KEYS = ("load_in_8bit", "load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
            "bnb_4bit_compute_dtype", "llm_int8_threshold", "llm_int8_skip_modules")


@dataclass
class CardStep:
    """One stage of the pipeline that made the model."""
    name: str
    kind: str
    input_model: str
    settings: dict[str, Any]


@dataclass
class CardFacts:
    repo_id: Optional[str]
    base_model: Optional[str]
    datasets: list[str]
    dataset_name: str
    split: str
    accuracy: float
    license: Optional[str]
    tags: list[str]
    gate: list[dict] = field(default_factory=list)
    """The outcome of each gate rule (`distill.core.gate.gate_outcomes`)."""


class IndexDataset(NamedTuple):
    name: str
    type: str
    split: str


class IndexEntry(NamedTuple):
    """One measured value of the card's `model-index`."""
    task: str
    """The Hub task type, e.g. `text-generation`."""
    dataset: IndexDataset
    metric: str
    """The metric's type, e.g. `accuracy`, `perplexity`."""
    value: float
    name: Optional[str] = None
    """The metric's display name."""


def model_index(model_name: str, entries: list[IndexEntry]) -> list[dict]:
    """The Hub's `model-index` front matter: one result per task and dataset, holding their metrics in order."""
    results: dict[tuple[str, IndexDataset], list[dict]] = {}
    for entry in entries:
        results.setdefault((entry.task, entry.dataset), []).append(
            {"type": entry.metric, "value": entry.value, **({"name": entry.name} if entry.name else {})})
    return [{"name": model_name, "results": [
        {"task": {"type": task, "name": task.replace("-", " ").title()}, "dataset": dataset._asdict(),
         "metrics": metrics} for (task, dataset), metrics in results.items()]}]


def card_dataset(facts: CardFacts | LMCardFacts, split: str) -> IndexDataset:
    """The dataset a card's figures were measured on: its Hub id when it has one, else its name."""
    return IndexDataset(facts.dataset_name, facts.datasets[0] if facts.datasets else facts.dataset_name, split)


def hub_model_id(name: str) -> Optional[str]:
    """The Hub id that a model name stands for (offline packages carry Hub models); None for local paths."""
    if name.startswith("hub:"):
        return name[4:]
    if name.startswith("offline:"):
        return next((hub for hub, offline in MODEL_ALIASES.items() if offline == name[len("offline:"):]), None)
    if Path(name).exists() or name.startswith(("/", ".", "~")):
        return None
    return name


def hub_dataset_id(source: str) -> Optional[str]:
    """The Hub id that a `data.source` stands for; None for local files."""
    if source.startswith("hub:"):
        return source[4:]
    name = source[len("offline:"):] if source.startswith("offline:") else source
    aliases = [hub for hub, offline in DATASET_ALIASES.items() if offline == name and "/" in hub]
    if aliases:
        return aliases[0]
    return None if Path(source).exists() or source.startswith("offline:") else source


def model_card(model_dir: Path, facts: CardFacts, steps: list[CardStep], table: str, plot_file: Optional[str]
               ) -> str:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    sections = [front_matter(facts, steps), f"# {facts.repo_id or 'Compressed model'}",
                summary(facts, steps), steps_section(steps), metrics_section(table, plot_file, facts),
                *gate_section(facts.gate), loading_section(config, facts.repo_id or PLACEHOLDER_REPO),
                limitations_section(config, facts)]
    return "\n\n".join(sections) + "\n"


def front_matter(facts: CardFacts, steps: list[CardStep]) -> str:
    tags = ["text-classification", "compressed"] + [t for step in steps for t in KIND_TAGS.get(step.kind, [])]
    metadata: dict[str, Any] = {
        "base_model": facts.base_model, "datasets": facts.datasets or None, "library_name": "transformers",
        "license": facts.license, "pipeline_tag": "text-classification", "tags": list(dict.fromkeys(tags + facts.tags)),
        "model-index": model_index(facts.repo_id or "compressed-model", [IndexEntry(
            "text-classification", card_dataset(facts, facts.split), "accuracy", round(facts.accuracy, 4),
            f"{facts.split} accuracy")]),
    }
    values = {key: value for key, value in metadata.items() if value is not None}
    return f"---\n{yaml.safe_dump(values, sort_keys=False)}---"


def summary(facts: CardFacts, steps: list[CardStep]) -> str:
    chain = " -> ".join(f"{step.name} ({step.kind})" for step in steps)
    base = f" from `{facts.base_model}`" if facts.base_model else ""
    return (f"A text classifier compressed{base} in {len(steps)} steps: {chain}. It reaches "
            f"{100 * facts.accuracy:.2f}% accuracy on the {facts.split} split of {facts.dataset_name}.")


def steps_section(steps: list[CardStep]) -> str:
    parts = ["## Compression steps"]
    for i, step in enumerate(steps, 1):
        settings = yaml.safe_dump(step.settings, sort_keys=False).rstrip()
        parts.append(f"### {i}. {step.name} (`{step.kind}`)\n\nInput: `{step.input_model}`\n\n"
                     f"<details><summary>settings</summary>\n\n```yaml\n{settings}\n```\n\n</details>")
    return "\n\n".join(parts)


def metrics_section(table: str, plot_file: Optional[str], facts: CardFacts) -> str:
    plot = f"\n\n![accuracy against size and latency]({plot_file})" if plot_file else ""
    return (f"## Metrics\n\nEvery model the steps saved, measured side by side ({facts.split} split; CPU latency at "
            f"a fixed batch, measured in alternation); the first row is the reference.\n\n{table}{plot}")


def gate_section(outcomes: list[dict]) -> list[str]:
    """The gate's rules with their outcomes (no section without a gate)."""
    if not outcomes:
        return []
    lines = "\n".join(f"- {outcome_text(outcome)}" for outcome in outcomes)
    return [f"## Gate\n\nThe thresholds the model had to meet before it could be pushed:\n\n{lines}"]


def loading_flags(config: dict) -> list[str]:
    """The `from_pretrained` arguments the checkpoint needs: remote code for pruned (compressed) architectures."""
    return ["trust_remote_code=True"] if "compression" in config or "auto_map" in config else []


def loading_section(config: dict, repo: str) -> str:
    args = ", ".join([f'"{repo}"', *loading_flags(config)])
    lines = ["from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
             f"tokenizer = AutoTokenizer.from_pretrained(\"{repo}\")"]
    notes = []
    if "quantization_config" in config:
        recorded = {k: v for k, v in config["quantization_config"].items() if k in BNB_KEYS}
        lines.append(f"# the checkpoint records its quantization, equivalent to\n"
                     f"# BitsAndBytesConfig(**{recorded!r})\n# from_pretrained applies it; bitsandbytes must be "
                     "installed")
    lines.append(f"model = AutoModelForSequenceClassification.from_pretrained({args})")
    if config.get("quantization", {}).get("method") == "dynamic_int8":
        lines += ["", "import torch", "# the weights are saved in fp32; quantize the Linears to int8 at load",
                  "model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)"]
        notes.append("This framework's `quant.schemes.variants.load_variant(folder)` quantizes exactly the Linears "
                     "recorded in `config.quantization.skip_modules` (task head and pooler stay fp32).")
    if loading_flags(config):
        notes.append("`trust_remote_code=True` is needed: the pruned layers have shapes the stock architecture "
                     "cannot hold, and the checkpoint ships their modeling code (`auto_map`).")
    code = "```python\n" + "\n".join(lines) + "\n```"
    return "\n\n".join(["## How to load", code, *notes])


def limitations_section(config: dict, facts: CardFacts) -> str:
    items = [f"Measured on one dataset ({facts.dataset_name}, {facts.split} split); accuracy elsewhere may differ.",
             "Latency and throughput were measured on the CPU of the machine that ran the pipeline, at one batch "
             "shape; other hardware, batch sizes and thread counts give other numbers.",
             "Compression can change individual predictions even where the accuracy holds; check the cases that "
             "matter to you."]
    if "quantization_config" in config:
        items.append("bitsandbytes quantization needs the bitsandbytes package; its CPU kernels are slower than "
                     "its GPU kernels, so the CPU latency here may not show the speed-up a GPU gives.")
    return "## Limitations\n\n" + "\n".join(f"- {item}" for item in items)


@dataclass
class LMCardFacts:
    """What a causal LM's card states about it."""
    repo_id: Optional[str]
    base_model: Optional[str]
    datasets: list[str]
    dataset_name: str
    perplexity: float
    """The served model's test perplexity."""
    license: Optional[str]
    tags: list[str]
    gguf_files: list[str]
    """GGUF files shipped beside the model, for llama.cpp."""
    recommendation: Optional[str] = None
    """Which measured artifact to serve within the user's budget (`quant.measure.lm_report.recommendation`)."""
    results: list[IndexEntry] = field(default_factory=list)
    """The model-index entries beside the test perplexity (generation quality, benchmark tasks)."""
    gate: list[dict] = field(default_factory=list)
    """The outcome of each gate rule (`distill.core.gate.gate_outcomes`)."""
    draft: Optional[dict] = None
    """The served model as its teacher's speculative-decoding draft: `alpha`, `tokens_per_pass` at `k` proposals."""


def lm_model_card(model_dir: Path, facts: LMCardFacts, steps: list[CardStep], table: str, plot_file: Optional[str]
                  ) -> str:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    tags = ["text-generation", "compressed"] + [t for step in steps for t in KIND_TAGS.get(step.kind, [])]
    metadata = {"base_model": facts.base_model, "datasets": facts.datasets or None, "library_name": "transformers",
                "license": facts.license, "pipeline_tag": "text-generation",
                "tags": list(dict.fromkeys(tags + (["gguf"] if facts.gguf_files else []) + facts.tags)),
                "model-index": model_index(facts.repo_id or "compressed-model", [IndexEntry(
                    "text-generation", card_dataset(facts, "test"), "perplexity", round(facts.perplexity, 3),
                    "test perplexity"), *facts.results])}
    front = "---\n" + yaml.safe_dump({k: v for k, v in metadata.items() if v is not None}, sort_keys=False) + "---"
    chain = " -> ".join(f"{step.name} ({step.kind})" for step in steps)
    base = f" from `{facts.base_model}`" if facts.base_model else ""
    summary = (f"A causal language model compressed{base} in {len(steps)} steps: {chain}. Its perplexity on the "
               f"held-out test texts of {facts.dataset_name} is {facts.perplexity:.2f}.")
    plot = f"\n\n![perplexity against decode speed and size]({plot_file})" if plot_file else ""
    metrics = ("## Metrics\n\nThe teacher and every model the steps saved (GGUF files in llama.cpp), measured side by "
               "side on the same held-out texts; generation speed on the CPU of the machine that ran the pipeline, at "
               f"batch 1.\n\n{table}{plot}" + (f"\n\n{facts.recommendation}" if facts.recommendation else ""))
    sections = [front, f"# {facts.repo_id or 'Compressed language model'}", summary, steps_section(steps), metrics,
                *gate_section(facts.gate), lm_loading_section(config, facts.repo_id or PLACEHOLDER_REPO, facts.gguf_files),
                *draft_section(facts), lm_limitations_section(config, facts)]
    return "\n\n".join(sections) + "\n"


def lm_loading_section(config: dict, repo: str, gguf_files: list[str]) -> str:
    args = ", ".join([f'"{repo}"', *loading_flags(config)])
    code = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
            f"model = AutoModelForCausalLM.from_pretrained({args})"]
    parts = ["## How to load", "In transformers:", "```python\n" + "\n".join(code) + "\n```"]
    if gguf_files:
        smallest = gguf_files[-1]
        parts += [f"In llama.cpp (and Ollama, LM Studio), one of the GGUF files ({', '.join(gguf_files)}):",
                  f"```bash\nllama-cli -m {smallest} -p \"This movie was\" -n 64\n```",
                  "```python\nfrom llama_cpp import Llama\n\n"
                  f'llm = Llama(model_path="{smallest}")\nprint(llm("This movie was", max_tokens=64)["choices"][0]'
                  '["text"])\n```']
    if loading_flags(config):
        parts.append("`trust_remote_code=True` is needed: the layers have per-layer widths that the stock "
                     "architecture cannot hold, and the checkpoint ships their modeling code (`auto_map`).")
    return "\n\n".join(parts)


def draft_section(facts: LMCardFacts) -> list[str]:
    """How to serve the model as its teacher's draft, with its measured acceptance; [] when not measured."""
    if facts.draft is None or not facts.base_model:
        return []
    draft, target, repo, k = facts.draft, facts.base_model, facts.repo_id or PLACEHOLDER_REPO, facts.draft["k"]
    return ["## As a draft for speculative decoding", (
        f"This model reads `{target}`'s tokens, so it can propose tokens that `{target}` checks in one pass; the "
        f"output stays exactly `{target}`'s. On `{target}`'s greedy continuations of the test texts' openings, "
        f"{draft['tokens_per_pass']:.2f} tokens per pass of `{target}` with {k} proposals (greedy; at most {k + 1}), "
        f"and an acceptance rate of {draft['alpha']:.3f} under sampling. It pays only if the draft is much cheaper "
        "than the target: measure both with `scripts/bench_speculative.py`."),
        "```python\n" + "\n".join([
            "# transformers", f'target = AutoModelForCausalLM.from_pretrained("{target}")',
            f'draft = AutoModelForCausalLM.from_pretrained("{repo}")',
            "out = target.generate(**inputs, assistant_model=draft, do_sample=False)", "",
            "# vLLM", "from vllm import LLM",
            f'llm = LLM(model="{target}", speculative_config={{"model": "{repo}", "num_speculative_tokens": {k}}})'])
        + "\n```",
        f"```bash\n# llama.cpp, both as GGUF\nllama-server -m target.gguf -md draft.gguf --draft-max {k}\n```"]


def lm_limitations_section(config: dict, facts: LMCardFacts) -> str:
    items = [f"Perplexity was measured on held-out texts of one corpus ({facts.dataset_name}); on other text, and on "
             "tasks, the model may do worse than the numbers suggest.",
             "Generation speed was measured on one CPU at batch 1; other hardware, batch sizes and thread counts give "
             "other numbers."]
    if loading_flags(config):
        items.append("Not servable by vLLM, TGI or llama.cpp: its per-layer widths are not the family's stock "
                     "architecture; use plain transformers with trust_remote_code, or prune with uniform widths.")
    return "## Limitations\n\n" + "\n".join(f"- {item}" for item in items)
