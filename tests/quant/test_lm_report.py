"""The causal-LM report (`quant.measure.lm_report`): candidates in order (teacher first, the served model last unless a
stage saved it), each measured on the same held-out texts with next-token agreement against the teacher's, the
table and its speed-up column from hand-made rows, the prompt of real text, the files written, and the settings that
cannot work refused."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

import quant.measure.lm_report as lm_report
from distill.core.config import CorpusConfig
from distill.core.errors import ConfigError
from distill.core.gate import GateRule
from distill.lm.acceptance import acceptance
from distill.lm.data import evaluation_texts, text_prompts
from distill.lm.metrics import distinct_bigrams
from distill.lm.sampling import SamplingConfig, complete, stop_tokens
from quant.config import BudgetConfig, CompletionConfig, HarnessConfig, LMReportConfig, SpeedConfig
from quant.measure.lm_report import (
    COMPLETION_FIGURES,
    DRAFT_FIGURES,
    FIGURES,
    LMCandidate,
    agreement,
    check_lm_report,
    divergence,
    fronts,
    lm_candidates,
    lm_eval_table,
    markdown_table,
    measure_candidates,
    recommendation,
    recommended,
    speed_prompt,
    write_lm_report,
)
from tests.conftest import make_sentences, make_tokenizer, tiny_causal_lm
from tests.helpers.lm_runs import WORDS

SPEED = {"prefill_tokens_per_s": 400.0, "decode_tokens_per_s": 20.0, "peak_rss_mb": 300.0, "load_s": 0.1}


def row(model: str, decode: float, parameters=None, path="m", ppl=10.0, disk=12.25, stage="-") -> dict:
    return {"model": model, "stage": stage, "kind": "quantize_lm", "path": path,
            "test_perplexity": ppl * 1.1, "next_token_agreement": 0.875, "kld_mean": 0.0123, "kld_p99": 0.25,
            "test_loop_share": 0.25, "test_completion_distinct_2": 0.5, "test_completion_tokens": 31.5,
            "draft_alpha": 0.75, "draft_tokens_per_pass": 3.25, "parameters": parameters, "disk_mb": disk, **SPEED,
            "decode_tokens_per_s": decode}


def test_the_table_shows_each_model_with_its_speed_up_over_the_first():
    rows = [row("teacher", 20.0, parameters=135_000_000), row("q4", 50.0, path="model-q4.gguf")]
    table = markdown_table(rows, prompt_tokens=64, new_tokens=16)
    lines = table.splitlines()
    assert "prefill tok/s (64)" in lines[0] and "decode tok/s (16)" in lines[0] and len(lines) == 4
    assert lines[2] == ("| teacher | quantize_lm | 11.00 | 87.50% | 0.0123 | 0.250 | 25% | 0.500 | 31.5 | "
                        "0.750 | 3.25 | 135.0M | 12.2 | 300 | 400 | 20.0 | 1.00x | disk |")
    assert lines[3].startswith("| q4 | quantize_lm | 11.00 | 87.50% | 0.0123 | 0.250 | 25% | 0.500 | 31.5 | "
                               "0.750 | 3.25 | - |")
    unmeasured = {key: value for key, value in rows[1].items() if key not in COMPLETION_FIGURES + DRAFT_FIGURES}
    assert "| 0.250 | - | - | - | - |" in markdown_table([rows[0], unmeasured], prompt_tokens=64, new_tokens=16)
    assert lines[3].endswith("| 50.0 | 2.50x | speed |")


def one_hot(tokens: list[int], vocabulary: int = 6) -> np.ndarray:
    return np.eye(vocabulary, dtype=np.float32)[tokens] * 5


def test_agreement_is_the_share_of_positions_with_the_same_token():
    reference = [one_hot([1, 2, 3]), one_hot([4, 5])]
    assert agreement([one_hot([1, 0, 3]), one_hot([4, 0])], reference) == 3 / 5
    assert agreement(reference, reference) == 1.0


def test_divergence_is_torchs_kl_over_the_positions_that_predict_a_token():
    generator = torch.Generator().manual_seed(0)
    reference = [torch.randn(5, 7, generator=generator), torch.randn(3, 7, generator=generator)]
    model = [torch.randn(5, 7, generator=generator), torch.randn(3, 7, generator=generator)]
    expected = torch.cat([torch.nn.functional.kl_div(m[:-1].log_softmax(-1), r[:-1].log_softmax(-1), log_target=True,
                                                     reduction="none").sum(-1) for m, r in zip(model, reference)])
    got = divergence([m.numpy() for m in model], [r.numpy() for r in reference])
    assert got["kld_mean"] == pytest.approx(expected.mean().item(), rel=1e-5)
    assert got["kld_p99"] == pytest.approx(torch.quantile(expected.double(), 0.99).item(), rel=1e-5)
    assert divergence([r.numpy() for r in reference], [r.numpy() for r in reference])["kld_mean"] == 0


def test_the_fronts_and_the_recommendation_within_a_budget():
    rows = [row("teacher", 20.0, ppl=10.0, disk=500.0), row("teacher_gguf/q4", 60.0, ppl=11.0, disk=100.0, stage="t"),
            row("student", 30.0, ppl=20.0, disk=300.0, stage="d"), row("gguf/q4", 120.0, ppl=22.0, disk=60.0,
                                                                         stage="g")]
    assert fronts(rows) == {"disk": ["gguf/q4", "teacher_gguf/q4", "teacher"],
                            "speed": ["gguf/q4", "teacher_gguf/q4", "teacher"]}
    assert recommended(rows, None) is None
    assert recommended(rows, BudgetConfig(disk_mb=150))["model"] == "teacher_gguf/q4"
    assert recommended(rows, BudgetConfig(disk_mb=150, decode_tokens_per_s=100))["model"] == "gguf/q4"
    assert recommended(rows, BudgetConfig(disk_mb=10)) is None
    advice = recommendation(rows, BudgetConfig(disk_mb=150), served="runs/x/model")
    assert "**teacher_gguf/q4**" in advice and "at most 150 MB" in advice and "serve teacher_gguf/q4 instead" in advice
    assert "instead" not in recommendation(rows, BudgetConfig(disk_mb=150, decode_tokens_per_s=100), served="m")
    assert recommendation(rows, BudgetConfig(disk_mb=10), served="m").startswith("No model measured here fits")


def test_the_speed_prompt_is_the_test_texts_repeated_and_cut():
    assert speed_prompt([[1, 2], [3]], 7) == [1, 2, 3, 1, 2, 3, 1]
    assert speed_prompt([[1, 2, 3, 4]], 2) == [1, 2]


def test_candidates_start_with_the_teacher_and_end_with_the_served_model_once(tmp_path):
    teacher = tmp_path / "teacher"
    tiny_causal_lm(len(WORDS) + 5, tied=True).save_pretrained(teacher)
    stages = [SimpleNamespace(name="prune", kind_name="prune_lm", models={"model": tmp_path / "pruned"}),
              SimpleNamespace(name="quant", kind_name="quantize_lm",
                              models={"int8": tmp_path / "int8", "q4": tmp_path / "model-q4.gguf"})]
    cfg = LMReportConfig(teacher=str(teacher), model=str(tmp_path / "served"))
    found = lm_candidates(cfg, stages)
    assert [(c.label, c.stage, c.kind) for c in found] == [
        ("teacher", "-", "-"), ("prune", "prune", "prune_lm"), ("quant/int8", "quant", "quantize_lm"),
        ("quant/q4", "quant", "quantize_lm"), ("served", "-", "-")]
    assert [c.gguf for c in found] == [False, False, False, True, False]
    cfg.model = str(tmp_path / "int8")  # a stage saved it: not listed twice
    assert [c.label for c in lm_candidates(cfg, stages)][-1] == "quant/q4"


def test_each_candidate_is_measured_on_the_same_texts_against_the_teacher(tmp_path, monkeypatch):
    tokenizer = make_tokenizer(WORDS)
    folders = {}
    config = tiny_causal_lm(len(tokenizer), tied=True, initializer_range=1.0).config
    for seed in (0, 1):
        torch.manual_seed(seed)
        folders[seed] = tmp_path / f"lm{seed}"
        LlamaForCausalLM(config).save_pretrained(folders[seed])
        tokenizer.save_pretrained(folders[seed])
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(text for text, _ in make_sentences(20)) + "\n")
    cfg = LMReportConfig(teacher=str(folders[0]), data=CorpusConfig(source=str(corpus), max_length=16),
                         validation_examples=4, test_examples=4, speed=SpeedConfig(prompt_tokens=8, new_tokens=2),
                         completions=CompletionConfig(prompts=3, prompt_tokens=4, max_new_tokens=5, draft_prompts=2,
                                                      draft_k=3), lm_eval=None)
    prompts = []
    monkeypatch.setattr(lm_report, "speed", lambda path, prompt, *args: prompts.append(prompt) or SPEED)
    teacher, other = measure_candidates(cfg, [LMCandidate("teacher", "-", "-", folders[0]),
                                              LMCandidate("other", "s", "k", folders[1])])
    assert teacher["next_token_agreement"] == 1.0 and other["next_token_agreement"] < 1.0
    assert teacher["kld_mean"] == 0 and other["kld_p99"] > other["kld_mean"] > 0
    assert teacher["test_perplexity"] != other["test_perplexity"] and teacher["test_perplexity"] > 1
    weights = (folders[0] / "model.safetensors").stat().st_size / 1e6
    assert teacher["disk_mb"] == weights and teacher["parameters"] == other["parameters"] > 0
    assert "predictions" not in teacher and {**teacher, **SPEED} == teacher and teacher["lm_eval"] is None
    assert set(FIGURES + COMPLETION_FIGURES) <= set(teacher)
    openings = text_prompts(evaluation_texts(cfg, tokenizer)["test"][:3], 4)
    written = complete(LlamaForCausalLM.from_pretrained(folders[1]), openings,
                       SamplingConfig(temperature=0.0, max_new_tokens=5), stop_tokens(tokenizer), tokenizer.pad_token_id)
    assert other["test_completion_tokens"] == sum(map(len, written)) / 3 <= 5
    assert other["test_completion_distinct_2"] == distinct_bigrams(written)
    assert teacher["test_completion_distinct_2"] != other["test_completion_distinct_2"]
    assert len(prompts) == 2 and prompts[0] == prompts[1] and len(prompts[0]) == 8
    # as the teacher's draft, on its greedy continuations of the first two openings: the teacher is the ceiling
    # (3 proposals and its own token, then the fifth token alone), the other model its own acceptance
    assert teacher["draft_alpha"] == pytest.approx(1.0) and teacher["draft_tokens_per_pass"] == 5 / 2
    expected = acceptance(LlamaForCausalLM.from_pretrained(folders[0]).eval(),
                          LlamaForCausalLM.from_pretrained(folders[1]).eval(), openings[:2], 5, [3])
    assert other["draft_alpha"] == pytest.approx(expected["alpha"], rel=1e-9) and expected["alpha"] < 1
    assert other["draft_tokens_per_pass"] == expected["per_k"][3]["greedy_tokens_per_pass"] < 5 / 2


def test_the_report_files_are_written(tmp_path):
    rows = [row("teacher", 20.0, parameters=1000), row("q4", 40.0, path="model-q4.gguf", ppl=12.0)]
    table = write_lm_report(rows, tmp_path, {"texts": 4}, SpeedConfig(prompt_tokens=8, new_tokens=2), "Serve q4.")
    assert (tmp_path / "lm_report.md").read_text() == f"# LM compression report\n\n{table}\n\nServe q4.\n"
    report = json.loads((tmp_path / "lm_report.json").read_text())
    assert report["reference"] == "teacher" and report["texts"] == 4 and report["rows"] == rows
    assert report["pareto_fronts"] == {"disk": ["teacher"], "speed": ["q4", "teacher"]}
    assert (tmp_path / "lm_report.png").read_bytes()[:4] == b"\x89PNG"


def test_the_lm_eval_table_has_a_column_per_task_and_metric_and_a_row_per_measured_model(tmp_path):
    scores = {"sentiment": {"acc": 0.5, "acc_norm": 0.25, "examples": 4}, "lastword": {"acc": 0.125, "examples": 8}}
    rows = [{**row("teacher", 20.0), "lm_eval": scores}, {**row("q4", 40.0), "lm_eval": None}]
    assert lm_eval_table(rows).splitlines() == [
        "| model | sentiment acc (4) | sentiment acc_norm (4) | lastword acc (8) |", "|---|---|---|---|",
        "| teacher | 0.5 | 0.25 | 0.125 |"]
    table = write_lm_report(rows, tmp_path, {}, SpeedConfig(prompt_tokens=8, new_tokens=2))
    assert table.endswith(lm_eval_table(rows)) and lm_eval_table(rows[1:]) == ""


@pytest.mark.parametrize("change, message", [
    ({"test_examples": 0}, "test_examples must be at least 1"),
    ({"lm_eval": HarnessConfig(limit=0)}, "lm_eval.limit and lm_eval.batch_size must be at least 1; got 0 and 8"),
    ({"lm_eval": HarnessConfig(tasks=[])}, "lm_eval.tasks is empty; the offline tasks: rotten_tomatoes_sentiment"),
    ({"speed": SpeedConfig(new_tokens=0)}, "speed.prompt_tokens, speed.new_tokens and speed.repeats"),
    ({"completions": CompletionConfig(prompt_tokens=0)}, "completions.prompt_tokens and"),
    ({"completions": CompletionConfig(draft_k=0)}, "completions.draft_prompts must be at least 0 and "
                                                    "completions.draft_k at least 1; got 16 and 0"),
    ({"gate": [GateRule("draft_alpha", min=0.5)], "completions": CompletionConfig(prompts=0)},
     "no figure 'draft_alpha'"),
    ({"gate": [GateRule("test_perplexityy", max=2)]}, r"gate\[0\]: the report measures no figure 'test_perplexityy'; "
                                                      "it measures test_perplexity, next_token_agreement, "),
    ({"gate": [GateRule("test_loop_share", max=0.2)], "completions": CompletionConfig(prompts=0)},
     "no figure 'test_loop_share'"),
    ({"gate": [GateRule("kld_mean")]}, "one bound, max or min"),
])
def test_settings_that_cannot_work_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        check_lm_report(LMReportConfig(**change))
    check_lm_report(LMReportConfig())


def test_a_gguf_candidate_is_told_by_its_suffix():
    assert LMCandidate("q", "s", "k", Path("x/model-q4_k_m.gguf")).gguf
    assert not LMCandidate("q", "s", "k", Path("x/model")).gguf
