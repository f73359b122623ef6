"""scripts/bench_sharding.py without its launches: each variant is a two-process run of about a minute, too long for
a test. In their place the test records the command each would launch and writes the metrics.json, final weights
and peak that run would leave, with values chosen so that the published ratios and weight differences are known by
hand. The peak-memory wrapper the launches go through runs for real, around a child of known size."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import bench_sharding as bench

# per variant: bytes each process holds, peak kB of the largest process, final weights
FABRICATED = {
    "ddp": (1000, 2048, {"w": [1.0, 2.0, 3.0], "b": [0.0]}),
    "fsdp2": (600, 1536, {"w": [1.0, 2.25, 3.0], "b": [0.75]}),
    "fsdp2_teacher": (250, 1024, {"w": [0.5, 2.0, 3.0], "b": [0.0]}),
}


def fake_launch(calls, returncode=0):
    def run(command, env, capture_output, text):
        calls.append((command, env))
        out = next(arg.split("=", 1)[1] for arg in command if arg.startswith("output_dir="))
        held, peak_kb, weights = FABRICATED[out.rsplit("/", 1)[1]]
        (Path(out) / "model").mkdir(parents=True)
        (Path(out) / "metrics.json").write_text(json.dumps(
            {"memory_per_process_bytes": {"total": held}, "test_perplexity": 9.5}))
        save_file({key: torch.tensor(value) for key, value in weights.items()},
                  Path(out) / "model" / "model.safetensors")
        return subprocess.CompletedProcess(command, returncode, f"launch log\n{peak_kb}\n", "boom")
    return SimpleNamespace(run=run)


def test_each_variant_against_data_parallel(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(bench, "subprocess", fake_launch(calls))
    bench.main(["--config", "lm.yaml", "--steps", "2", "--out", str(tmp_path), "--port", "29999", "data.limit=40"])

    results = json.loads((tmp_path / "results.json").read_text())
    assert json.loads(capsys.readouterr().out) == results
    assert (results["config"], results["steps"], results["overrides"]) == ("lm.yaml", 2, ["data.limit=40"])
    measured = {name: {key: result[key] for key in ("held_vs_ddp", "peak_rss_mb", "peak_rss_vs_ddp",
                                                     "max_weight_difference_to_ddp")}
                for name, result in results["results"].items()}
    assert measured == {
        "ddp": {"held_vs_ddp": 1.0, "peak_rss_mb": 2.0, "peak_rss_vs_ddp": 1.0, "max_weight_difference_to_ddp": 0.0},
        "fsdp2": {"held_vs_ddp": 0.6, "peak_rss_mb": 1.5, "peak_rss_vs_ddp": 0.75,
                  "max_weight_difference_to_ddp": 0.75},
        "fsdp2_teacher": {"held_vs_ddp": 0.25, "peak_rss_mb": 1.0, "peak_rss_vs_ddp": 0.5,
                          "max_weight_difference_to_ddp": 0.5}}
    assert results["results"]["fsdp2"]["held_bytes"] == {"total": 600}

    command, env = calls[2]
    assert command == [
        sys.executable, "-c", bench.MEASURE, sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(bench.REPO / "recipes" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", "29999",
        str(bench.REPO / "recipes" / "distill_lm.py"), "--config", "lm.yaml",
        f"output_dir={tmp_path / 'fsdp2_teacher'}", "train.max_steps_per_stage=2", "train.select_best=false",
        "validation_examples=8", "test_examples=8", "eval.max_new_tokens=4", "train.group_by_length=false",
        "data.limit=40", "train.sharding=fsdp2", "train.teacher_placement=shard"]
    assert (env["ACCELERATE_USE_CPU"], env["PYTHONPATH"]) == ("1", str(bench.REPO))
    variant_overrides = [command[command.index("data.limit=40") + 1:] for command, _ in calls]
    assert variant_overrides == list(bench.VARIANTS.values()) == [
        [], ["train.sharding=fsdp2"], ["train.sharding=fsdp2", "train.teacher_placement=shard"]]


def test_a_failed_launch_stops_the_benchmark_with_its_output(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "subprocess", fake_launch([], returncode=1))
    with pytest.raises(SystemExit, match=f"^{tmp_path / 'ddp'} failed:\nboom$"):
        bench.main(["--out", str(tmp_path)])


def test_the_peak_wrapper_reports_its_largest_child_and_passes_its_exit_status_on():
    child = "import sys; block = b'x' * (64 * 2**20); sys.exit(3)"
    done = subprocess.run([sys.executable, "-c", bench.MEASURE, sys.executable, "-c", child],
                          capture_output=True, text=True)
    assert done.returncode == 3
    assert 64 * 1024 < int(done.stdout.strip()) < 128 * 1024  # kB: the 64 MiB block and an interpreter
