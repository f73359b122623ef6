"""The compression report (JSON rows, Markdown table, PNG plot; parameters and Pareto front) and the model card
(Hub front matter with model-index, every step, the metrics table, the flags loading needs)."""
import json
from operator import itemgetter
from pathlib import Path

import pytest
import yaml

from distill.core.errors import ConfigError
from distill.core.gate import GateRule
from distill.core.models import load_tokenizer
from distill.pipeline.card import (
    CardFacts,
    IndexDataset,
    IndexEntry,
    LMCardFacts,
    draft_section,
    hub_dataset_id,
    hub_model_id,
    loading_section,
    model_card,
    model_index,
)
from quant.config import ReportConfig
from quant.measure.compression_report import FIGURES, markdown_table, pareto_front, stored_parameters
from quant.measure.report_stages import check_report_config
from quant.schemes.variants import build_variant, load_variant

MODELS = ["teacher", "student", "quantize/fp32", "quantize/dynamic_int8"]


def served_folder(tiny_pipeline) -> Path:
    return Path(tiny_pipeline[0].output_dir) / "04-report" / "model"


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_the_report_has_a_row_per_saved_model_in_json_markdown_and_png(tiny_pipeline):
    folder = served_folder(tiny_pipeline)
    report = json.loads((folder / "compression_report.json").read_text())
    rows = report["rows"]
    assert [row["model"] for row in rows] == MODELS and report["reference"] == "teacher"
    assert report["split"] == "test" and report["latency_batch"] == [4, 16]
    for row in rows:
        assert 0 <= row["accuracy"] <= 1 and row["latency_ms"] > 0 and row["disk_mb"] > 0
        assert set(FIGURES) <= set(row)  # what a gate may name is measured
        assert row["examples_per_s"] == pytest.approx(4000 / row["latency_ms"])
    teacher, student, fp32, int8 = rows
    assert student["parameters"] < teacher["parameters"] and student["disk_mb"] < teacher["disk_mb"]
    assert int8["parameters"] == fp32["parameters"] == student["parameters"]  # quantized weights still count
    assert int8["weight_mb"] < fp32["weight_mb"] and int8["disk_mb"] == fp32["disk_mb"]  # int8 applied at load
    table = (folder / "compression_report.md").read_text().splitlines()
    assert len(table) == 2 + 2 + len(MODELS) and table[4].startswith("| teacher | finetune |")
    assert (folder / "compression_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_card_has_hub_front_matter_every_step_the_metrics_and_how_to_load(tiny_pipeline):
    card = (served_folder(tiny_pipeline) / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == "tiny/bert" and meta["datasets"] == ["tiny/sentiment"]
    assert meta["library_name"] == "transformers" and {"distillation", "quantization"} <= set(meta["tags"])
    (result,) = meta["model-index"][0]["results"]
    report = json.loads((served_folder(tiny_pipeline) / "compression_report.json").read_text())
    assert meta["model-index"][0]["name"] == "me/tiny-student"
    assert result["metrics"][0]["value"] == round(report["rows"][-1]["accuracy"], 4)
    for heading in ("### 1. teacher (`finetune`)", "### 2. student (`distill`)", "### 3. quantize (`quantize`)"):
        assert heading in card
    assert "variants:\n- fp32\n- dynamic_int8" in card and "| quantize/dynamic_int8 | quantize |" in card
    assert 'from_pretrained("me/tiny-student")' in card and "quantize_dynamic" in card
    assert "trust_remote_code" not in card and "## Limitations" in card
    (gate,) = report["gate"]  # the student is smaller on disk than the teacher: passed, and recorded
    assert gate["passed"] and gate["value"] < gate["threshold"] == report["rows"][0]["disk_mb"]
    assert "- disk_mb of quantize/dynamic_int8 is" in card and "(disk_mb <= 1 * teacher): passed" in card


def test_loading_code_names_remote_code_for_pruned_and_bitsandbytes_settings_for_quantized_checkpoints():
    pruned = loading_section({"compression": {"layers": []}, "auto_map": {}}, "me/pruned")
    assert 'from_pretrained("me/pruned", trust_remote_code=True)' in pruned
    nf4 = loading_section({"quantization_config": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                                   "quant_method": "bitsandbytes"}}, "me/nf4")
    assert "BitsAndBytesConfig(**{'load_in_4bit': True, 'bnb_4bit_quant_type': 'nf4'})" in nf4
    assert "trust_remote_code" not in nf4


def test_a_card_without_hub_ids_leaves_them_out(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    facts = CardFacts(repo_id=None, base_model=None, datasets=[], dataset_name="reviews.csv", split="test",
                      accuracy=0.5, license=None, tags=[])
    meta = front_matter(model_card(tmp_path, facts, [], "| table |", None))
    assert "base_model" not in meta and "datasets" not in meta and "license" not in meta
    assert meta["model-index"][0]["results"][0]["dataset"]["name"] == "reviews.csv"


@pytest.mark.parametrize("name, hub_id", [("offline:all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
                                          ("hub:org/model", "org/model"), ("./runs/teacher/model", None)])
def test_hub_model_ids(name, hub_id):
    assert hub_model_id(name) == hub_id


@pytest.mark.parametrize("source, hub_id", [("offline:rotten_tomatoes", "cornell-movie-review-data/rotten_tomatoes"),
                                            ("hub:org/data", "org/data"), ("offline:imdb", "stanfordnlp/imdb")])
def test_hub_dataset_ids(source, hub_id):
    assert hub_dataset_id(source) == hub_id


def test_stored_parameters_count_quantized_weights_as_numbers(four_bit_teacher_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    variants = ("fp32", "dynamic_int8", "bnb_int8", "bnb_nf4")
    folder = str(four_bit_teacher_dir)
    for variant in variants:
        build_variant(folder, variant, load_tokenizer(folder), tmp_path / variant)
    counts = {variant: stored_parameters(load_variant(tmp_path / variant)) for variant in variants}
    assert len(set(counts.values())) == 1, counts


def test_markdown_table_and_pareto_front_compare_with_the_reference():
    rows = [dict(model="teacher", kind="finetune", runtime="torch", accuracy=0.9, parameters=2e6, disk_mb=8.0,
                 weight_mb=8.0, latency_ms=20.0, examples_per_s=1600),
            dict(model="student", kind="distill", runtime="onnxruntime", accuracy=0.88, parameters=1e6, disk_mb=4.0,
                 weight_mb=4.0, latency_ms=10.0, examples_per_s=3200),
            dict(model="worse", kind="prune", runtime="torch", accuracy=0.8, parameters=1e6, disk_mb=5.0,
                 weight_mb=5.0, latency_ms=12.0, examples_per_s=2600)]
    lines = markdown_table(rows, "test", (32, 64)).splitlines()
    assert "CPU ms/batch (32x64)" in lines[0] and "vs teacher (points)" in lines[0]
    assert lines[3].startswith("| student | distill | onnxruntime | 88.00 | -2.00 | 1.00M |")
    assert lines[3].endswith("| 0.50x | 2.00x |")
    assert [row["model"] for row in pareto_front(rows, itemgetter("disk_mb"), itemgetter("accuracy"))] == [
        "student", "teacher"]


def test_the_report_measures_task_models_not_a_general_distillations_headless_encoder(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    from distill.pipeline.plan import Stage
    from quant.measure.report_stages import candidates_of

    config = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    BertModel(config).save_pretrained(tmp_path / "general")
    BertForSequenceClassification(config).save_pretrained(tmp_path / "student")
    stages = [Stage(i, name, name, None, None, tmp_path, "-", {"model": tmp_path / name}, tmp_path / name, "-")
              for i, name in enumerate(["general", "student"])]
    assert [c.label for c in candidates_of(stages, str(tmp_path / "student"))] == ["student"]


def test_model_index_holds_one_result_per_task_and_dataset_with_its_metrics_in_order():
    imdb, sst2 = IndexDataset("IMDB", "stanfordnlp/imdb", "test"), IndexDataset("SST-2", "glue", "validation")
    index = model_index("me/model", [IndexEntry("text-generation", imdb, "perplexity", 12.5, "test perplexity"),
                                     IndexEntry("text-classification", sst2, "accuracy", 0.91),
                                     IndexEntry("text-generation", imdb, "loop_share", 0.1)])
    parsed = yaml.safe_load(yaml.safe_dump({"model-index": index}))["model-index"]
    assert [entry["name"] for entry in parsed] == ["me/model"]
    generation, classification = parsed[0]["results"]
    assert generation["task"] == {"type": "text-generation", "name": "Text Generation"}
    assert generation["dataset"] == {"name": "IMDB", "type": "stanfordnlp/imdb", "split": "test"}
    assert generation["metrics"] == [{"type": "perplexity", "value": 12.5, "name": "test perplexity"},
                                     {"type": "loop_share", "value": 0.1}]
    assert classification["dataset"]["split"] == "validation" and classification["metrics"][0]["value"] == 0.91


def test_a_classifier_report_gate_on_a_figure_it_does_not_measure_is_refused():
    with pytest.raises(ConfigError, match=r"gate\[0\]: the report measures no figure 'acuracy'; it measures "
                                          "accuracy, "):
        check_report_config(ReportConfig(model="m", gate=[GateRule("acuracy", min=0.9, relative_to="teacher")]))
    check_report_config(ReportConfig(model="m", gate=[GateRule("accuracy", min=0.9, relative_to="teacher")]))


def test_an_lm_card_says_how_to_serve_the_model_as_its_teachers_draft():
    facts = LMCardFacts(repo_id="me/draft", base_model="HuggingFaceTB/SmolLM2-135M-Instruct", datasets=[],
                        dataset_name="imdb", perplexity=30.0, license=None, tags=[], gguf_files=[],
                        draft={"alpha": 0.625, "tokens_per_pass": 2.375, "k": 4})
    title, text, python, bash = draft_section(facts)
    assert title == "## As a draft for speculative decoding"
    assert "2.38 tokens per pass of `HuggingFaceTB/SmolLM2-135M-Instruct` with 4 proposals" in text
    assert "acceptance rate of 0.625" in text
    assert 'speculative_config={"model": "me/draft", "num_speculative_tokens": 4}' in python
    assert "assistant_model=draft" in python and "-md draft.gguf --draft-max 4" in bash
    facts.draft = None
    assert draft_section(facts) == []
