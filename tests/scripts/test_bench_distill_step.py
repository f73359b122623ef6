"""scripts/bench_distill_step.py on a tiny 6-layer BERT teacher (the recipes' students copy its layers 1, 3 and 5):
every variant is timed over the steps after the warm-up, and each ratio is the one of the medians it names."""
import json

import pytest

import bench_distill_step
from tests.conftest import save_tiny_teacher


def test_each_variant_is_timed_and_the_ratios_follow_from_the_medians(tmp_path, capsys):
    teacher = save_tiny_teacher(tmp_path / "teacher", num_hidden_layers=6)
    bench_distill_step.main(["--teacher", str(teacher), "--rounds", "1", "--steps", "4", "--batch-size", "4",
                             "--max-length", "16"])
    out = capsys.readouterr().out
    round_line, report = out.split("\n", 1)
    medians = json.loads(round_line)
    report = json.loads(report)
    assert set(report["seconds"]) == {"floor", "response", "response_live", "tinybert", "teacher"}
    assert all(seconds > 0 for seconds in report["seconds"].values())
    assert medians == {"round": 0, **{k: round(v, 4) for k, v in report["seconds"].items()}}  # one round: its own
    seconds, ratios = report["seconds"], report["ratios"]
    assert ratios["response/floor"] == pytest.approx(seconds["response"] / seconds["floor"])
    assert ratios["tinybert/(floor+teacher)"] == pytest.approx(seconds["tinybert"] / (seconds["floor"] +
                                                                                    seconds["teacher"]))
    assert report["settings"] == {"rounds": 1, "steps": 4, "batch_size": 4, "max_length": 16,
                                  "teacher_dtype": "float32"}
