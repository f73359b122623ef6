"""scripts/lm_perplexity.py ends a bad config as every recipe does: one line `config error: ...` on stderr and exit
status 2, for a misspelt key and for a check that fails after parsing; `--debug` shows the traceback instead."""
from pathlib import Path

import lm_perplexity
import pytest

from distill.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argv, line", [
    (["output_dirr=x"], "config error: unknown config key 'output_dirr'; did you mean 'output_dir'?"),
    (["--config", "recipes/distill_lm.yaml", "train.mixed_precision=fp8"],
     "config error: train.mixed_precision must be one of no, bf16, fp16; got 'fp8'"),
], ids=["misspelt-key", "failed-check"])
def test_a_bad_config_is_one_line_and_exit_status_2(argv, line, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("DISTILL_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit:
        lm_perplexity.main(argv)
    assert exit.value.code == 2
    assert capsys.readouterr().err == line + "\n"


def test_debug_shows_the_error_itself(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match="unknown config key 'output_dirr'"):
        lm_perplexity.main(["output_dirr=x", "--debug"])
