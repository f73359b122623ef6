"""scripts/bench_speculative.py on a tiny target and a draft of two of its three layers, in transformers and llama.cpp:
a row per variant with figures that hang together, the best k per draft; a draft that changes the teacher's tokens
fails the run; bad input is refused in one line before any model loads; a draft as large as its teacher is warned
about."""
import json
import logging

import bench_speculative as bench
import pytest

from tests.conftest import write_review_corpus
from tests.helpers.drafts import save_draft_pair

pytest.importorskip("llama_cpp", reason="scripts/setup.sh builds llama.cpp's bindings")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("speculative")
    save_draft_pair(root)
    write_review_corpus(root / "corpus.txt", 20)
    return root


def args(root, *extra: str) -> list[str]:
    return ["--teacher", str(root / "target"), "--draft", f"two={root / 'draft'}", "--gguf-teacher",
            str(root / "target.gguf"), "--gguf-draft", f"two={root / 'draft.gguf'}", "--corpus",
            str(root / "corpus.txt"), "--tokenizer", str(root / "target"), "--prompts", "2", "--prompt-tokens", "6",
            "--new-tokens", "8", "--threads", "1", "--rounds", "2", "--k", "1", "3", *extra]


def test_each_runtime_measures_the_teacher_alone_and_each_draft_at_each_k(root, capsys):
    bench.main(args(root, "--json", str(root / "out.json")))
    saved = json.loads((root / "out.json").read_text())
    for runtime in ("transformers", "llama.cpp"):
        rows = saved["results"][runtime]
        assert list(rows) == ["teacher alone", "two, k=1", "two, k=3"]
        alone = rows["teacher alone"]
        assert alone["speed_up"] == 1.0 and alone["acceptance"] is None and alone["tokens_per_pass"] == 1.0
        for name in ("two, k=1", "two, k=3"):
            row = rows[name]
            assert len(row["rounds"]) == 2 and row["speed_up"] == pytest.approx(row["tokens_per_s"] /
                                                                                 alone["tokens_per_s"])
            assert 0 <= row["acceptance"] <= 1 and 1 <= row["tokens_per_pass"] <= 4 and row["lossless"]
        passes = saved["pass_ms"][runtime]
        assert list(passes) == ["teacher", "two"] and all(list(costs) == ["1", "2", "3", "4"] and
                                                          min(costs.values()) > 0 for costs in passes.values())
        best = saved["best"][runtime]["two"]
        assert rows[best]["tokens_per_s"] == max(rows[name]["tokens_per_s"] for name in ("two, k=1", "two, k=3"))
    out = capsys.readouterr().out
    assert "| llama.cpp | two, k=3 |" in out and "best in transformers, two: two, k=" in out
    assert "| runtime | model | 1 token | 2 tokens | 3 tokens | 4 tokens |" in out and "| llama.cpp | teacher | " in out


def test_a_draft_that_changes_the_teachers_tokens_fails_the_run_after_the_results_are_written():
    def row(*runs):
        return {"tokens": [list(runs)], "tokens_per_s": [1.0], "accepted": 0, "proposed": 1, "target_passes": 2}

    results = {"llama.cpp": bench.summary({bench.ALONE: row([5, 6, 7], [1, 2]), "bad, k=1": row([5, 6, 8], [1, 2]),
                                           "good, k=1": row([5, 6, 7], [1, 2])})}
    assert [results["llama.cpp"][name]["lossless"] for name in (bench.ALONE, "bad, k=1", "good, k=1")] == [
        True, False, True]
    assert results["llama.cpp"]["bad, k=1"]["first_difference"] == 2
    assert "| llama.cpp | bad, k=1 | 1.0 | 1.00x | 0.0% | 2.50 | no (from token 2) |" in bench.table(results)
    with pytest.raises(RuntimeError, match=r"speculative decoding was not lossless: llama.cpp 'bad, k=1' \(first at "
                                           r"token 2\)$"):
        bench.check_lossless(results)


@pytest.mark.parametrize("extra, message", [
    (["--k", "0"], "k (draft tokens per target pass) must be at least 1; got [0]"),
    (["--draft", "mini=offline:all-MiniLM-L6-v2"], "draft offline:all-MiniLM-L6-v2 and target {root}/target tokenize "
                                                   "differently (vocabulary sizes"),
    (["--gguf-draft", "bad"], "--gguf-draft takes name=model"),
])
def test_bad_input_is_refused_in_one_line(root, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_:
        bench.main(args(root, *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1
    assert err[0].startswith("config error: " + message.format(root=root))


def test_a_draft_as_large_as_its_teacher_is_warned_about(root, caplog):
    with caplog.at_level(logging.WARNING):
        bench.runtimes(bench.parse(["--teacher", str(root / "target"), "--draft", f"itself={root / 'target'}"]))
    assert f"draft {root / 'target'} has 3.3M parameters, its target {root / 'target'} 3.3M" in caplog.text
