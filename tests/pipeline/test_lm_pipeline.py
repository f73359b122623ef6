"""The causal-LM pipeline on a tiny Llama with SmolLM2's tokenizer, trained on the corpus (confident predictions, so a
stage that broke the model would show): prune (width) -> distil from the unpruned model -> quantize -> GGUF export ->
the teacher's own GPTQ folder -> report, with the stage machinery of every pipeline (planned and checked before any
work, finished stages skipped on a rerun). The report measures every model side by side (GGUF files in llama.cpp):
each copy of the distilled model (bf16, GGUF F16 and Q8_0) scores as it does, the teacher's GPTQ folder as its stage
measured it, and the distilled model's agreement with the teacher is the one computed here; the served folder carries
the model, its GGUF files, the report and a causal-LM card."""
import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.core.config import CorpusConfig
from distill.core.errors import ConfigError
from distill.lm.acceptance import acceptance
from distill.lm.data import evaluation_texts, text_prompts
from distill.pipeline.plan import PipelineConfig, StageEntry, plan_pipeline, run_pipeline
from tests.helpers.lm_models import cycle_lines, save_trained_smollm2_lm
from tests.helpers.lm_runs import WORDS

pytest.importorskip("llama_cpp", reason="scripts/setup.sh builds llama.cpp's bindings")

SPLIT = {"validation_examples": 6, "test_examples": 6, "eval_examples": 6}
LM_EVAL_LIMIT = 8
TRAIN = {"batch_size": 4, "eval_batch_size": 4, "max_steps_per_stage": 2, "save_steps": 2, "log_steps": 1}


@pytest.fixture(scope="module")
def lm_pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-pipeline")
    lines = cycle_lines(WORDS, 90, seed=3, lengths=(12, 20))
    (corpus := root / "corpus.txt").write_text("\n".join(lines) + "\n")
    save_trained_smollm2_lm(root / "teacher", lines[:60])
    teacher = str(root / "teacher")
    cfg = PipelineConfig(output_dir=str(root / "run"), corpus=CorpusConfig(source=str(corpus), max_length=24), stages=[
        StageEntry(kind="prune_lm", name="prune", model=teacher, overrides={
            "validation_examples": 6, "test_examples": 6, "width": {"intermediate_size": 64},
            "calibration": {"examples": 70}}),
        StageEntry(kind="distill_lm", name="distill", overrides={
            "teacher": teacher, "student": {"init": "pretrained"}, "validation_examples": 6, "test_examples": 6,
            "stages": [{"epochs": 1, "learning_rate": 1e-3, "losses": [
                {"name": "forward_kl", "weight": 0.5}, {"name": "next_token_ce", "weight": 0.5}]}],
            "eval": {"prompts": ["the film"], "max_new_tokens": 4}, "train": TRAIN}),
        StageEntry(kind="quantize_lm", name="quantize", model="@distill", overrides={
            **SPLIT, "teacher": teacher, "variants": ["bf16"]}),
        StageEntry(kind="export_gguf", name="gguf", model="@distill", overrides={
            **SPLIT, "types": ["f16", "q8_0"], "prompts": ["the film"], "max_new_tokens": 4}),
        StageEntry(kind="quantize_lm", name="teacher_gptq", model=teacher, overrides={
            **SPLIT, "teacher": teacher, "variants": ["gptq_w4a16"], "scheme": {"group_size": 32}}),
        StageEntry(kind="report_lm", name="report", model="@distill", overrides={
            **SPLIT, "teacher": teacher, "speed": {"prompt_tokens": 16, "new_tokens": 4}, "repo_id": "me/tiny-lm",
            "lm_eval": {"limit": LM_EVAL_LIMIT}}),
    ])
    return cfg, run_pipeline(cfg)


def report_rows(stages) -> dict[str, dict]:
    return {row["model"]: row for row in json.loads((stages[-1].output / "lm_report.json").read_text())["rows"]}


@torch.no_grad()
def greedy_next_tokens(folder, texts) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return torch.cat([model(torch.tensor([ids])).logits[0].argmax(-1) for ids in texts])


def test_every_stage_runs_and_the_report_measures_every_model(lm_pipeline):
    _, stages = lm_pipeline
    served, rows = stages[-1].output, report_rows(stages)
    assert list(rows) == ["teacher", "prune", "distill", "quantize", "gguf/f16", "gguf/q8_0", "teacher_gptq"]
    assert rows["teacher"]["test_perplexity"] < 3  # trained (uniform: 49,152), so the comparisons below can fail
    assert rows["prune"]["parameters"] < rows["teacher"]["parameters"]
    for row in rows.values():
        assert row["decode_tokens_per_s"] > 0 and row["prefill_tokens_per_s"] > 0 and row["peak_rss_mb"] > 0
    assert {"model-f16.gguf", "model-q8_0.gguf", "lm_report.md", "lm_report.png", "README.md"} <= {
        path.name for path in served.iterdir()}
    card = (served / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "AutoModelForCausalLM" in card and "llama-cli -m" in card
    reloaded = AutoModelForCausalLM.from_pretrained(served)
    assert reloaded.config.intermediate_size == 64


@pytest.mark.parametrize("name, rel, positions", [("quantize", 0.02, 3), ("gguf/f16", 2e-3, 1), ("gguf/q8_0", 0.02, 3)])
def test_each_copy_of_the_distilled_model_scores_as_it_does(lm_pipeline, name, rel, positions):
    """Perplexity within `rel`, agreement with the teacher within about `positions` of the ~90 test positions."""
    rows = report_rows(lm_pipeline[1])
    assert rows[name]["test_perplexity"] == pytest.approx(rows["distill"]["test_perplexity"], rel=rel)
    assert rows[name]["next_token_agreement"] == pytest.approx(rows["distill"]["next_token_agreement"],
                                                               abs=positions / 90)
    assert rows[name]["draft_alpha"] == pytest.approx(rows["distill"]["draft_alpha"], rel=rel)


@pytest.mark.parametrize("name", ["quantize", "gguf/f16", "gguf/q8_0"])
def test_each_copy_of_the_distilled_model_scores_as_it_does_on_lm_eval(lm_pipeline, name):
    """Accuracy within one document; lm-eval's own results beside ours."""
    stages = lm_pipeline[1]
    rows = report_rows(stages)
    for task, metrics in rows["distill"]["lm_eval"].items():
        assert metrics["examples"] == LM_EVAL_LIMIT
        assert rows[name]["lm_eval"][task]["acc"] == pytest.approx(metrics["acc"], abs=1 / LM_EVAL_LIMIT + 1e-9)
    results = json.loads((stages[-1].folder / "lm_eval" / name / "lm_eval_results.json").read_text())
    assert results["results"].keys() == rows[name]["lm_eval"].keys()


def test_the_teachers_own_gptq_folder_is_measured_as_its_stage_measured_it(lm_pipeline):
    """The report's row of the compressed-tensors folder (decompressed by a plain load) against the quantize stage's
    own figures, computed in memory before saving, against the teacher it quantized."""
    stages = lm_pipeline[1]
    measured = json.loads((stages[-2].folder / "stage.json").read_text())["metrics"]["variants"]["gptq_w4a16"]
    row = report_rows(stages)["teacher_gptq"]
    assert row["test_perplexity"] == pytest.approx(measured["test_perplexity"], rel=1e-4)
    assert row["kld_mean"] == pytest.approx(measured["kld_mean"], rel=1e-3) and row["kld_mean"] > 1e-4


def test_the_reported_agreement_with_the_teacher_is_the_models_own(lm_pipeline):
    cfg, stages = lm_pipeline
    teacher, distilled = cfg.stages[0].model, stages[1].output
    texts = evaluation_texts(SimpleNamespace(data=cfg.corpus, **SPLIT), AutoTokenizer.from_pretrained(teacher))["test"]
    same = (greedy_next_tokens(teacher, texts) == greedy_next_tokens(distilled, texts)).float().mean().item()
    # below 1: a report that compared the model with itself would fail here
    assert report_rows(stages)["distill"]["next_token_agreement"] == pytest.approx(same) and 0.5 < same < 1


def test_each_model_is_scored_as_the_teachers_draft_on_the_teachers_own_continuations(lm_pipeline):
    cfg, stages = lm_pipeline
    teacher, distilled = cfg.stages[0].model, stages[1].output
    texts = evaluation_texts(SimpleNamespace(data=cfg.corpus, **SPLIT), AutoTokenizer.from_pretrained(teacher))["test"]
    expected = acceptance(AutoModelForCausalLM.from_pretrained(teacher).eval(),
                          AutoModelForCausalLM.from_pretrained(distilled).eval(), text_prompts(texts, 16), 32, [4])
    rows = report_rows(stages)
    # the teacher is the ceiling: 32 tokens in seven passes of four proposals and one token of its own (the last alone)
    assert rows["teacher"]["draft_alpha"] == pytest.approx(1.0) and rows["teacher"]["draft_tokens_per_pass"] == 32 / 7
    assert rows["distill"]["draft_alpha"] == pytest.approx(expected["alpha"], rel=1e-6) and expected["alpha"] < 1
    assert rows["distill"]["draft_tokens_per_pass"] == expected["per_k"][4]["greedy_tokens_per_pass"]


def test_a_rerun_skips_every_finished_stage(lm_pipeline):
    cfg, stages = lm_pipeline
    markers = [stage.folder / "stage.json" for stage in stages]
    before = [marker.stat().st_mtime_ns for marker in markers]
    run_pipeline(cfg)
    assert [marker.stat().st_mtime_ns for marker in markers] == before


def test_an_lm_pipeline_that_cannot_work_fails_before_any_work(lm_pipeline, tmp_path):
    cfg, _ = lm_pipeline
    bad = PipelineConfig(output_dir=str(tmp_path / "bad"), corpus=cfg.corpus, stages=[
        cfg.stages[0], StageEntry(kind="export_gguf", model="@prune", overrides={"types": ["q4_k_x"]})])
    with pytest.raises(ConfigError, match=r"stage 2 \('export_gguf'\): types: llama.cpp knows no GGUF type"):
        plan_pipeline(bad)
    unmeasured = PipelineConfig(output_dir=str(tmp_path / "bad"), corpus=cfg.corpus, stages=[
        cfg.stages[0], StageEntry(kind="draft", overrides={**cfg.stages[1].overrides, "eval": {"draft_prompts": 0}})])
    with pytest.raises(ConfigError, match=r"stage 2 \('draft'\): draft: .* eval.draft_prompts must be at least 1"):
        plan_pipeline(unmeasured)
    assert not (tmp_path / "bad").exists()
