"""The pure logic of scripts/bench_textbrewer.py (TextBrewer itself is never installed here)."""
from pathlib import Path

import pytest
import torch

import bench_textbrewer as bench
from distill.core.errors import ConfigError

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
