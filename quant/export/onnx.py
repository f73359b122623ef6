"""ONNX export of an encoder classifier for ONNX Runtime: `model.onnx` (fp32) and `model-int8.onnx` (ONNX Runtime's
dynamic quantization), written with config.json and the tokenizer files into `output_dir/model/`, so that it can be
tokenized and run with a tokenizer and `onnxruntime` alone. Inputs `input_ids`, `attention_mask` (and
`token_type_ids` when the tokenizer makes them and the model takes them), int64, batch and sequence axes dynamic;
output `logits` (batch, labels). Pruned checkpoints with remote code, vocabulary-pruned ones and int8 word
embeddings export like stock models: the graph is traced from the loaded PyTorch modules.

After the export, both files run in ONNX Runtime on the configured split beside the PyTorch model, batch by batch:
the accuracy of each, each file's largest |logit difference| from PyTorch and the share of predictions that agree
(`metrics.json`). An fp32 file further than `tolerance` from PyTorch fails the run before `model/` is written.

Outputs in `output_dir`: `config.yaml`, `model/` (written beside, then renamed into place) and `metrics.json`."""
from __future__ import annotations

import inspect
import logging
import os
import shutil
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import SequenceClassifierOutput

from distill.core.arch import ARCHS
from distill.core.data import collator, label_names, load_splits, tokenize
from distill.core.errors import ConfigError, require_package
from distill.core.io import write_json_atomic
from distill.core.jobs import Job, register_job
from distill.core.models import is_compressed, load_classifier, load_tokenizer, resolve_model
from distill.core.run import RunResult, check_class_count, open_run
from quant.config import OnnxExportConfig
from quant.quantize import SPLITS

ONNX_INSTALL = 'pip install -e ".[onnx]"'
NEEDED_BY = "ONNX export and ONNX Runtime need"
FILES = {"fp32": "model.onnx", "int8": "model-int8.onnx"}
"""The files of an export folder, by variant."""
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MIN_OPSET, MAX_OPSET = 14, 20
ENCODERS = [name for name, arch in ARCHS.items() if not arch.decoder]
EXAMPLE_TEXTS = ["a short text", "a longer text, so that the example batch is padded"]


def require_onnx() -> ModuleType:
    return require_package("onnx", NEEDED_BY, ONNX_INSTALL)


def require_onnxruntime() -> ModuleType:
    return require_package("onnxruntime", NEEDED_BY, ONNX_INSTALL)


def is_onnx(path: str | Path) -> bool:
    return Path(path).suffix == ".onnx"


# ----- running an exported file -----------------------------------------------------------------------------------
class OnnxClassifier(nn.Module):
    """An ONNX Runtime session called like a transformers classifier (keyword tensors in, `.logits` out), so that the
    code that measures PyTorch models measures it too, on as many threads as torch uses. Tensors of the batch that
    the graph does not take are ignored."""

    def __init__(self, path: str | Path):
        super().__init__()
        runtime = require_onnxruntime()
        options = runtime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = runtime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [node.name for node in self.session.get_inputs()]

    def forward(self, **batch: torch.Tensor) -> SequenceClassifierOutput:
        feeds = {name: batch[name].cpu().numpy() for name in self.inputs}
        return SequenceClassifierOutput(logits=torch.from_numpy(self.session.run(["logits"], feeds)[0]))


def onnx_sizes(path: str | Path) -> dict[str, float]:
    """The file's size, and its initializers as numbers (int8 weights at their shapes, their scales included) and
    as megabytes of memory; int64 initializers (ids, shapes) are not weights. Identical weights (the zero biases of
    an untrained model) are stored, and counted, once."""
    numbers = size = 0
    onnx = require_onnx()
    for tensor in onnx.load(str(path)).graph.initializer:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        if dtype != np.int64:
            numbers += int(np.prod(tensor.dims))
            size += int(np.prod(tensor.dims)) * dtype.itemsize
    return {"parameters": numbers, "disk_mb": Path(path).stat().st_size / 1e6, "weight_mb": size / 1e6}


# ----- export -----------------------------------------------------------------------------------------------------
class LogitsOnly(nn.Module):
    """The classifier called with positional tensors (the graph's inputs, in order), returning its logits alone."""

    def __init__(self, model: PreTrainedModel, inputs: list[str]):
        super().__init__()
        self.model, self.inputs = model, inputs

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.inputs, tensors))).logits


def graph_inputs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    takes = inspect.signature(model.forward).parameters
    return [name for name in MODEL_INPUTS if name in tokenizer.model_input_names and name in takes]


def export(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path, opset: int) -> list[str]:
    """`model` as an ONNX graph in `path`; returns the graph's input names."""
    inputs = graph_inputs(model, tokenizer)
    example = tokenizer(EXAMPLE_TEXTS, padding=True, return_tensors="pt")
    axes = {name: {0: "batch", 1: "sequence"} for name in inputs}
    # The TorchScript exporter: dynamo's needs onnxscript and its graph ran slower (docs/quantization.md)
    with warnings.catch_warnings():
        # its deprecation notice; tracer warnings on shape-dependent Python branches (the parity check, over batches
        # of many shapes, shows whether the trace holds); its note that advanced indexing is wrong for negative
        # indices (here they are token ids and positions)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", "Exporting aten::index operator", UserWarning)
        torch.onnx.export(LogitsOnly(model, inputs).eval(), tuple(example[name] for name in inputs), str(path),
                          input_names=inputs, output_names=["logits"], dynamic_axes={**axes, "logits": {0: "batch"}},
                          opset_version=opset, dynamo=False)
    return inputs


def quantize_int8(source: Path, target: Path) -> None:
    """ONNX Runtime's dynamic quantization: int8 weights of the MatMuls and embedding Gathers (the pooler and
    classifier are Gemms, left in fp32), activations quantized per batch."""
    quantization = require_package("onnxruntime.quantization", NEEDED_BY, ONNX_INSTALL)
    disabled = logging.root.manager.disable
    # its advice to pre-process the graph first changed neither accuracy nor speed (docs/quantization.md)
    logging.disable(logging.WARNING)
    try:
        # per-channel scales and no reduce_range: the choices that kept the most accuracy (docs/quantization.md)
        quantization.quantize_dynamic(source, target, weight_type=quantization.QuantType.QInt8, per_channel=True,
                                      reduce_range=False)
    finally:
        logging.disable(disabled)


def onnx_files(cfg: OnnxExportConfig) -> dict[str, str]:
    """The ONNX files the export writes into `model/`, by variant."""
    return {name: file for name, file in FILES.items() if name == "fp32" or cfg.int8}


def write_export(cfg: OnnxExportConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path
                 ) -> list[str]:
    """The ONNX files, config.json and the tokenizer files into a fresh `folder`; returns the graph's inputs."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    inputs = export(model, tokenizer, folder / FILES["fp32"], cfg.opset)
    if cfg.int8:
        quantize_int8(folder / FILES["fp32"], folder / FILES["int8"])
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return inputs


# ----- the parity check -------------------------------------------------------------------------------------------
@torch.inference_mode()
def parity(model: PreTrainedModel, exported: dict[str, OnnxClassifier], loader: DataLoader) -> dict[str, dict]:
    """The accuracy of the PyTorch model and of each exported file on `loader`; for each file, its largest |logit
    difference| from PyTorch and the share of its predictions that agree with PyTorch's."""
    correct, agree, worst = dict.fromkeys(["pytorch", *exported], 0), dict.fromkeys(exported, 0), {}
    total = 0
    for batch in loader:
        labels = batch.pop("labels")
        reference = model(**batch).logits
        correct["pytorch"] += (reference.argmax(-1) == labels).sum().item()
        for name, session in exported.items():
            logits = session(**batch).logits
            correct[name] += (logits.argmax(-1) == labels).sum().item()
            agree[name] += (logits.argmax(-1) == reference.argmax(-1)).sum().item()
            worst[name] = max(worst.get(name, 0.0), (logits - reference).abs().max().item())
        total += len(labels)
    return {"pytorch": {"accuracy": correct["pytorch"] / total},
            **{name: {"accuracy": correct[name] / total, "max_abs_logit_diff": worst[name],
                      "prediction_agreement": agree[name] / total} for name in exported}}


def check_fp32(row: dict, tolerance: float) -> None:
    """Within `tolerance` on every logit, a prediction can differ from PyTorch's only where PyTorch's two largest
    logits are within twice the tolerance: a tie up to rounding."""
    worst, agree = row["max_abs_logit_diff"], row["prediction_agreement"]
    if worst > tolerance:
        raise RuntimeError(f"the fp32 ONNX model's logits differ from PyTorch's by up to {worst:.3g} (tolerance "
                           f"{tolerance:g}; predictions agree on {100 * agree:.2f}%): the export is wrong, model/ was "
                           "not written")


def split_loader(cfg: OnnxExportConfig, tokenizer: PreTrainedTokenizerBase, num_labels: int) -> DataLoader:
    raw = load_splits(cfg.data)
    check_class_count(num_labels, label_names(raw), cfg.model)
    split = tokenize(raw, tokenizer, cfg.data.max_length)[cfg.split]
    return DataLoader(split, cfg.eval_batch_size, collate_fn=collator(tokenizer))


# ----- the job ----------------------------------------------------------------------------------------------------
def check_onnx(cfg: OnnxExportConfig) -> None:
    require_onnx()
    require_onnxruntime()
    if not MIN_OPSET <= cfg.opset <= MAX_OPSET:
        raise ConfigError(f"opset must be from {MIN_OPSET} to {MAX_OPSET}; got {cfg.opset}")
    if cfg.split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}; got '{cfg.split}'")
    if cfg.eval_batch_size < 1:
        raise ConfigError(f"eval_batch_size must be at least 1; got {cfg.eval_batch_size}")
    if not cfg.tolerance > 0:
        raise ConfigError(f"tolerance must be positive; got {cfg.tolerance}")
    check_model(cfg.model)


def check_model(model: str) -> None:
    """`exportable_config` for a model on disk; a model that does not exist yet (an earlier pipeline stage's) is
    checked when the export runs, and so is a Hub model, whose config is read when it loads."""
    if not Path(model).exists() and (model.count("/") > 1 or model.startswith((".", "/", "~"))):
        return
    if Path(resolve_model(model), "config.json").is_file():
        exportable_config(model)


def exportable_config(model: str) -> PretrainedConfig:
    """The config of a full-precision sequence classifier of an encoder family, or a ConfigError naming what it is."""
    path = resolve_model(model)
    config = AutoConfig.from_pretrained(path, trust_remote_code=is_compressed(path))
    architectures = config.architectures or []
    if config.model_type not in ENCODERS or not any(name.endswith("ForSequenceClassification") for name in
                                                    architectures):
        raise ConfigError(f"ONNX export handles sequence classifiers of the encoder families {', '.join(ENCODERS)}; "
                          f"{model} is a '{config.model_type}' {' '.join(architectures) or 'model'}")
    for key in ("quantization_config", "quantization"):
        if getattr(config, key, None):
            raise ConfigError(f"{model} is a quantized variant ({key} in its config.json); export its full-precision "
                              "model: `int8: true` adds ONNX Runtime's own int8 file")
    return config


def export_onnx(cfg: OnnxExportConfig) -> RunResult:
    """Export, quantize, check both files against the PyTorch model, then move `model/` into place."""
    check_onnx(cfg)
    config = exportable_config(cfg.model)
    run_dir = open_run(cfg)
    model = load_classifier(cfg.model, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(cfg.model)
    loader = split_loader(cfg, tokenizer, config.num_labels)
    tmp, folder = run_dir / "model.tmp", run_dir / "model"
    inputs = write_export(cfg, model, tokenizer, tmp)
    files = onnx_files(cfg)
    rows = parity(model, {name: OnnxClassifier(tmp / file) for name, file in files.items()}, loader)
    check_fp32(rows["fp32"], cfg.tolerance)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    onnx_rows = {name: {"file": f"model/{file}", **rows[name], **onnx_sizes(folder / file)}
                 for name, file in files.items()}
    metrics = {"model": cfg.model, "split": cfg.split, "examples": len(loader.dataset), "inputs": inputs,
               "opset": cfg.opset, "exporter": "torchscript", "threads": torch.get_num_threads(),
               "torch": torch.__version__, "onnxruntime": require_onnxruntime().__version__,
               "pytorch": rows["pytorch"], "onnx": onnx_rows}
    write_json_atomic(metrics, run_dir / "metrics.json")
    return RunResult(model, metrics, run_dir)


def onnx_summary(cfg: OnnxExportConfig, result: RunResult) -> dict:
    return {"files": {name: str(result.run_dir / row["file"]) for name, row in result.metrics["onnx"].items()},
            **result.metrics}


EXPORT_ONNX = register_job(Job("export_onnx", OnnxExportConfig, check_onnx, export_onnx, onnx_summary))
