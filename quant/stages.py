"""The pipeline stages `quant` provides: `quantize` (each variant saved; the last feeds the next stage), `qlora`
(quantization-aware distillation; its merged model feeds the next stage), `export_onnx` (the ONNX files, measured by
a later report beside the PyTorch models) and `report` (every earlier model measured side by side, then the served
model copied with its model card and the report); and their causal-LM counterparts `quantize_lm`, `export_gguf` and
`report_lm`. The reports' work is in `quant.measure.report_stages`."""
from __future__ import annotations

from distill.pipeline.plan import StageKind, register_stage
from quant.config import LMReportConfig, ReportConfig
from quant.export.gguf import EXPORT_GGUF
from quant.export.onnx import EXPORT_ONNX, onnx_files
from quant.measure.lm_report import check_lm_report
from quant.measure.report_stages import check_report_config, run_lm_report, run_report
from quant.qad.qlora import QLORA
from quant.quantize import QUANTIZE
from quant.quantize_lm import QUANTIZE_LM

register_stage("quantize", StageKind.of_job(QUANTIZE, lambda cfg, context: QUANTIZE.run(cfg).metrics,
                                            input_field="model",
                                            outputs=lambda cfg: {variant: variant for variant in cfg.variants}))
register_stage("qlora", StageKind.of_job(QLORA, lambda cfg, context: QLORA.run(cfg, context.on_step).metrics,
                                         input_field="student",
                                         outputs=lambda cfg: {"merged": "model"} if cfg.merge else {}))
register_stage("export_onnx", StageKind.of_job(EXPORT_ONNX, lambda cfg, context: EXPORT_ONNX.run(cfg).metrics,
                                               input_field="model",
                                               outputs=lambda cfg: {name: f"model/{file}"
                                                                    for name, file in onnx_files(cfg).items()}))
register_stage("report", StageKind(ReportConfig, run_report, input_field="model", check=check_report_config))
register_stage("quantize_lm", StageKind.of_job(QUANTIZE_LM, lambda cfg, context: QUANTIZE_LM.run(cfg).metrics,
                                               input_field="model",
                                               outputs=lambda cfg: {variant: variant for variant in cfg.variants}))
register_stage("export_gguf", StageKind.of_job(EXPORT_GGUF, lambda cfg, context: EXPORT_GGUF.run(cfg).metrics,
                                               input_field="model",
                                               outputs=lambda cfg: {name: f"model-{name}.gguf" for name in cfg.types}))
register_stage("report_lm", StageKind(LMReportConfig, run_lm_report, input_field="model", check=check_lm_report))
