"""The pipeline stages `quant` provides: `quantize` (each variant saved; the last feeds the next stage), `qlora`
(quantization-aware distillation; its merged model feeds the next stage) and `report` (every earlier model measured
side by side, then the served model copied with its model card and the report)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from distill.card import CardFacts, CardStep, hub_dataset_id, hub_model_id, model_card
from distill.config import to_dict
from distill.pipeline import Stage, StageContext, StageKind, register_stage

from .compression_report import PLOT_FILE, candidates_of, measure_models, require_matplotlib, write_report
from .config import QatConfig, QuantConfig, ReportConfig
from .loading import load_config
from .qat import check_qat_config, qat_distill
from .run import check_measurement, check_quant_config, evaluation_for, quantize, quiet_int8_cast_warning

CARD_OMITS = ("output_dir", "data")
"""Config keys the card leaves out of each step's settings: the folder, and the data it names once."""


def run_quantize(cfg: QuantConfig, context: StageContext) -> dict:
    return quantize(cfg).metrics


def run_qlora(cfg: QatConfig, context: StageContext) -> dict:
    return qat_distill(cfg, context.on_step).metrics


def check_report_config(cfg: ReportConfig) -> None:
    check_measurement(cfg)
    require_matplotlib()


def run_report(cfg: ReportConfig, context: StageContext) -> dict:
    """Measure every earlier model, then write `model/`: the served model, its card and the report."""
    quiet_int8_cast_warning()
    if cfg.latency.threads:
        torch.set_num_threads(cfg.latency.threads)
    evaluation = evaluation_for(cfg, load_config(cfg.model).num_labels)
    rows = measure_models(candidates_of(context.earlier, cfg.model), evaluation, cfg.latency)
    header = {"split": cfg.split, "examples": len(evaluation.loader.dataset),
              "latency_batch": [cfg.latency.batch_size, cfg.latency.max_length], "threads": torch.get_num_threads(),
              "torch": torch.__version__, "served": cfg.model}
    tmp = Path(cfg.output_dir) / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(cfg.model, tmp)
    table = write_report(rows, tmp, header)
    served = next(row for row in rows if Path(row["path"]) == Path(cfg.model))
    card = model_card(tmp, card_facts(cfg, context.earlier, served["accuracy"]), card_steps(context.earlier), table,
                      PLOT_FILE)
    (tmp / "README.md").write_text(card)
    os.replace(tmp, Path(cfg.output_dir) / "model")
    return {"rows": rows, **header}


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


register_stage("quantize", StageKind(QuantConfig, run_quantize, input_field="model",
                                     outputs=lambda cfg: {variant: variant for variant in cfg.variants},
                                     check=check_quant_config))
register_stage("qlora", StageKind(QatConfig, run_qlora, input_field="student",
                                  outputs=lambda cfg: {"merged": "model"} if cfg.merge else {},
                                  check=check_qat_config))
register_stage("report", StageKind(ReportConfig, run_report, input_field="model", check=check_report_config))
