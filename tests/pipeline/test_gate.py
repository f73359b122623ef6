"""The gate (`distill.core.gate`): rules as mappings or one string, checked against the measured rows; a rule on a
figure no report measures refused before any work; in a pipeline, a deliberately weak model (a random Llama far
from its teacher) stopped before `push` with one line and exit status 3, on a rerun too, while a good one (the
teacher's own weights) passes, and the report and card record the outcome, the card's model-index the measured
figures."""
import json
import shutil

import pytest
import yaml

import quant.measure.lm_report as lm_report
from distill.core.cli import GATE_FAILED_EXIT, run_recipe
from distill.core.config import from_dict
from distill.core.errors import ConfigError
from distill.core.gate import GateFailed, GateRule, gate_outcomes, require_passed
from distill.pipeline.plan import PIPELINE, PipelineConfig, StageEntry, plan_pipeline, run_pipeline
from quant.config import LMReportConfig
from tests.conftest import make_sentences, make_tokenizer, tiny_causal_lm
from tests.helpers.lm_runs import WORDS

SPEED = {"prefill_tokens_per_s": 400.0, "decode_tokens_per_s": 20.0, "peak_rss_mb": 300.0, "load_s": 0.1}
GATE = ["test_perplexity <= 1.5 * teacher", {"figure": "test_loop_share", "max": 1.0}]


def test_rules_are_read_from_strings_and_mappings():
    cfg = from_dict(LMReportConfig, {"gate": [*GATE, "quant/q4: next_token_agreement >= 0.9"]})
    assert cfg.gate == [GateRule("test_perplexity", max=1.5, relative_to="teacher"),
                        GateRule("test_loop_share", max=1.0),
                        GateRule("next_token_agreement", min=0.9, row="quant/q4")]
    assert [str(rule) for rule in cfg.gate] == ["test_perplexity <= 1.5 * teacher", "test_loop_share <= 1",
                                                "quant/q4: next_token_agreement >= 0.9"]
    with pytest.raises(ConfigError, match=r"gate\[0\]: 'test_perplexity < 2' is not a gate rule; write"):
        from_dict(LMReportConfig, {"gate": ["test_perplexity < 2"]})


def test_outcomes_against_the_rows_absolute_relative_and_of_another_row():
    rows = [{"model": "teacher", "ppl": 10.0, "acc": 0.9}, {"model": "student", "ppl": 14.0, "acc": 0.8},
            {"model": "q4", "ppl": 16.0, "acc": None}]
    rules = [GateRule("ppl", max=1.5, relative_to="teacher"), GateRule("ppl", max=1.5, relative_to="teacher",
                                                                       row="q4"),
             GateRule("acc", min=0.85), GateRule("acc", min=0.5, row="q4")]
    outcomes = gate_outcomes(rules, rows, served="student")
    assert [(o["row"], o["value"], o["threshold"], o["passed"]) for o in outcomes] == [
        ("student", 14.0, 15.0, True), ("q4", 16.0, 15.0, False), ("student", 0.8, 0.85, False),
        ("q4", None, 0.5, False)]
    with pytest.raises(GateFailed, match=r"^stage 4 \('report'\): ppl of q4 is 16, threshold 15 \(q4: ppl <= 1.5 \* "
                                        r"teacher\): FAILED; acc of student is 0.8, threshold 0.85 \(acc >= 0.85\): "
                                        r"FAILED; acc of q4 is not measured, threshold 0.5 \(q4: acc >= 0.5\): FAILED$"):
        require_passed(outcomes, "stage 4 ('report')")
    require_passed(outcomes[:1], "stage 4 ('report')")
    with pytest.raises(ConfigError, match="the report has no row 'teachr'; its rows: teacher, student, q4"):
        gate_outcomes([GateRule("ppl", max=2, relative_to="teachr")], rows, served="student")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    tokenizer = make_tokenizer(WORDS)
    for name, overrides in (("teacher", {}), ("weak", {"initializer_range": 1.0})):
        tiny_causal_lm(len(tokenizer), tied=True, **overrides).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    shutil.copytree(root / "teacher", root / "good")
    (root / "corpus.txt").write_text("\n".join(text for text, _ in make_sentences(30)) + "\n")
    return root


def pipeline_yaml(root, served: str, name: str, gate=GATE, push=True) -> str:
    report = {"validation_examples": 4, "test_examples": 6, "eval_examples": 6, "teacher": str(root / "teacher"),
              "speed": {"prompt_tokens": 8, "new_tokens": 2}, "gate": gate,
              "completions": {"prompts": 4, "prompt_tokens": 4, "max_new_tokens": 8}, "lm_eval": None}
    stages = [{"kind": "report_lm", "model": str(root / served), "overrides": report}]
    values = {"output_dir": str(root / f"run-{name}"), "corpus": {"source": str(root / "corpus.txt"), "max_length": 16},
              "stages": stages + ([{"kind": "push", "overrides": {"repo_id": "me/tiny-lm"}}] if push else [])}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


def test_a_weak_model_is_stopped_before_push_with_one_line_and_exit_3(models, monkeypatch, capsys):
    monkeypatch.setattr(lm_report, "speed", lambda *args: SPEED)
    config = pipeline_yaml(models, "weak", "weak")
    for run in ("first", "rerun"):  # the rerun skips the finished report and still stops
        with pytest.raises(SystemExit) as stopped:
            run_recipe(PIPELINE, ["--config", config])
        assert stopped.value.code == GATE_FAILED_EXIT == 3
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("gate failed: stage 1 ('report_lm'): test_perplexity of served is ")
        assert line.endswith(" (test_perplexity <= 1.5 * teacher): FAILED") and "test_loop_share" not in line
    assert not (models / "run-weak" / "02-push").exists()
    served = models / "run-weak" / "01-report_lm" / "model"
    (perplexity, loops) = json.loads((served / "lm_report.json").read_text())["gate"]
    assert not perplexity["passed"] and perplexity["value"] > perplexity["threshold"] > 1 and loops["passed"]
    card = (served / "README.md").read_text()
    assert "## Gate" in card and "- test_perplexity of served is" in card and "FAILED" in card


def test_a_good_model_passes_and_the_card_records_the_gate_and_its_figures(models, monkeypatch):
    monkeypatch.setattr(lm_report, "speed", lambda *args: SPEED)
    (stage,) = run_pipeline(from_dict(PipelineConfig, yaml.safe_load(open(pipeline_yaml(models, "good", "good",
                                                                                        push=False)))))
    report = json.loads((stage.output / "lm_report.json").read_text())
    served = report["rows"][-1]
    assert served["model"] == "served" and all(outcome["passed"] for outcome in report["gate"])
    card = (stage.output / "README.md").read_text()
    assert "(test_perplexity <= 1.5 * teacher): passed" in card and "(test_loop_share <= 1): passed" in card
    (index,) = front_matter(card)["model-index"]
    (result,) = index["results"]
    assert result["dataset"] == {"name": "corpus.txt", "type": "corpus.txt", "split": "test"}
    assert {metric["type"]: metric["value"] for metric in result["metrics"]} == {
        "perplexity": round(served["test_perplexity"], 3), "loop_share": round(served["test_loop_share"], 4),
        "completion_distinct_2": round(served["test_completion_distinct_2"], 4)}


def test_a_gate_on_a_figure_no_report_measures_is_refused_before_any_work(models):
    cfg = from_dict(PipelineConfig, yaml.safe_load(open(pipeline_yaml(models, "good", "refused",
                                                                       gate=["test_perplexty <= 2"]))))
    with pytest.raises(ConfigError, match=r"^stage 1 \('report_lm'\): gate\[0\]: the report measures no figure "
                                          r"'test_perplexty'; it measures test_perplexity, next_token_agreement, "):
        plan_pipeline(cfg)
    assert not (models / "run-refused").exists()
