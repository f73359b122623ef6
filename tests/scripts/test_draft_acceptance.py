"""scripts/draft_acceptance.py on tiny models: its table, its figures equal the module's on the same prompts, and a
draft of another vocabulary is refused in one line."""
import json

import pytest

import draft_acceptance
from distill.core.models import load_causal_lm
from distill.lm.acceptance import acceptance
from tests.conftest import save_smollm2_tokenizer_lm, write_review_corpus

ARGS = ["validation_examples=5", "test_examples=10", "data.max_length=32"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("drafts")
    save_smollm2_tokenizer_lm(root / "target", initializer_range=0.2)
    save_smollm2_tokenizer_lm(root / "draft", initializer_range=0.2, num_hidden_layers=1)
    write_review_corpus(root / "corpus.txt", 40)
    return root


def test_each_draft_gets_a_row_with_the_modules_figures(root, capsys):
    draft_acceptance.main(["--target", str(root / "target"), "--draft", str(root / "draft"), "--draft",
                           str(root / "target"), "--k", "1", "3", "--prompts", "2", "--prompt-tokens", "6",
                           "--new-tokens", "5", "--json", str(root / "out.json"), f"data.source={root / 'corpus.txt'}",
                           *ARGS])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("| draft | parameters | greedy match | alpha | greedy / sampled tokens per pass, k=1 | "
                        "greedy / sampled tokens per pass, k=3 |")
    assert len(lines) == 4 and lines[3].split(" | ")[2:4] == ["100.0%", "1.000"]  # the target as its own draft
    saved = json.loads((root / "out.json").read_text())["drafts"][str(root / "draft")]
    prompts = [ids[:6] for ids in draft_acceptance.prompts_of(
        draft_acceptance.parse_args(draft_acceptance.LMDistillConfig, [f"data.source={root / 'corpus.txt'}", *ARGS]),
        draft_acceptance.load_tokenizer(str(root / "target")), 2, 6)]
    expected = acceptance(load_causal_lm(str(root / "target")).eval(), load_causal_lm(str(root / "draft")).eval(),
                          prompts, 5, [1, 3])
    assert saved["alpha"] == pytest.approx(expected["alpha"])
    assert saved["per_k"]["3"]["greedy_tokens_per_pass"] == pytest.approx(expected["per_k"][3]["greedy_tokens_per_pass"])


def test_a_draft_of_another_vocabulary_is_refused_in_one_line(root, capsys):
    other = "offline:all-MiniLM-L6-v2"  # its tokenizer is read, and refused, before any model loads
    with pytest.raises(SystemExit) as exit_:
        draft_acceptance.main(["--target", str(root / "target"), "--draft", other,
                               f"data.source={root / 'corpus.txt'}", *ARGS])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"config error: draft {other} and target {root / 'target'} tokenize "
                                               "differently (vocabulary sizes")
