"""scripts/bench_inference.py on tiny random BERT classifiers: one row per requested device x batch x model x
variant x dtype, throughput and speed consistent with the latencies, n/a rows for the combinations that do not
exist, and bad requests (a missing folder, another vocabulary) refused before anything is measured."""
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification

import bench_inference as bench
from distill.core.errors import ConfigError
from tests.conftest import (
    FOUR_BIT_WIDTHS,
    NEGATIVE,
    NEUTRAL,
    POSITIVE,
    make_sentences,
    make_tokenizer,
    save_tiny_teacher,
    tiny_bert_config,
)

TEXTS = [text for text, _ in make_sentences(3)]
VARIANTS = ["full", "dynamic_int8", "bnb_int8", "bnb_nf4"]
DTYPES = ["fp32", "bf16"]
QUICK = dict(devices=["cpu"], max_length=16, rounds=1, warmup=0, repeats=1)


def save_student(folder: Path, words: list[str], layers: int = 2) -> str:
    tokenizer = make_tokenizer(words)
    torch.manual_seed(1)
    config = tiny_bert_config(len(tokenizer), num_hidden_layers=layers, **FOUR_BIT_WIDTHS)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    return {"teacher": str(save_tiny_teacher(root / "teacher", **FOUR_BIT_WIDTHS)),
            "student": save_student(root / "student", POSITIVE + NEGATIVE + NEUTRAL)}


def test_every_requested_row_is_present_and_consistent(models):
    rows = bench.measure(models, TEXTS, VARIANTS, DTYPES, [1, 2], **QUICK)
    keys = [(r["device"], r["batch"], r["model"], r["variant"], r["dtype"]) for r in rows]
    assert keys == [("cpu", b, m, v, d) for b in (1, 2) for m in models for v in VARIANTS for d in DTYPES]
    unmeasured = {(r["variant"], r["dtype"]) for r in rows if r["median_ms"] is None}
    assert unmeasured == {("dynamic_int8", "bf16"), ("bnb_int8", "bf16")}
    for r in rows:
        if r["median_ms"] is None:
            assert r["note"] and r["examples_per_s"] is None and r["speed_vs_reference"] is None
            continue
        assert r["median_ms"] > 0 and r["note"] is None
        assert r["examples_per_s"] == pytest.approx(r["batch"] * 1000 / r["median_ms"])
        reference = next(x for x in rows if (x["batch"], x["model"], x["variant"], x["dtype"])
                         == (r["batch"], "teacher", "full", "fp32"))
        assert r["speed_vs_reference"] == pytest.approx(reference["median_ms"] / r["median_ms"])
    assert all(r["speed_vs_reference"] == 1.0 for r in rows if (r["model"], r["variant"], r["dtype"])
               == ("teacher", "full", "fp32"))
    table = bench.markdown(rows, "teacher", 16).splitlines()
    assert table[0].startswith("| device | model | variant | dtype | batch (x16 tokens) | median ms/batch |")
    assert len([line for line in table if line.startswith("| cpu |")]) == len(rows)
    assert "| cpu | student | dynamic_int8 | bf16 | 2 | n/a | n/a | n/a |" in table
    assert any(line.startswith("- n/a, bnb_int8 bf16 on cpu: LLM.int8 has no compute dtype") for line in table)


def test_the_bench_builds_each_variant_it_names(models):
    kinds = {("full", "bf16"): torch.bfloat16, ("bnb_nf4", "bf16"): torch.bfloat16, ("bnb_nf4", "fp32"): torch.float32}
    for (variant, dtype), expected in kinds.items():
        query = bench.build(models["teacher"], variant, dtype, "cpu").bert.encoder.layer[0].attention.self.query
        compute = query.weight.dtype if variant == "full" else query.compute_dtype
        assert compute == expected
    dynamic = bench.build(models["teacher"], "dynamic_int8", "fp32", "cpu").bert.encoder.layer[0].attention.self.query
    assert type(dynamic) is torch.ao.nn.quantized.dynamic.Linear


def test_a_missing_model_folder_is_refused_before_anything_is_measured(models, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "build", lambda *args: pytest.fail("a model was built"))
    with pytest.raises(ConfigError, match=r"not a saved model folder \(no config.json\): pruned=.*absent"):
        bench.measure({**models, "pruned": str(tmp_path / "absent")}, TEXTS, VARIANTS, DTYPES, [1], **QUICK)
    with pytest.raises(ConfigError, match="keep 'full' among the variants"):
        bench.measure(models, TEXTS, ["bnb_nf4"], DTYPES, [1], **QUICK)


def test_a_model_with_another_vocabulary_is_refused(models, tmp_path):
    other = save_student(tmp_path / "other", ["good", "bad"])
    with pytest.raises(ConfigError, match="model 'other' has another vocabulary than 'teacher'"):
        bench.measure({"teacher": models["teacher"], "other": other}, TEXTS, ["full"], ["fp32"], [1], **QUICK)
