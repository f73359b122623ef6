"""scripts/lm_eval_gguf.py: a model and its F16 GGUF file on the offline lm-eval tasks score the same documents
alike (the per-document log-likelihoods of llama.cpp and transformers within float16's rounding); a Hub task offline
is one line, before any model loads."""
import json

import lm_eval_gguf
import pytest

from tests.conftest import save_smollm2_tokenizer_lm

pytest.importorskip("llama_cpp", reason="scripts/setup.sh builds llama.cpp's bindings")
pytest.importorskip("lm_eval", reason="scripts/setup.sh installs lm-eval")
LIMIT = 6


def test_the_f16_file_scores_as_the_transformers_model(tmp_path, capsys):
    model = save_smollm2_tokenizer_lm(tmp_path / "lm")
    lm_eval_gguf.main(["--model", str(model), "--limit", str(LIMIT), "--out", str(tmp_path / "out"), "--threads", "2"])
    report = json.loads(capsys.readouterr().out)
    for task, metrics in report["hf"]["tasks"].items():
        gguf = report["gguf_f16"]["tasks"][task]
        assert metrics["examples"] == gguf["examples"] == LIMIT
        assert gguf["acc"] == pytest.approx(metrics["acc"], abs=1 / LIMIT + 1e-9)
    perplexity = report["hf"]["tasks"]["rotten_tomatoes_lastword"]["perplexity"]
    assert report["gguf_f16"]["tasks"]["rotten_tomatoes_lastword"]["perplexity"] == pytest.approx(perplexity, rel=1e-2)
    assert (tmp_path / "out" / "gguf" / "lm_eval_results.json").is_file()


def test_a_hub_task_offline_is_one_line_and_exit_status_2(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("DISTILL_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit:
        lm_eval_gguf.main(["--tasks", "lambada_openai", "--model", "nowhere"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.startswith("config error: lm-eval tasks lambada_openai need the Hugging Face Hub")
