import json

import pytest

from tests.conftest import make_sentences


@pytest.fixture
def pairs_file(tmp_path):
    """60 prompt/completion rows of the tiny vocabulary."""
    rows = [{"prompt": first, "completion": second}
            for (first, _), (second, _) in zip(make_sentences(60, seed=1), make_sentences(60, seed=2))]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
