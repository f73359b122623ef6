"""`distill.core.tracking` on its own: a log record becomes a metrics.jsonl line (main process only) and tracker
scalars grouped by stage, nested records flattened and non-numbers left out; `quiet_loggers` lets only errors through
inside its block and restores the levels after it, also when the block fails."""
import json
import logging
from types import SimpleNamespace

import pytest

from distill.core.tracking import log_record, quiet_loggers, tracked_scalars

RECORD = {"stage": 1, "step": 6, "epoch": 0.5, "train_loss": 0.25, "lr": 1e-4, "done": True, "name": "kd",
          "final": {"test_accuracy": 0.75, "split": "test", "per_class": {"neg": 0.5}}}


def test_scalars_are_grouped_by_stage_and_nested_records_flattened():
    assert tracked_scalars(RECORD) == {"stage1/epoch": 0.5, "stage1/train_loss": 0.25, "stage1/lr": 1e-4,
                                       "final/test_accuracy": 0.75, "final/per_class/neg": 0.5}
    assert tracked_scalars({"step": 3, "test_accuracy": 0.5}) == {"test_accuracy": 0.5}


class FakeAccelerator(SimpleNamespace):
    def log(self, values, step):
        self.logged.append((values, step))


@pytest.mark.parametrize("main", [True, False])
def test_a_record_goes_to_metrics_jsonl_on_the_main_process_and_to_trackers_on_every(tmp_path, main):
    accelerator = FakeAccelerator(is_main_process=main, logged=[])
    log_record(accelerator, tmp_path, RECORD)
    log_record(accelerator, tmp_path, {"step": 7, "train_loss": 0.125})
    written = tmp_path / "metrics.jsonl"
    lines = written.read_text().splitlines() if written.exists() else []
    assert [json.loads(line) for line in lines] == ([RECORD, {"step": 7, "train_loss": 0.125}] if main else [])
    assert accelerator.logged == [(tracked_scalars(RECORD), 6), ({"train_loss": 0.125}, 7)]


def test_quiet_loggers_pass_only_errors_and_restore_the_levels(caplog):
    parent, child = logging.getLogger("quiet.test"), logging.getLogger("quiet.test.child")
    parent.setLevel(logging.INFO)
    with pytest.raises(RuntimeError), quiet_loggers("quiet.test"):
        child.warning("hidden")
        child.error("shown")
        raise RuntimeError
    child.info("after")
    assert [record.getMessage() for record in caplog.records] == ["shown", "after"]
    assert parent.level == logging.INFO
