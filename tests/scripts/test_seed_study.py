"""scripts/seed_study.py end to end, with a stand-in recipe script that writes the metrics a run would: one run per
recipe x seed with the seed, output folder and overrides passed on, finished runs reused, and a table of mean ± std
of the test accuracy as a share of the teacher's."""
import json
import sys
import textwrap

import pytest

import seed_study

# the accuracy each seed's run reports; a variant's own override `@bonus=X` adds X
RECIPE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    values = dict(arg.split("=", 1) for arg in sys.argv[3:])
    accuracy = {"0": 0.80, "1": 0.60}[values["seed"]] + float(values.get("bonus", 0))
    out = Path(values["output_dir"])
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps({"test_accuracy": accuracy, "parameters": 2e6, "argv": sys.argv[1:]}))
""")


def test_runs_each_seed_once_and_reports_mean_and_spread(tmp_path, capsys):
    script, teacher, out = tmp_path / "recipe.py", tmp_path / "teacher.json", tmp_path / "study"
    script.write_text(RECIPE)
    teacher.write_text(json.dumps({"test_accuracy": 0.875}))
    argv = ["--script", str(script), "--recipes", "a.yaml", "b.yaml@bonus=0.1", "--seeds", "0", "1",
            "--teacher-metrics", str(teacher), "--out", str(out), "--parallel", "2", "stages.0.epochs=4"]
    seed_study.main(argv)
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "teacher test accuracy: 87.50"
    assert table[1] == ("| recipe | seeds | test acc. (mean ± std) | min..max | kept of teacher | before recovery | "
                        "params | disk MB |")
    # a: 0.8 and 0.6, mean 0.7, sample std sqrt(0.02) = 0.1414, 0.7 / 0.875 = 80% kept
    assert table[3] == "| a | 2 | 70.00 ± 14.14 | 60.00..80.00 | 80.0% | - | 2.0M | - |"
    assert table[4].startswith("| b@bonus=0.1 | 2 | 80.00 ± 14.14 | 70.00..90.00 | 91.4% |")
    run = json.loads((out / "b@bonus=0.1-seed1" / "metrics.json").read_text())
    assert run["argv"] == ["--config", "b.yaml", "seed=1", f"output_dir={out / 'b@bonus=0.1-seed1'}", "bonus=0.1",
                           "stages.0.epochs=4"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipes"][0]["mean"] == pytest.approx(0.7)

    script.write_text("raise SystemExit('a finished run was run again')")
    seed_study.main(argv)  # every run's metrics are there: nothing runs
    assert capsys.readouterr().out.splitlines()[3] == table[3]
