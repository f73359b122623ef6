"""scripts/vocab_study.py end to end on one tiny BERT student whose vocabulary holds four words the data never uses:
the three recipe processes it launches (vocabulary pruning, int8 word embedding, bitsandbytes int8), its summary and
its table. The recipes read the test's 200-sentence CSV instead of their offline Rotten Tomatoes (about 25 s instead
of 98 s): the test appends data and latency overrides to the ones the script passes on."""
import json
from pathlib import Path

import torch
from transformers import BertForSequenceClassification

import vocab_study
from tests.conftest import NEGATIVE, NEUTRAL, POSITIVE, make_tokenizer, tiny_bert_config, write_sentiment_csv

UNUSED = ["absent", "missing", "unseen", "unused"]
HIDDEN = 32  # tiny_bert_config's width: one word fewer is one row of the word embedding fewer
TEACHER = {"test_accuracy": 0.8, "parameters": 4e6, "disk_mb": 16.0}


def save_student(folder: Path) -> Path:
    tokenizer = make_tokenizer(POSITIVE + NEGATIVE + NEUTRAL + UNUSED)
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config(len(tokenizer), num_hidden_layers=2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_three_steps_from_one_student_against_the_teacher(tmp_path, monkeypatch, capsys):
    student, teacher, out = save_student(tmp_path / "student"), tmp_path / "teacher.json", tmp_path / "study"
    teacher.write_text(json.dumps(TEACHER))
    data = [f"data.source={write_sentiment_csv(tmp_path / 'sentiment.csv')}", "data.text_column=review",
            "data.label_column=sentiment", "data.max_length=16"]
    latency = ["latency.batch_size=4", "latency.max_length=16", "latency.warmup=0", "latency.repeats=1",
               "latency.rounds=1"]
    launch = vocab_study.run
    monkeypatch.setattr(vocab_study, "run", lambda script, config, folder, overrides: launch(
        script, config, folder, [*overrides, *data, *(latency if script == "quantize_model.py" else [])]))
    vocab_study.main([str(student), "--teacher-metrics", str(teacher), "--out", str(out)])

    table = capsys.readouterr().out.splitlines()
    assert table[0] == ("| model | test acc. (mean ± std) | kept of teacher | params | disk MB | "
                        "of teacher's disk |")
    assert table[2] == "| teacher | 80.00 | 100.0% | 4.0M | 16.0 | 1/1 |"
    assert [line.split(" | ")[0] for line in table[3:]] == [f"| {step}" for step in vocab_study.STEPS]
    rows = json.loads((out / "summary.json").read_text())["students"][0]
    parameters = sum(p.numel() for p in BertForSequenceClassification.from_pretrained(student).parameters())
    disk_mb = (student / "model.safetensors").stat().st_size / 1e6
    assert rows["student"]["parameters"] == parameters and rows["student"]["disk_mb"] == disk_mb
    pruned = rows["+ vocabulary pruning"]
    assert pruned["tokens_kept"] == len(make_tokenizer(POSITIVE + NEGATIVE + NEUTRAL))
    assert pruned["parameters"] == parameters - len(UNUSED) * HIDDEN
    # the pruned words never occur, so no prediction changes
    assert pruned["accuracy"] == rows["student"]["accuracy"]
    accuracy = rows["student"]["accuracy"]
    assert table[3] == (f"| student | {100 * accuracy:.2f} ± 0.00 | {100 * accuracy / 0.8:.1f}% | "
                        f"{parameters / 1e6:.2f}M | {disk_mb:.2f} | 1/{16.0 / disk_mb:.1f} |")
    assert rows["+ int8 word embedding"]["disk_mb"] < pruned["disk_mb"]
    assert rows["+ bnb int8 Linears"]["disk_mb"] < rows["+ int8 word embedding"]["disk_mb"]
    assert rows["+ bnb int8 Linears"]["parameters"] == rows["+ int8 word embedding"]["parameters"]
