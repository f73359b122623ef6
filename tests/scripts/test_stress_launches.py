"""scripts/stress_launches.py without its launches: each is a two-process run of about a minute, too long for a test.
The configs and arguments each kind would launch are checked as written; the main path runs with the launcher
replaced by one that records its calls and fails or hangs where the test says, so the counts of the published table,
the failure logs and the exit status are known by hand; the median column is checked on fabricated timings."""
import subprocess
from pathlib import Path

import yaml

import stress_launches as stress

FILES = {"lm": Path("/m/lm"), "corpus": Path("/m/corpus.txt"), "encoder": Path("/m/encoder"),
         "csv": Path("/m/sentiment.csv")}


def test_each_kind_launches_its_recipe_with_its_placement(tmp_path):
    launched = {kind: stress.launch_args(kind, FILES, tmp_path / kind) for kind in stress.KINDS}
    assert launched["cache_build"] == ("build_teacher_cache.py", [
        "teacher=/m/lm", "data.source=/m/corpus.txt", "data.max_length=12", "k=3", "samples=2", "shard_examples=8",
        "batch_size=4", f"output_dir={tmp_path / 'cache_build'}"])
    configs = {}
    for kind, (script, args) in launched.items():
        if kind != "cache_build":
            assert args == ["--config", str(tmp_path / f"{kind}.yaml")]
            configs[kind] = yaml.safe_load(Path(args[1]).read_text())
            assert configs[kind]["output_dir"] == str(tmp_path / kind)
            assert script == ("distill_lm.py" if kind.startswith("sharded_lm") else "distill_student.py")
    placements = {kind: {key: config["train"].get(key) for key in ("sharding", "teacher_placement", "teacher_dtype")}
                  for kind, config in configs.items()}
    assert placements == {
        "sharded_lm": {"sharding": "fsdp2", "teacher_placement": "shard", "teacher_dtype": None},
        "sharded_lm_bf16_teacher": {"sharding": "fsdp2", "teacher_placement": "replicate", "teacher_dtype": "bfloat16"},
        "sharded_encoder": {"sharding": "fsdp2", "teacher_placement": "shard", "teacher_dtype": None},
        "data_parallel_encoder": {"sharding": None, "teacher_placement": None, "teacher_dtype": None}}
    assert (configs["sharded_lm"]["teacher"], configs["sharded_lm"]["data"]["source"]) == ("/m/lm", "/m/corpus.txt")
    assert (configs["sharded_encoder"]["teacher"], configs["sharded_encoder"]["data"]["source"]) == (
        "/m/encoder", "/m/sentiment.csv")


def test_table_counts_failures_and_hangs_apart_with_the_median_time():
    results = [{"kind": "a", "code": 0, "seconds": 1.0}, {"kind": "b", "code": 0, "seconds": 4.0},
               {"kind": "a", "code": 1, "seconds": 3.0}, {"kind": "b", "code": 0, "seconds": 5.0},
               {"kind": "a", "code": "hang", "seconds": 2.0}]
    assert stress.table(results).splitlines() == ["| launch | launches | failed | hung | median s |",
                                                  "|---|---|---|---|---|",
                                                  "| a | 3 | 1 | 1 | 2.0 |",
                                                  "| b | 2 | 0 | 0 | 4.5 |"]


def test_two_loops_count_a_failure_and_a_hang_and_keep_their_output(tmp_path, monkeypatch, capsys):
    calls = []

    def launch_bounded(script, args, cwd, env, timeout):
        out = Path(args[-1].split("=", 1)[1] if args[0] != "--config" else yaml.safe_load(
            Path(args[1]).read_text())["output_dir"])
        calls.append((script, out.name, cwd, env, timeout))
        if out.name == "w1-cache_build-0":
            return subprocess.CompletedProcess(args, 1, "out;", "err")
        if out.name == "w0-sharded_encoder-1":
            raise subprocess.TimeoutExpired(args, timeout, "partial;", "stuck")
        out.mkdir()
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(stress, "launch_bounded", launch_bounded)
    out = tmp_path / "stress"
    code = stress.main(["--repeats", "2", "--parallel", "2", "--kinds", "sharded_encoder", "cache_build",
                        "--timeout", "7", "--out", str(out)])
    assert code == 1
    assert sorted(name for _, name, *_ in calls) == sorted(f"w{w}-{kind}-{r}" for w in (0, 1) for r in (0, 1)
                                                           for kind in ("sharded_encoder", "cache_build"))
    recipes = stress.REPO / "recipes"
    assert {(script, cwd, env, timeout) for script, name, cwd, env, timeout in calls} == {
        (recipes / "distill_student.py", out, None, 7.0), (recipes / "build_teacher_cache.py", out, None, 7.0)}
    table = capsys.readouterr().out.splitlines()[-4:]
    assert table[2:] == ["| sharded_encoder | 4 | 0 | 1 | 0.0 |", "| cache_build | 4 | 1 | 0 | 0.0 |"]
    assert {log.name: log.read_text() for log in (out / "failures").iterdir()} == {
        "w1-cache_build-0.log": "out;err", "w0-sharded_encoder-1.log": "partial;stuck"}
    assert sorted(path.name for path in out.iterdir() if path.is_dir()) == ["assets", "failures"]
    assert sorted(path.name for path in (out / "assets").iterdir()) == [
        "corpus.txt", "encoder-teacher", "lm-teacher", "sentiment.csv"]
