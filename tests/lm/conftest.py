import json

import pytest

from distill.core.config import CorpusConfig
from tests.conftest import make_sentences
from tests.helpers.lm_runs import WORDS, save_lm


@pytest.fixture
def teacher_dir(tmp_path):
    """A tiny random Llama teacher with the word-level tokenizer."""
    return save_lm(tmp_path / "teacher", WORDS)


@pytest.fixture
def corpus(tmp_path):
    """60 short texts of the tiny vocabulary, one per line, cut at 16 tokens."""
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(text for text, _ in make_sentences(60)) + "\n")
    return CorpusConfig(source=str(path), max_length=16)


@pytest.fixture
def pairs_file(tmp_path):
    """60 prompt/completion rows of the tiny vocabulary."""
    rows = [{"prompt": first, "completion": second}
            for (first, _), (second, _) in zip(make_sentences(60, seed=1), make_sentences(60, seed=2))]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
