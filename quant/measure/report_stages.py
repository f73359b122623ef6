"""The report stages of a pipeline: `report` (every earlier classifier measured side by side, then the served model
copied with its model card and the report) and `report_lm` (the same for a causal LM and its GGUF files)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from distill.core.config import to_dict
from distill.core.errors import ConfigError
from distill.core.fingerprint import tokenizer_sha256
from distill.core.gate import check_gate, gate_outcomes
from distill.core.models import load_tokenizer
from distill.pipeline.card import (
    CardFacts,
    CardStep,
    IndexDataset,
    IndexEntry,
    LMCardFacts,
    card_dataset,
    hub_dataset_id,
    hub_model_id,
    lm_model_card,
    model_card,
)
from distill.pipeline.plan import Stage, StageContext
from quant.config import LMReportConfig, ReportConfig
from quant.export.onnx import is_onnx, require_onnxruntime
from quant.measure.compression_report import (
    FIGURES,
    PLOT_FILE,
    Candidate,
    measure_models,
    require_matplotlib,
    write_report,
)
from quant.measure.lm_report import PLOT_FILE as LM_PLOT_FILE
from quant.measure.lm_report import (
    fronts,
    lm_candidates,
    measure_candidates,
    recommendation,
    recommended,
    write_lm_report,
)
from quant.quantize import Evaluation, check_measurement, evaluation_for, quiet_int8_cast_warning
from quant.schemes.loading import load_config

CARD_OMITS = ("output_dir", "data")
"""Config keys the card leaves out of each step's settings: the folder, and the data it names once."""


def check_report_config(cfg: ReportConfig) -> None:
    check_measurement(cfg)
    check_gate(cfg.gate, FIGURES)
    require_matplotlib()
    if is_onnx(cfg.model):
        raise ConfigError(f"the report serves a transformers model with its card, not the ONNX file {cfg.model}; "
                          "name the model to serve in the report's `model` (e.g. \"@student\"): the ONNX files of "
                          "earlier stages are measured all the same")


def run_report(cfg: ReportConfig, context: StageContext) -> dict:
    """Measure every earlier model, then write `model/`: the served model, its card and the report."""
    quiet_int8_cast_warning()
    if cfg.latency.threads:
        torch.set_num_threads(cfg.latency.threads)
    num_labels = load_config(cfg.model).num_labels
    by_tokenizer: dict[str, Evaluation] = {}

    def evaluation_of(folder: Path) -> Evaluation:
        key = tokenizer_sha256(load_tokenizer(str(folder)))
        if key not in by_tokenizer:
            by_tokenizer[key] = evaluation_for(cfg, num_labels, str(folder))
        return by_tokenizer[key]

    rows = measure_models(candidates_of(context.earlier, cfg.model), evaluation_of, cfg.latency)
    evaluation = evaluation_of(Path(cfg.model))
    header = {"split": cfg.split, "examples": len(evaluation.loader.dataset),
              "latency_batch": [cfg.latency.batch_size, cfg.latency.max_length], "threads": torch.get_num_threads(),
              "torch": torch.__version__, "served": cfg.model}
    served = next(row for row in rows if Path(row["path"]) == Path(cfg.model))
    header["gate"] = gate_outcomes(cfg.gate, rows, served["model"])
    if any(row["runtime"] == "onnxruntime" for row in rows):
        header["onnxruntime"] = require_onnxruntime().__version__
    tmp = Path(cfg.output_dir) / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(cfg.model, tmp)
    table = write_report(rows, tmp, header)
    facts = card_facts(cfg, context.earlier, served["accuracy"])
    facts.gate = header["gate"]
    card = model_card(tmp, facts, card_steps(context.earlier), table, PLOT_FILE)
    (tmp / "README.md").write_text(card)
    os.replace(tmp, Path(cfg.output_dir) / "model")
    return {"rows": rows, **header}


def candidates_of(stages: list[Stage], served: str) -> list[Candidate]:
    """Every task model the stages saved, in order (not a general distillation's headless encoder); the served model
    last if no stage saved it."""
    found = [Candidate(stage.name if len(stage.models) == 1 else f"{stage.name}/{name}", stage.name,
                       stage.kind_name, path) for stage in stages for name, path in stage.models.items()
             if is_classifier(path)]
    if all(candidate.path != Path(served) for candidate in found):
        found.append(Candidate("served", "-", "-", Path(served)))
    return found


def is_classifier(path: Path) -> bool:
    """Whether a saved model predicts the task: an ONNX export, or a folder whose config names a classifier."""
    if is_onnx(path):
        return True
    architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    return any(name.endswith("ForSequenceClassification") for name in architectures)


def card_facts(cfg: ReportConfig, earlier: list[Stage], accuracy: float) -> CardFacts:
    first_input = earlier[0].input_model if earlier else cfg.model
    datasets = cfg.datasets if cfg.datasets is not None else [d for d in [hub_dataset_id(cfg.data.source)] if d]
    return CardFacts(repo_id=cfg.repo_id, base_model=cfg.base_model or hub_model_id(first_input), datasets=datasets,
                     dataset_name=datasets[0] if datasets else Path(cfg.data.source).name, split=cfg.split,
                     accuracy=accuracy, license=cfg.license, tags=cfg.tags)


def card_steps(earlier: list[Stage]) -> list[CardStep]:
    return [CardStep(stage.name, stage.kind_name, stage.input_model,
                     {k: v for k, v in to_dict(stage.cfg).items()
                      if k not in CARD_OMITS and k != stage.kind.input_field}) for stage in earlier]


def run_lm_report(cfg: LMReportConfig, context: StageContext) -> dict:
    """Measure, write the report, then `output_dir/model`: the served model, its GGUF files, the report, the card."""
    rows = measure_candidates(cfg, lm_candidates(cfg, context.earlier))
    served = next(row for row in rows if Path(row["path"]) == Path(cfg.model))
    header = {"texts": {"test": cfg.eval_examples}, "served": cfg.model,
              "threads": cfg.speed.threads or torch.get_num_threads(), "torch": torch.__version__,
              "completions": to_dict(cfg.completions), "gate": gate_outcomes(cfg.gate, rows, served["model"])}
    tmp = Path(cfg.output_dir) / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(cfg.model, tmp)
    # the served model's own GGUF files: not those of another model's export (the teacher's, for comparison)
    exports = {stage.name for stage in context.earlier if Path(stage.input_model) == Path(cfg.model)}
    gguf = [Path(row["path"]) for row in rows if row["path"].endswith(".gguf") and row["stage"] in exports]
    for path in gguf:
        shutil.copy2(path, tmp / path.name)
    advice = recommendation(rows, cfg.budget, cfg.model)
    table = write_lm_report(rows, tmp, header, cfg.speed, advice)
    datasets = cfg.datasets if cfg.datasets is not None else [d for d in [hub_dataset_id(cfg.data.source)] if d]
    facts = LMCardFacts(repo_id=cfg.repo_id, base_model=cfg.base_model or hub_model_id(cfg.teacher), datasets=datasets,
                        dataset_name=datasets[0] if datasets else Path(cfg.data.source).name,
                        perplexity=served["test_perplexity"], license=cfg.license, tags=cfg.tags,
                        gguf_files=[path.name for path in gguf], recommendation=advice, gate=header["gate"],
                        draft={"alpha": served["draft_alpha"], "tokens_per_pass": served["draft_tokens_per_pass"],
                               "k": cfg.completions.draft_k} if "draft_alpha" in served else None)
    facts.results = generation_entries(served, card_dataset(facts, "test"))
    (tmp / "README.md").write_text(lm_model_card(tmp, facts, card_steps(context.earlier), table, LM_PLOT_FILE))
    os.replace(tmp, Path(cfg.output_dir) / "model")
    best = recommended(rows, cfg.budget)
    return {"rows": rows, **header, "pareto_fronts": fronts(rows), "recommended": best["model"] if best else None}


def generation_entries(served: dict, dataset: IndexDataset) -> list[IndexEntry]:
    """The card's model-index entries for the served model's greedy completions, when they were measured."""
    names = {"test_loop_share": "loop share of greedy completions",
             "test_completion_distinct_2": "distinct-2 of greedy completions"}
    return [IndexEntry("text-generation", dataset, figure[len("test_"):], round(served[figure], 4), name)
            for figure, name in names.items() if figure in served]
