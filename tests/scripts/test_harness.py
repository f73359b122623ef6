"""The benchmark scripts' shared bookkeeping: rotated run order, step times from step ends, medians, and the check
that configs meant to see the same batches agree, and ratios in tables."""
import pytest

from benchmarks.harness import config_differences, ratio, rotated_order, summarise, timed_steps
from distill.core.config import TrainConfig
from distill.lm.config import LMDistillConfig


def test_each_round_runs_every_variant_once_starting_one_later():
    assert rotated_order(["ce", "online", "cached"], 4) == ["ce", "online", "cached", "online", "cached", "ce",
                                                            "cached", "ce", "online", "ce", "online", "cached"]


def test_steps_are_timed_from_the_end_of_the_last_warmup_step():
    assert timed_steps([1.0, 3.0, 6.0, 10.0], warmup=1) == [2.0, 3.0, 4.0]
    assert timed_steps([1.0, 3.0, 6.0, 10.0], warmup=2) == [3.0, 4.0]
    with pytest.raises(ValueError, match="at least 1"):
        timed_steps([1.0, 2.0], warmup=0)
    with pytest.raises(ValueError, match="none after"):
        timed_steps([1.0, 2.0], warmup=2)


def test_summary_is_the_median_of_each_runs_median_step_and_of_the_peaks():
    runs = [{"step_seconds": [1.0, 2.0, 9.0], "peak_rss_growth_mb": 100.0},
            {"step_seconds": [4.0, 4.0, 4.0], "peak_rss_growth_mb": 300.0},
            {"step_seconds": [3.0, 3.0, 0.5], "peak_rss_growth_mb": 200.0}]
    summary = summarise(runs)
    assert summary["seconds_per_step"] == 3.0 and summary["steps_per_second"] == pytest.approx(1 / 3)
    assert summary["peak_rss_growth_mb"] == 200.0 and summary["runs"] == 3


def test_config_differences_name_each_field_that_differs_and_the_values():
    same = LMDistillConfig(train=TrainConfig(batch_size=8))
    other = LMDistillConfig(train=TrainConfig(batch_size=4), seed=1, output_dir="elsewhere")
    assert config_differences({"a": same, "b": LMDistillConfig(train=TrainConfig(batch_size=8))},
                              ["seed", "train.batch_size", "data"]) == []
    assert config_differences({"a": same, "b": other}, ["seed", "train.batch_size", "data"]) == [
        "seed: a=0, b=1", "train.batch_size: a=8, b=4"]


def test_a_ratio_to_nothing_is_a_dash():
    assert ratio(3.0, 2.0) == "1.50x" and ratio(0.0, 2.0) == "0.00x"
    assert ratio(5.0, 0.0) == "-"  # a tiny run's peak can grow by nothing
