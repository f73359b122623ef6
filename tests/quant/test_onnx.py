"""ONNX export on tiny random BERT classifiers: every kind of checkpoint this project saves (stock, uneven heads and
FFN widths with remote code, vocabulary-pruned, int8 word embedding) exports, runs in ONNX Runtime with its own
tokenizer at any batch and sequence length with PyTorch's logits, and gets an int8 copy that mostly agrees; a wrong
export fails its parity check and leaves no `model/`; bad configs are one-line errors before any work; in a pipeline,
the report measures the ONNX files beside the PyTorch models."""
import dataclasses
import json
import sys
from pathlib import Path

import onnxruntime
import pytest
import torch
from transformers import AutoTokenizer, BertForSequenceClassification

from distill.core.errors import ConfigError
from distill.core.models import load_classifier
from distill.pipeline.plan import PipelineConfig, StageEntry, plan_pipeline, run_pipeline
from prune.embeddings import compress_word_embedding
from prune.ffn import prune_ffn
from prune.heads import prune_heads
from prune.saving import save_compressed
from prune.vocab import prune_vocabulary
from quant.config import OnnxExportConfig
from quant.export.onnx import EXPORT_ONNX, FILES
from quant.schemes.variants import build_variant
from recipes.export_onnx import main as export_recipe
from tests.conftest import (
    NEGATIVE,
    NEUTRAL,
    PIPELINE_LATENCY,
    POSITIVE,
    data_cfg,
    make_sentences,
    make_tokenizer,
    save_tiny_teacher,
    tiny_bert_config,
    tiny_causal_lm,
    write_sentiment_csv,
)

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = make_tokenizer(POSITIVE + NEGATIVE + NEUTRAL)
KINDS = ["stock", "uneven_heads", "vocabulary", "int8_embedding"]


def tiny_bert() -> BertForSequenceClassification:
    """With every weight moved off its initial value, as training does: random initialisation leaves all biases zero
    and all LayerNorm weights one, and the exporter stores identical tensors once."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(len(TOKENIZER))).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model


def save_kind(kind: str, folder: Path) -> Path:
    model, tokenizer = tiny_bert(), TOKENIZER
    if kind == "uneven_heads":
        prune_heads(model, {0: [0, 2], 2: [1]})
        prune_ffn(model, {1: list(range(40)), 3: list(range(7))})
    if kind == "vocabulary":  # the test sentences' other words become [UNK]
        tokenizer = prune_vocabulary(model, tokenizer, ["the film was good", "a dull plot"]).tokenizer
    if kind == "int8_embedding":
        compress_word_embedding(model, int8=True)
    save_compressed(model, tokenizer, folder)
    return folder


@pytest.fixture(scope="module")
def csv(tmp_path_factory) -> Path:
    return write_sentiment_csv(tmp_path_factory.mktemp("onnx-data") / "sentiment.csv")


def export_cfg(model: Path | str, csv: Path, output_dir: Path, **overrides) -> OnnxExportConfig:
    return OnnxExportConfig(model=str(model), output_dir=str(output_dir), data=data_cfg(csv), eval_batch_size=16,
                            **overrides)


@pytest.fixture(scope="module")
def exports(csv, tmp_path_factory) -> dict[str, tuple[Path, Path, dict]]:
    """Each kind saved and exported: its PyTorch folder, its export folder and the export's metrics."""
    root = tmp_path_factory.mktemp("onnx")
    found = {}
    for kind in KINDS:
        source = save_kind(kind, root / kind)
        result = EXPORT_ONNX.run(export_cfg(source, csv, root / f"{kind}-onnx"))
        found[kind] = source, result.run_dir / "model", result.metrics
    return found


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_exports_with_the_pytorch_logits_and_an_int8_copy_that_mostly_agrees(kind, exports):
    source, _, metrics = exports[kind]
    assert (json.loads((source / "config.json").read_text()).get("compression") is not None) == (
        kind in ("uneven_heads", "int8_embedding"))  # these two need the remote code to load in PyTorch
    fp32, int8 = metrics["onnx"]["fp32"], metrics["onnx"]["int8"]
    assert metrics["examples"] == 41 and metrics["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert fp32["max_abs_logit_diff"] < 1e-5 and fp32["prediction_agreement"] == 1.0
    assert fp32["accuracy"] == metrics["pytorch"]["accuracy"]
    assert int8["prediction_agreement"] >= 0.9 and 0 < int8["max_abs_logit_diff"] < 0.1
    assert int8["disk_mb"] < fp32["disk_mb"] and int8["weight_mb"] < fp32["weight_mb"] / 2
    if kind == "stock":  # the fp32 graph holds exactly the model's parameters
        assert fp32["parameters"] == sum(p.numel() for p in load_classifier(str(source)).parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_the_export_folder_runs_with_a_tokenizer_and_onnxruntime_alone_at_any_shape(kind, exports):
    source, folder, _ = exports[kind]
    assert sorted(p.name for p in folder.iterdir()) == sorted([*FILES.values(), "config.json", "tokenizer.json",
                                                               "tokenizer_config.json"])
    assert json.loads((folder / "config.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    session = onnxruntime.InferenceSession(str(folder / FILES["fp32"]), providers=["CPUExecutionProvider"])
    model = load_classifier(str(source)).eval()
    for texts in (["good"], [text for text, _ in make_sentences(5, seed=3)] + ["the film " * 20]):
        batch = tokenizer(texts, padding=True, return_tensors="np")
        (logits,) = session.run(["logits"], {node.name: batch[node.name] for node in session.get_inputs()})
        with torch.no_grad():
            expected = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
        assert logits.shape == (len(texts), 2)
        assert torch.allclose(torch.from_numpy(logits), expected, atol=1e-5)


def test_an_export_beyond_the_tolerance_fails_and_writes_no_model_folder(csv, exports, tmp_path):
    source = exports["stock"][0]
    with pytest.raises(RuntimeError, match=r"the fp32 ONNX model's logits differ from PyTorch's by up to .* \(tolerance "
                                           r"1e-15; predictions agree on 100.00%\): the export is wrong"):
        EXPORT_ONNX.run(export_cfg(source, csv, tmp_path / "run", tolerance=1e-15))
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "metrics.json").exists()


def test_without_int8_only_the_fp32_file_is_written(csv, exports, tmp_path):
    metrics = EXPORT_ONNX.run(export_cfg(exports["stock"][0], csv, tmp_path / "run", int8=False, opset=14)).metrics
    assert list(metrics["onnx"]) == ["fp32"] and metrics["opset"] == 14
    assert not (tmp_path / "run" / "model" / FILES["int8"]).exists()


def test_bad_configs_are_one_line_errors_before_any_work(csv, exports, tmp_path, monkeypatch, capsys):
    source = exports["stock"][0]
    llama = tmp_path / "llama"
    tiny_causal_lm(len(TOKENIZER), tied=True).save_pretrained(llama)
    build_variant(str(source), "dynamic_int8", TOKENIZER, tmp_path / "dynamic_int8")
    bad = [({"opset": 13}, "opset must be from 14 to 20; got 13"),
           ({"split": "train"}, "split must be one of validation, test; got 'train'"),
           ({"tolerance": 0.0}, "tolerance must be positive; got 0.0"),
           ({"model": str(llama)}, "ONNX export handles sequence classifiers of the encoder families bert, roberta, "
                                   "xlm-roberta, electra; .* is a 'llama' LlamaForCausalLM"),
           ({"model": str(tmp_path / "dynamic_int8")}, r"is a quantized variant \(quantization in its config.json\); "
                                                       "export its full-precision model")]
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=message):
            EXPORT_ONNX.check(export_cfg(**{"model": source, "csv": csv, "output_dir": tmp_path / "run",
                                            **overrides}))
    with pytest.raises(ConfigError, match="model path not found"):  # a path that may be an earlier stage's: at run
        EXPORT_ONNX.run(export_cfg(tmp_path / "not" / "there", csv, tmp_path / "run"))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ConfigError, match=r'ONNX export and ONNX Runtime need the onnxruntime package: pip install '
                                          r'-e "\.\[onnx\]"'):
        EXPORT_ONNX.check(export_cfg(source, csv, tmp_path / "run"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        export_recipe(["--config", str(ROOT / "recipes" / "export_onnx.yaml"), f"model={source}"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == 'config error: ONNX export and ONNX Runtime need the onnxruntime package: pip ' \
                                      'install -e ".[onnx]"\n'
    assert not (tmp_path / "run").exists()


def test_the_report_measures_the_onnx_files_beside_the_pytorch_model(csv, tmp_path):
    teacher = str(save_tiny_teacher(tmp_path / "teacher"))
    report = {"eval_batch_size": 64, "latency": PIPELINE_LATENCY}
    cfg = PipelineConfig(output_dir=str(tmp_path / "run"), data=data_cfg(csv), stages=[
        StageEntry(kind="export_onnx", model=teacher), StageEntry(kind="report", model=teacher, overrides=report)])
    stages = run_pipeline(cfg)
    assert stages[0].models == {name: tmp_path / "run" / "01-export_onnx" / "model" / file
                                for name, file in FILES.items()}
    rows = json.loads((stages[1].folder / "model" / "compression_report.json").read_text())["rows"]
    assert [(row["model"], row["runtime"]) for row in rows] == [
        ("export_onnx/fp32", "onnxruntime"), ("export_onnx/int8", "onnxruntime"), ("served", "torch")]
    fp32, int8, served = rows
    assert fp32["accuracy"] == served["accuracy"]
    assert int8["disk_mb"] < fp32["disk_mb"] and all(row["latency_ms"] > 0 for row in rows)
    table = (stages[1].folder / "model" / "compression_report.md").read_text()
    assert "| export_onnx/int8 | export_onnx | onnxruntime |" in table and "| served | - | torch |" in table
    on_the_onnx_file = dataclasses.replace(cfg, stages=[cfg.stages[0], StageEntry(kind="report", overrides=report)])
    with pytest.raises(ConfigError, match=r"stage 2 \('report'\): the report serves a transformers model with its "
                                          "card, not the ONNX file .*model-int8.onnx"):
        plan_pipeline(on_the_onnx_file)
