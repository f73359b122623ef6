"""The command line every recipe shares: a bad config ends in one line `config error: ...` and exit status 2, before
any model loads; `--debug` (or DISTILL_DEBUG=1) shows the traceback instead; a config error found after loading
(attention heads that cannot be matched) reads the same."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill.core.jobs import JOB_TABLE

ROOT = Path(__file__).resolve().parents[2]


def run_script(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "recipes" / script), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


@pytest.mark.parametrize("script", sorted({entry.recipe for entry in JOB_TABLE.values() if entry.recipe}))
def test_every_recipe_prints_one_line_and_exits_2_on_a_misspelt_key(script):
    done = run_script(script, "output_dirr=x")
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == "config error: unknown config key 'output_dirr'; did you mean 'output_dir'?"
    assert "Traceback" not in done.stderr


def test_debug_flag_and_environment_show_the_traceback():
    for args, env in [(["--debug"], None), ([], {"DISTILL_DEBUG": "1"})]:
        done = run_script("finetune_teacher.py", "output_dirr=x", *args, env=env)
        assert done.returncode != 0
        assert "Traceback" in done.stderr and "ConfigError: unknown config key 'output_dirr'" in done.stderr


def test_a_check_failure_is_one_line_too():
    done = run_script("distill_student.py", "--config", "recipes/distill_tinybert.yaml", "train.mixed_precision=fp8")
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].startswith("config error: train.mixed_precision must be one of no, bf16, fp16")


def test_an_error_found_after_loading_is_one_line(tiny_teacher_dir, sentiment_csv, tmp_path):
    """The student's 2 heads cannot match the teacher's 4 exactly: known only once both models exist."""
    done = run_script("distill_student.py", f"teacher={tiny_teacher_dir}", f"output_dir={tmp_path / 'run'}",
                      f"data.source={sentiment_csv}", "data.text_column=review", "data.label_column=sentiment",
                      "student.init=fresh", "student.num_attention_heads=2", "student.num_layers=2",
                      "stages=[{losses: [{name: attention_mse}]}]")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines()[-1] == ("config error: loss 'attention_mse': student has 2 attention heads and "
                                            "teacher 4; set head_match to 'group' or 'average'")
