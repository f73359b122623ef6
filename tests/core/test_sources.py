import json

import pytest

from distill.core.config import CorpusConfig, DataConfig
from distill.core.data import label_names, load_splits, load_texts, tokenize
from distill.core.errors import ConfigError
from distill.core.models import resolve_model
from tests.conftest import make_sentences, make_tokenizer


def test_csv_with_custom_columns_and_string_labels_gets_deterministic_splits(sentiment_csv):
    cfg = DataConfig(source=str(sentiment_csv), text_column="review", label_column="sentiment",
                     validation_fraction=0.1, test_fraction=0.2)
    splits = load_splits(cfg)
    assert {name: len(split) for name, split in splits.items()} == {"train": 139, "validation": 20, "test": 41}
    assert label_names(splits) == ["neg", "pos"]
    assert set(splits["train"]["label"]) == {0, 1}
    again = load_splits(cfg)
    assert again["test"]["text"] == splits["test"]["text"]
    other_seed = load_splits(DataConfig(**{**cfg.__dict__, "split_seed": 7}))
    assert other_seed["test"]["text"] != splits["test"]["text"]
    assert sorted(list(splits["train"]["text"]) + list(splits["validation"]["text"]) + list(splits["test"]["text"])) == sorted(
        text for text, _ in make_sentences(200))


def test_json_lines_with_many_classes_and_existing_splits_are_kept(tmp_path):
    rows = [{"sentence": text, "topic": ["a", "b", "c"][i % 3]} for i, (text, _) in enumerate(make_sentences(30))]
    path = tmp_path / "topics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    splits = load_splits(DataConfig(source=str(path), text_column="sentence", label_column="topic"))
    assert label_names(splits) == ["a", "b", "c"]
    assert sum(len(s) for s in splits.values()) == 30


def test_tokenize_truncates_and_keeps_labels(sentiment_csv):
    tokenizer = make_tokenizer(["the", "film", "good", "bad"])
    splits = load_splits(DataConfig(source=str(sentiment_csv), text_column="review", label_column="sentiment"))
    tokenized = tokenize(splits, tokenizer, max_length=6)
    assert set(tokenized["train"].column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert max(len(ids) for ids in tokenized["train"]["input_ids"]) == 6


def test_missing_column_and_file_are_clear_errors(sentiment_csv, tmp_path):
    with pytest.raises(ConfigError, match="data.text_column='text' is not a column.*columns: review, sentiment"):
        load_splits(DataConfig(source=str(sentiment_csv), label_column="sentiment"))
    with pytest.raises(ConfigError, match="data file not found"):
        load_splits(DataConfig(source=str(tmp_path / "absent.csv")))
    with pytest.raises(ConfigError, match="unknown offline dataset 'sst2'"):
        load_splits(DataConfig(source="offline:sst2"))
    with pytest.raises(ConfigError, match="model path not found"):
        resolve_model("./no/such/model")
    with pytest.raises(ConfigError, match="model path not found"):
        resolve_model("runs/teacher-typo/model")
    with pytest.raises(ConfigError, match="unknown offline model"):
        resolve_model("offline:bert-huge")


def test_offline_rotten_tomatoes_split_sizes():
    splits = load_splits(DataConfig(source="offline:rotten_tomatoes"))
    sizes = {name: len(split) for name, split in splits.items()}
    assert sum(sizes.values()) == 8530
    assert sizes["test"] == 1707 and sizes["validation"] == 853
    assert set(splits["test"]["label"]) == {0, 1}
    by_hub_id = load_splits(DataConfig(source="cornell-movie-review-data/rotten_tomatoes"))  # offline copy, no network
    assert list(by_hub_id["test"]["text"]) == list(splits["test"]["text"])


def test_offline_model_resolves_by_alias_and_prefix():
    path = resolve_model("offline:all-MiniLM-L6-v2")
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == path
    assert resolve_model("hub:sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"


def test_parquet_file_with_integer_labels(tmp_path):
    import pandas as pd

    rows = make_sentences(40)
    path = tmp_path / "reviews.parquet"
    pd.DataFrame({"text": [t for t, _ in rows], "label": [int(lab == "pos") for _, lab in rows]}).to_parquet(path)
    splits = load_splits(DataConfig(source=str(path)))
    assert sum(len(s) for s in splits.values()) == 40
    assert label_names(splits) == ["0", "1"]


def test_a_corpus_shuffle_is_seeded_and_comes_before_the_limit(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(f"review {i}" for i in range(20)) + "\n\n")
    ordered = load_texts(CorpusConfig(source=str(path)))
    shuffled = load_texts(CorpusConfig(source=str(path), shuffle_seed=3))
    assert ordered == [f"review {i}" for i in range(20)]
    assert sorted(shuffled) == sorted(ordered) and shuffled != ordered
    assert shuffled == load_texts(CorpusConfig(source=str(path), shuffle_seed=3))
    assert load_texts(CorpusConfig(source=str(path), shuffle_seed=3, limit=5)) == shuffled[:5]


def test_a_corpus_of_prompts_read_as_texts_is_told_to_set_its_format(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    with pytest.raises(ConfigError) as caught:
        load_texts(CorpusConfig(source=str(path)))
    assert str(caught.value) == (f"data.text_column='text' is not a column of {path} (it has prompts: set "
                                 "data.format); columns: prompt, completion")


def test_a_file_that_is_not_utf8_is_one_line_naming_the_file_and_byte_and_data_encoding_reads_it(tmp_path):
    path = tmp_path / "latin1.csv"
    rows = ["text,label"] + [f"{text},{label}" for text, label in make_sentences(30)] + ["un film très bien,pos"]
    path.write_bytes("\n".join(rows).encode("latin-1"))
    cfg = DataConfig(source=str(path))
    with pytest.raises(ConfigError) as caught:
        load_splits(cfg)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"data file {path} is not valid utf-8: byte 0xe8 at offset ")
    assert "(line 32); set data.encoding" in message
    splits = load_splits(DataConfig(source=str(path), encoding="latin-1"))
    assert "un film très bien" in [text for split in splits.values() for text in split["text"]]
    with pytest.raises(ConfigError, match="data.encoding 'latin-2000' is not an encoding Python knows"):
        load_splits(DataConfig(source=str(path), encoding="latin-2000"))


def test_truncation_shares_per_split_are_measured_and_a_large_cut_warns_once(sentiment_csv, tiny_teacher_dir, caplog):
    from distill.core.run import load_task

    data = DataConfig(source=str(sentiment_csv), text_column="review", label_column="sentiment", max_length=6)
    with caplog.at_level("WARNING"):
        task = load_task(data, str(tiny_teacher_dir))
    lengths = {name: [len(t.split()) + 2 for t in load_splits(data)[name]["text"]] for name in task.splits}
    for name, shares in task.truncation.items():
        cut = [n - 6 for n in lengths[name] if n > 6]
        assert shares == {"examples": len(cut) / len(lengths[name]), "tokens": sum(cut) / sum(lengths[name])}
    warnings = [r.getMessage() for r in caplog.records if "data.max_length=6 cuts" in r.getMessage()]
    assert len(warnings) == 1 and "train" in warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING"):
        task = load_task(DataConfig(**{**vars(data), "max_length": 64}), str(tiny_teacher_dir))
    assert all(shares == {"examples": 0.0, "tokens": 0.0} for shares in task.truncation.values())
    assert not [r for r in caplog.records if "cuts" in r.getMessage()]
