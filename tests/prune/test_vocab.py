"""Vocabulary pruning: kept tokens tokenize as before under new ids, logits are unchanged, the pruned model and
tokenizer reload with plain Auto classes, unsupported inputs are clear errors, and a pruning run saves it all."""
import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    GPT2Tokenizer,
)

from distill.core.errors import ConfigError
from distill.core.evaluate import disk_size_mb
from distill.core.models import load_classifier
from prune.config import EmbeddingConfig, UnitPruneConfig, VocabConfig
from prune.embeddings import compress_word_embedding
from prune.run import prune
from prune.saving import save_compressed
from prune.vocab import changed_fraction, prune_vocabulary, unknown_fraction
from tests.conftest import logits_of, make_tokenizer, never_train, tiny_bert_config, tiny_causal_lm
from tests.helpers.pruning import prune_cfg

WORDS = ["the", "film", "movie", "was", "good", "bad", "act", "##ing", "##s", "un", "##real", "plot", "dull"]
CORPUS = ["the films was good", "unreal acting", "the plot"]
KEPT_TEXTS = ["the film was good", "unreal acting the plot", "good films"]


@pytest.fixture
def wordpiece():
    return make_tokenizer(WORDS)


@pytest.fixture
def classifier(wordpiece):
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(len(wordpiece))).eval()


def test_kept_tokens_tokenize_as_before_under_new_ids(classifier, wordpiece):
    report = prune_vocabulary(classifier, wordpiece, CORPUS)
    # specials, then the corpus tokens in their old order; "movie", "bad" and "dull" are gone
    assert report.kept_ids == [0, 1, 2, 3, 4, 5, 6, 8, 9, 11, 12, 13, 14, 15, 16]
    assert (report.kept, report.original) == (15, 18)
    new = report.tokenizer
    for args in [(text,) for text in KEPT_TEXTS] + [("the plot", "good films")]:
        old_ids, new_ids = wordpiece(*args)["input_ids"], new(*args)["input_ids"]
        assert [report.kept_ids[i] for i in new_ids] == old_ids
        assert new.convert_ids_to_tokens(new_ids) == wordpiece.convert_ids_to_tokens(old_ids)
    assert new.pad_token_id == 0 and new.cls_token_id == 2 and new.sep_token_id == 3


def test_max_tokens_keeps_single_characters_then_the_most_frequent_tokens():
    tokenizer = make_tokenizer(WORDS + ["x", "##y"])
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(len(tokenizer))).eval()
    corpus = ["the the the film film was xy", "the plot plot"]  # the x3 (+1), plot x2, film x2, was, x, ##y
    report = prune_vocabulary(model, tokenizer, corpus, max_tokens=5 + 4)
    kept = tokenizer.convert_ids_to_tokens(report.kept_ids)
    assert kept[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert set(kept[5:]) == {"x", "##y", "the", "film"} or set(kept[5:]) == {"x", "##y", "the", "plot"}
    assert report.kept == 9 and model.config.vocab_size == 9
    new = report.tokenizer
    assert new.convert_ids_to_tokens(new("xy was the", add_special_tokens=False)["input_ids"]) == \
        ["x", "##y", "[UNK]", "the"]
    with pytest.raises(ConfigError, match="fewer than the 2 single characters"):
        prune_vocabulary(BertForSequenceClassification(tiny_bert_config(len(tokenizer))), tokenizer, corpus,
                         max_tokens=6)


def test_unknown_words_map_to_the_unknown_token(classifier, wordpiece):
    new = prune_vocabulary(classifier, wordpiece, CORPUS).tokenizer
    assert new.convert_ids_to_tokens(new("a dull movie was good")["input_ids"]) == \
        ["[CLS]", "[UNK]", "[UNK]", "[UNK]", "was", "good", "[SEP]"]
    assert unknown_fraction(wordpiece, ["dull movie was good"]) == 0
    assert unknown_fraction(new, ["dull movie was good", "the film"]) == pytest.approx(2 / 6)
    # "a" was unknown already, so only the first text is split differently
    assert changed_fraction(wordpiece, new, ["dull movie was good", "the film", "a film"]) == pytest.approx(1 / 3)


def test_logits_are_identical_on_kept_tokens(classifier, wordpiece):
    before = logits_of(classifier, wordpiece, KEPT_TEXTS)
    report = prune_vocabulary(classifier, wordpiece, CORPUS)
    assert classifier.bert.embeddings.word_embeddings.weight.shape == (15, 32)
    assert classifier.config.vocab_size == 15 and classifier.bert.embeddings.word_embeddings.padding_idx == 0
    assert torch.equal(logits_of(classifier, report.tokenizer, KEPT_TEXTS), before)


def test_pruned_classifier_and_tokenizer_reload_with_plain_auto_classes(classifier, wordpiece, tmp_path):
    report = prune_vocabulary(classifier, wordpiece, CORPUS)
    save_compressed(classifier, report.tokenizer, tmp_path / "pruned")
    assert "compression" not in json.loads((tmp_path / "pruned" / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "pruned")
    assert type(tokenizer) is type(wordpiece) and tokenizer.get_vocab() == report.tokenizer.get_vocab()
    texts = KEPT_TEXTS + ["a dull movie"]
    assert tokenizer(texts)["input_ids"] == report.tokenizer(texts)["input_ids"]
    expected = logits_of(classifier, report.tokenizer, texts)
    for model in (AutoModelForSequenceClassification.from_pretrained(tmp_path / "pruned"),
                  load_classifier(str(tmp_path / "pruned"))):
        assert torch.equal(logits_of(model, tokenizer, texts), expected)


@pytest.mark.parametrize("tied", [True, False])
def test_causal_lm_output_layer_keeps_the_same_rows(wordpiece, tmp_path, tied):
    model = tiny_causal_lm(len(wordpiece), tied)
    ids = wordpiece(KEPT_TEXTS[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    report = prune_vocabulary(model, wordpiece, CORPUS)
    kept = torch.tensor(report.kept_ids)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert model.lm_head.weight.shape == (15, 32) and model.config.vocab_size == model.vocab_size == 15
    new_ids = report.tokenizer(KEPT_TEXTS[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        after = model(input_ids=new_ids).logits
    assert torch.allclose(after, before[..., kept], atol=1e-6)
    save_compressed(model, report.tokenizer, tmp_path / "lm")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == tied
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=new_ids).logits, after)


def test_token_ids_in_the_config_follow_the_new_numbering(wordpiece):
    model = tiny_causal_lm(len(wordpiece), tied=True)
    model.config.eos_token_id = model.generation_config.eos_token_id = [3, 9]  # [SEP] and "good"
    prune_vocabulary(model, wordpiece, ["the film"])  # "good" is kept: the config names its id
    assert (model.config.pad_token_id, model.config.bos_token_id) == (0, 2)
    assert model.config.eos_token_id == model.generation_config.eos_token_id == [3, 7]


def test_empty_corpus_and_unsupported_tokenizers_are_clear_errors(classifier, wordpiece):
    with pytest.raises(ConfigError, match="the vocabulary corpus is empty"):
        prune_vocabulary(classifier, wordpiece, [])
    with pytest.raises(ConfigError, match=r"the vocabulary corpus \(2 texts\) produced no tokens"):
        prune_vocabulary(classifier, wordpiece, ["", "   "])
    bpe = GPT2Tokenizer(vocab={"<|endoftext|>": 0, "a": 1, "b": 2, "ab": 3}, merges=[("a", "b")])
    with pytest.raises(ConfigError, match="supports WordPiece tokenizers .* GPT2Tokenizer uses a BPE model"):
        prune_vocabulary(classifier, bpe, CORPUS)
    with pytest.raises(ConfigError, match="needs a fast .* WordPiece tokenizer; object is not backed"):
        prune_vocabulary(classifier, object(), CORPUS)
    assert classifier.config.vocab_size == len(wordpiece)  # nothing was changed


def test_model_that_does_not_match_the_tokenizer_or_is_compressed_is_refused(classifier, wordpiece):
    small = BertForSequenceClassification(tiny_bert_config(10))
    with pytest.raises(ConfigError, match="the tokenizer has id 16 but the model has only 10 embedding rows"):
        prune_vocabulary(small, wordpiece, CORPUS)
    compress_word_embedding(classifier, int8=True)
    with pytest.raises(ConfigError, match="needs the input embedding as a plain nn.Embedding; got Int8Embedding"):
        prune_vocabulary(classifier, wordpiece, CORPUS)


def test_pruning_run_with_vocabulary_and_int8_embeddings_saves_a_smaller_model(trained_teacher, sentiment_csv,
                                                                                tmp_path):
    teacher_dir = trained_teacher.run_dir / "model"
    extra = tmp_path / "extra.txt"
    extra.write_text("superb\n\nlovely moving\n")
    cfg = prune_cfg(sentiment_csv, teacher_dir, tmp_path / "vocab", heads=UnitPruneConfig(), ffn=UnitPruneConfig(),
                    vocab=VocabConfig(enabled=True, max_examples=4, extra_texts=[str(extra)]),
                    embeddings=EmbeddingConfig(int8=True))
    result = prune(cfg, on_step=never_train)
    vocab = result.metrics["vocab"]
    assert vocab["original_vocab_size"] == 29 and vocab["tokens_kept"] < 29
    assert vocab["test_unknown_fraction"] > vocab["test_unknown_fraction_before"] == 0
    assert 0 < vocab["test_texts_changed"] <= 1
    assert result.metrics["embeddings"] == {"int8_embeddings": ["embeddings.word_embeddings"]}
    assert result.metrics["disk_mb"] < disk_size_mb(teacher_dir)
    assert "test_accuracy_before_recovery" not in result.metrics  # no rounds were run

    saved = result.run_dir / "model"
    config = json.loads((saved / "config.json").read_text())
    assert config["vocab_size"] == vocab["tokens_kept"]
    assert config["compression"] == {"int8_embeddings": ["embeddings.word_embeddings"]}
    tokenizer = AutoTokenizer.from_pretrained(saved)
    assert len(tokenizer) == vocab["tokens_kept"] and tokenizer.tokenize("superb lovely") == ["superb", "lovely"]
    texts = ["the film was good", "a dull and boring plot", "very lovely acting"]
    assert torch.equal(logits_of(load_classifier(str(saved)), tokenizer, texts),
                       logits_of(result.model, tokenizer, texts))


def test_bad_vocabulary_settings_fail_before_any_work(trained_teacher, sentiment_csv, tmp_path):
    teacher_dir = trained_teacher.run_dir / "model"
    none = dict(heads=UnitPruneConfig(), ffn=UnitPruneConfig())
    cases = {
        "nothing to prune: set heads, ffn, layers, low_rank, sparsity, vocab or embeddings": {},
        "vocab.max_examples must be at least 1; got 0": dict(vocab=VocabConfig(enabled=True, max_examples=0)),
        "vocab.extra_texts: file not found: absent.txt": dict(vocab=VocabConfig(enabled=True,
                                                                                extra_texts=["absent.txt"])),
        r"embeddings.rank must be an integer from 1 to 29 .*; got 0": dict(embeddings=EmbeddingConfig(rank=0)),
    }
    for message, overrides in cases.items():
        with pytest.raises(ConfigError, match=message):
            prune(prune_cfg(sentiment_csv, teacher_dir, tmp_path / "bad", **none, **overrides), on_step=never_train)
