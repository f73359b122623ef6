"""The quantization report's numbers on a tiny BERT wide enough for the ratios to show (quantized Linear weights
about 1/4 of fp32 for int8, 1/8 plus scales for NF4), and a quantization run end to end: every variant saved,
reloaded equal and measured, written as JSON and as a Markdown table."""
import json

import pytest
import torch
from transformers import BertForSequenceClassification

from distill.core.config import DataConfig, parse_args
from distill.core.errors import ConfigError
from quant.config import LatencyConfig, QuantConfig
from quant.measure.classifier_metrics import forward_peak_bytes, markdown_table, weight_memory
from quant.quantize import quantize
from quant.schemes.variants import build_variant
from tests.conftest import data_cfg, make_tokenizer, tiny_bert_config, tiny_causal_lm

TOKENIZER = make_tokenizer(["good", "bad", "film"])
SKIP = ["bert.pooler", "classifier"]
# Linears targeted: per layer 4 of 256x256 and 2 of 256x512, fp32
TARGET_FP32_MB = 2 * 4 * (4 * 256 * 256 + 2 * 256 * 512) / 1e6


@pytest.fixture(scope="module")
def wide_bert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(len(TOKENIZER), hidden_size=256, intermediate_size=512,
                                                           num_hidden_layers=2))
    model.save_pretrained(folder)
    TOKENIZER.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("variant, low, high", [
    ("fp32", 1.0, 1.0),
    ("bf16", 0.5, 0.5),
    ("dynamic_int8", 0.25, 0.27),  # + one float64 scale and one int64 zero point per row
    ("bnb_int8", 0.25, 0.255),  # + one fp32 scale per row
    ("bnb_nf4", 0.125, 0.135),  # + one int8 scale per 64 weights, their fp32 scales and the code tables
    ("bnb_fp4", 0.125, 0.135),
])
def test_quantized_linear_weights_shrink_as_their_bits(variant, low, high, wide_bert, tmp_path):
    model = build_variant(wide_bert, variant, TOKENIZER, tmp_path / variant)
    memory = weight_memory(model, SKIP)
    assert memory["linear_fp32_mb"] == pytest.approx(TARGET_FP32_MB)
    assert low <= memory["linear_ratio"] <= high
    assert memory["weight_mb"] > memory["linear_mb"]  # embeddings, norms, biases and heads too
    with torch.inference_mode():
        model(input_ids=torch.full((2, 8), 6))  # bitsandbytes int8 moves its row scales at the first pass
    assert weight_memory(model, SKIP) == memory


def test_total_weight_memory_counts_parameters_buffers_and_quantization_state(wide_bert, tmp_path):
    fp32 = build_variant(wide_bert, "fp32", TOKENIZER, tmp_path / "fp32")
    everything = sum(t.numel() * t.element_size() for t in [*fp32.parameters(), *fp32.buffers()])
    assert weight_memory(fp32, SKIP)["weight_mb"] == pytest.approx(everything / 1e6)
    nf4 = build_variant(wide_bert, "bnb_nf4", TOKENIZER, tmp_path / "nf4")
    stored = sum(t.numel() * t.element_size() for t in [*nf4.parameters(), *nf4.buffers()])
    nf4_memory = weight_memory(nf4, SKIP)
    assert stored < nf4_memory["weight_mb"] * 1e6 < stored * 1.05  # block scales live outside the parameters
    saving = weight_memory(fp32, SKIP)["linear_mb"] - nf4_memory["linear_mb"]
    assert weight_memory(fp32, SKIP)["weight_mb"] - nf4_memory["weight_mb"] == pytest.approx(saving, rel=0.02)


def test_forward_peak_grows_with_the_batch(wide_bert, tmp_path):
    model = build_variant(wide_bert, "fp32", TOKENIZER, tmp_path / "fp32")
    small, large = (dict(input_ids=torch.full((n, 16), 6), attention_mask=torch.ones(n, 16, dtype=torch.long))
                    for n in (2, 8))
    hidden_states = 8 * 16 * 256 * 4
    assert hidden_states < forward_peak_bytes(model, large) and forward_peak_bytes(model, small) < forward_peak_bytes(
        model, large)


def test_markdown_table_compares_with_the_first_row():
    row = dict(variant="fp32", accuracy=0.8, weight_mb=10.0, linear_mb=8.0, linear_ratio=1.0, forward_peak_mb=3.0,
               disk_mb=10.0, latency_ms=20.0)
    nf4 = row | dict(variant="bnb_nf4", accuracy=0.79, linear_mb=1.0, linear_ratio=0.125, latency_ms=10.0)
    lines = markdown_table([row, nf4], (32, 64)).splitlines()
    assert "CPU ms/batch (32x64)" in lines[0] and len(lines) == 4
    assert lines[3].startswith("| bnb_nf4 | 79.00 | -1.00 |") and "| 12.5% |" in lines[3]
    assert lines[3].endswith("| 10.0 | 2.00x |")


def quant_cfg(csv, model, out, **overrides):
    values = dict(model=str(model), output_dir=str(out), data=data_cfg(csv), eval_batch_size=64,
                  variants=["fp32", "bf16", "dynamic_int8", "bnb_int8", "bnb_nf4"],
                  latency=LatencyConfig(batch_size=4, max_length=16, warmup=0, repeats=2, rounds=1))
    values.update(overrides)
    return QuantConfig(**values)


def test_a_quantization_run_saves_reloads_and_reports_every_variant(four_bit_teacher_dir, sentiment_csv, tmp_path):
    result = quantize(quant_cfg(sentiment_csv, four_bit_teacher_dir, tmp_path / "q"))
    metrics = json.loads((tmp_path / "q" / "metrics.json").read_text())
    rows = metrics["variants"]
    assert list(rows) == ["fp32", "bf16", "dynamic_int8", "bnb_int8", "bnb_nf4"]
    assert metrics["skip_modules"] == ["bert.pooler", "classifier"] and metrics["examples"] == 41
    for name, row in rows.items():
        assert row["reload_equal"], name
        assert 0 <= row["accuracy"] <= 1 and row["latency_ms"] > 0 and row["forward_peak_mb"] > 0
        assert (tmp_path / "q" / name / "config.json").is_file()
    assert rows["bnb_int8"]["disk_mb"] < rows["fp32"]["disk_mb"]
    assert rows["dynamic_int8"]["disk_mb"] == rows["fp32"]["disk_mb"]  # saved in fp32, quantized at load
    assert rows["bnb_nf4"]["linear_ratio"] < rows["bnb_int8"]["linear_ratio"] < rows["bf16"]["linear_ratio"] == 0.5
    report = (tmp_path / "q" / "report.md").read_text().splitlines()
    assert len(report) == 2 + 5 and report[2].startswith("| fp32 |")
    assert set(result.models) == set(rows)
    assert (tmp_path / "q" / "config.yaml").is_file()


@pytest.mark.parametrize("overrides, message", [
    (dict(variants=["fp32", "nf4"]), "unknown variant 'nf4'"),
    (dict(split="train"), "split must be one of validation, test"),
    (dict(latency=LatencyConfig(rounds=0)), "latency.rounds must be at least 1"),
])
def test_run_config_errors_come_before_any_work(overrides, message, tiny_teacher_dir, sentiment_csv, tmp_path):
    with pytest.raises(ConfigError, match=message):
        quantize(quant_cfg(sentiment_csv, tiny_teacher_dir, tmp_path / "q", **overrides))
    assert not (tmp_path / "q").exists()


def test_a_run_refuses_a_model_whose_classes_differ_from_the_data(tiny_teacher_dir, tmp_path):
    csv = tmp_path / "three.csv"
    csv.write_text("review,sentiment\n" + "\n".join(f"good film {i},{i % 3}" for i in range(30)) + "\n")
    with pytest.raises(ConfigError, match="predicts 2 classes, the data has 3"):
        quantize(quant_cfg(csv, tiny_teacher_dir, tmp_path / "q"))


def test_a_run_refuses_a_causal_lm(sentiment_csv, tmp_path):
    folder = tmp_path / "llama"
    tiny_causal_lm(len(TOKENIZER), tied=True).save_pretrained(folder)
    TOKENIZER.save_pretrained(folder)
    with pytest.raises(ConfigError, match="is not a sequence classifier"):
        quantize(quant_cfg(sentiment_csv, folder, tmp_path / "q"))


def test_the_student_recipe_config_parses():
    cfg = parse_args(QuantConfig, ["--config", "recipes/quantize_student.yaml"])
    assert cfg.model == "runs/student/model" and cfg.variants == ["fp32", "bf16", "dynamic_int8", "bnb_int8", "bnb_nf4"]
    assert cfg.data == DataConfig(source="offline:rotten_tomatoes", max_length=64)


def test_a_report_reads_the_texts_through_each_models_own_tokenizer(trained_teacher, sentiment_csv, tmp_path):
    """A vocabulary-pruned student numbers its tokens anew: the teacher beside it must not be fed the student's ids."""
    from distill.core.evaluate import accuracy
    from distill.core.io import save_model
    from distill.core.models import load_classifier, load_tokenizer
    from prune.vocab import prune_vocabulary
    from quant.config import ReportConfig
    from quant.measure.compression_report import Candidate, measure_models
    from quant.quantize import evaluation_for

    teacher_dir = trained_teacher.run_dir / "model"
    pruned = load_classifier(str(teacher_dir))
    report = prune_vocabulary(pruned, load_tokenizer(str(teacher_dir)), ["the film was good", "a dull plot"])
    save_model(pruned, report.tokenizer, tmp_path / "pruned")
    cfg = ReportConfig(model=str(tmp_path / "pruned"), data=data_cfg(sentiment_csv),
                       latency=LatencyConfig(batch_size=2, max_length=16, warmup=0, repeats=1, rounds=1))
    candidates = [Candidate("teacher", "-", "-", teacher_dir), Candidate("pruned", "-", "-", tmp_path / "pruned")]
    rows = measure_models(candidates, lambda folder: evaluation_for(cfg, 2, str(folder)), cfg.latency)
    own = evaluation_for(cfg, 2, str(teacher_dir))
    assert rows[0]["accuracy"] == accuracy(load_classifier(str(teacher_dir)), own.loader, own.accelerator)
    assert rows[0]["accuracy"] == trained_teacher.metrics["test_accuracy"]
    assert rows[0]["accuracy"] != rows[1]["accuracy"]  # most words are unknown to the pruned tokenizer
