"""scripts/bench_textbrewer.py: its pure logic, and its main path on a tiny teacher, where TextBrewer's side needs
TextBrewer (never installed here) and a stand-in takes its place otherwise."""
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch
import yaml

import bench_textbrewer as bench
from distill.core.errors import ConfigError
from tests.conftest import save_tiny_teacher, write_sentiment_csv

ROOT = Path(__file__).resolve().parents[2]


def run(side, step_seconds, accuracy, weights="w", batches="b"):
    return {"side": side, "steps": len(step_seconds) + 1, "step_seconds": step_seconds, "test_accuracy": accuracy,
            "initial_weights_sha256": weights, "batches_sha256": batches, "peak_rss_mb": 1000.0}


def test_summary_times_steps_after_the_warmup_and_checks_the_runs_did_the_same_work():
    results = [run("ours", [9.0, 0.5, 0.5, 1.0], 0.8), run("textbrewer", [9.0, 1.0, 1.0, 1.0], 0.7)]
    summary = bench.summarize(results, warmup=1, steps=5)
    assert summary["sides"]["ours"]["steps_per_second"] == 2.0
    assert summary["sides"]["ours"]["overall_steps_per_second"] == 1.5
    assert summary["ratio"] == 2.0
    assert summary["same_initial_weights"] and summary["same_batches"] and summary["all_steps_run"]
    table = bench.markdown(summary).splitlines()
    assert table[2] == "| steps/s, median after 1 warm-up steps | 2.00 | 1.00 | 2.00x |"
    assert table[5] == "| test accuracy after 5 steps (%) | 80.00 | 70.00 | - |"

    results.append(run("ours", [9.0, 1.0, 1.0, 1.0], 0.8, weights="other"))
    assert not bench.summarize(results, warmup=1, steps=5)["same_initial_weights"]
    assert "Same initial student weights: NO" in bench.markdown(bench.summarize(results, warmup=1, steps=5))


def test_parameter_fingerprint_ignores_order_but_not_values():
    a, b = torch.ones(2, 3), torch.zeros(4)
    assert bench.parameters_sha256([a, b]) == bench.parameters_sha256([b, a])
    assert bench.parameters_sha256([a, b]) != bench.parameters_sha256([a, b + 1e-7])


def test_a_recipe_textbrewer_cannot_match_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="its losses are .*hidden_mse"):
        bench.bench_config(ROOT / "recipes" / "distill_tinybert.yaml", "teacher", 10, tmp_path)
    cfg = bench.bench_config(ROOT / "recipes" / "distill_response.yaml", "teacher", 10, tmp_path)
    stage, kl, ce = bench.matched_losses(cfg)
    assert (kl.temperature, kl.weight, ce.weight, stage.learning_rate) == (2.0, 1.0, 0.5, 1e-4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny teacher, and distill_response.yaml on the test's CSV with a student of the teacher's layers 1 and 3."""
    root = tmp_path_factory.mktemp("bench-textbrewer")
    recipe = yaml.safe_load((ROOT / "recipes" / "distill_response.yaml").read_text())
    recipe["data"] = {"source": str(write_sentiment_csv(root / "sentiment.csv")), "text_column": "review",
                      "label_column": "sentiment", "max_length": 16}
    recipe["student"]["layers"] = [1, 3]
    recipe["train"].update(batch_size=16, eval_batch_size=32)
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return save_tiny_teacher(root / "teacher"), root / "recipe.yaml"


def bench_main(tiny, out):
    teacher, recipe = tiny
    bench.main(["--teacher", str(teacher), "--recipe", str(recipe), "--steps", "4", "--warmup", "1", "--threads", "1",
                "--out", str(out / "runs"), "--json", str(out / "bench.json")])
    return json.loads((out / "bench.json").read_text())


def test_main_path_with_our_side_run_and_textbrewer_standing_in_at_half_its_speed(tiny, tmp_path, monkeypatch,
                                                                                 capsys):
    """TextBrewer cannot be installed here, so its side is our side's own result with every step twice as long: our
    side runs for real in its worker process, and the table's ratios are known by hand."""
    run_side = bench.run_side

    def ours_or_stand_in(side, python, run_dir, args):
        if side == "ours":
            return run_side(side, python, run_dir, args)
        ours = json.loads((run_dir.with_name("ours-0") / bench.RESULT_FILE).read_text())
        return {**ours, "side": side, "step_seconds": [2 * s for s in ours["step_seconds"]]}

    monkeypatch.setattr(bench, "textbrewer_python", lambda: Path(sys.executable))
    monkeypatch.setattr(bench, "run_side", ours_or_stand_in)
    summary = bench_main(tiny, tmp_path)
    ours = summary["runs"][0]
    assert (ours["side"], ours["steps"], len(ours["step_seconds"]), ours["threads"]) == ("ours", 4, 3, 1)
    assert ours["peak_rss_mb"] > 0
    steps_per_second = 1 / statistics.median(ours["step_seconds"][1:])
    assert summary["sides"]["ours"]["steps_per_second"] == pytest.approx(steps_per_second)
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| | ours (distill) | TextBrewer 0.2.1 | ours / TextBrewer |"
    assert table[2] == (f"| steps/s, median after 1 warm-up steps | {steps_per_second:.2f} | "
                        f"{steps_per_second / 2:.2f} | 2.00x |")
    assert table[4].endswith(" | 1.00x |")  # peak RSS: the stand-in's is ours
    accuracy = 100 * ours["test_accuracy"]
    assert table[5] == f"| test accuracy after 4 steps (%) | {accuracy:.2f} | {accuracy:.2f} | - |"
    assert table[-1].startswith("1 repeat(s), medians over repeats. Our side's overrides: none. Same initial "
                                "student weights: yes; same batches in the same order: yes; every run made 4")


def test_main_path_against_textbrewer(tiny, tmp_path, monkeypatch, capsys):
    pytest.importorskip("textbrewer", reason="TextBrewer is not installed here (the script installs it online)")
    monkeypatch.setattr(bench, "textbrewer_python", lambda: Path(sys.executable))
    summary = bench_main(tiny, tmp_path)
    assert [run["side"] for run in summary["runs"]] == ["ours", "textbrewer"]
    assert summary["same_initial_weights"] and summary["same_batches"] and summary["all_steps_run"]
    assert capsys.readouterr().out.splitlines()[0] == "| | ours (distill) | TextBrewer 0.2.1 | ours / TextBrewer |"
