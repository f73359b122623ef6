"""Generation speed (`quant.measure.generation_speed`) of a tiny saved Llama: rates are tokens over the measured times,
the median of the repeats, after a load and a warm-up that do not count; the peak resident memory is this process's own
high-water mark; run as its own process it prints one JSON line of the same fields."""
import subprocess
import sys
from types import SimpleNamespace

import pytest

import quant.measure.generation_speed as generation_speed
from quant.measure.generation_speed import measure, speed
from tests.conftest import tiny_causal_lm

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
NEW_TOKENS = 4


@pytest.fixture
def folder(tmp_path):
    tiny_causal_lm(32, tied=True).save_pretrained(tmp_path / "lm")
    return str(tmp_path / "lm")


def fake_clock(durations: list[float]):
    """perf_counter readings such that consecutive (start, end) pairs last `durations`."""
    readings, now = [], 100.0
    for duration in durations:
        readings += [now, now + duration]
        now += duration
    return SimpleNamespace(perf_counter=iter(readings).__next__)


def test_rates_are_medians_over_repeats_of_tokens_over_time(folder, monkeypatch):
    # load, warm-up (prefill, decode), then three repeats of (prefill, decode)
    clock = fake_clock([7.0, 9.0, 9.0, 1.0, 4.0, 3.0, 2.0, 2.0, 8.0])
    monkeypatch.setattr(generation_speed, "time", clock)
    result = measure(folder, PROMPT, NEW_TOKENS, threads=1, repeats=3)
    assert result["load_s"] == 7.0
    assert result["prefill_tokens_per_s"] == len(PROMPT) / 2.0  # of 10/1, 10/3, 10/2
    assert result["decode_tokens_per_s"] == NEW_TOKENS / 4.0  # of 4/4, 4/2, 4/8
    with pytest.raises(StopIteration):
        clock.perf_counter()  # every reading was used: the load and warm-up were timed as said


def test_a_probe_process_reports_every_field(folder):
    result = speed(folder, PROMPT, NEW_TOKENS, threads=1, repeats=1)
    assert set(result) == {"prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_mb", "load_s"}
    assert all(value > 0 for value in result.values())


def test_a_gguf_rows_process_does_not_load_transformers():
    """Its peak resident memory is a figure of the report: importing transformers there would add to it what llama.cpp
    never needs."""
    code = "import sys, quant.measure.generation_speed; print('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
