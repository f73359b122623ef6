import subprocess
import sys
from pathlib import Path

import pytest

from distill.core.config import merge_values, parse_args
from distill.core.errors import ConfigError
from distill.encoder.config import DistillConfig, FinetuneConfig


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 3\nstages:\n  - {name: a, epochs: 2, losses: [{name: kl, temperature: 4}]}\n"
                    "student: {layers: [1, 3, 5]}\n")
    cfg = parse_args(DistillConfig, ["--config", str(path), "--train.batch_size=8", "stages.0.epochs", "0.5",
                                     "student.layers=[0,5]"])
    assert cfg.seed == 3 and cfg.train.batch_size == 8
    assert cfg.stages[0].epochs == 0.5 and cfg.stages[0].losses[0].temperature == 4.0
    assert cfg.student.layers == [0, 5]
    assert cfg.data.source == "offline:rotten_tomatoes"  # untouched default


def test_an_override_inside_an_optional_section_left_out_creates_it():
    from quant.config import GgufConfig

    cfg = parse_args(GgufConfig, ["calibration.examples=16"])
    assert cfg.calibration.examples == 16 and cfg.calibration.batch_size == 8
    assert parse_args(GgufConfig, []).calibration is None
    with pytest.raises(ConfigError, match="seed.x: x is inside a int value, not a section"):
        parse_args(DistillConfig, ["seed.x=1"])


def test_a_dotted_key_in_merged_values_sets_one_item_of_a_list_and_leaves_the_rest():
    """As a pipeline stage's overrides use it: one learning rate changed in a recipe's stage list, the losses kept."""
    recipe = {"stages": [{"name": "a", "learning_rate": 3e-4, "losses": [{"name": "kl"}]}], "train": {"steps": 2}}
    merged = merge_values(recipe, {"stages.0.learning_rate": 1e-3, "train": {"steps": 4}})
    assert merged == {"stages": [{"name": "a", "learning_rate": 1e-3, "losses": [{"name": "kl"}]}], "train": {"steps": 4}}
    assert recipe["stages"][0]["learning_rate"] == 3e-4  # the recipe's own values are not changed
    with pytest.raises(ConfigError, match="override 'stages.1.epochs': '1' is not an index into a list of 1"):
        merge_values(recipe, {"stages.1.epochs": 2})


def test_unknown_keys_name_the_closest_valid_one(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.batchsize'; did you mean 'batch_size'"):
        parse_args(DistillConfig, ["train.batchsize=4"])
    path = tmp_path / "bad.yaml"
    path.write_text("stages:\n  - {name: a, losses: [{name: kl, temprature: 2}]}\n")
    with pytest.raises(ConfigError, match=r"stages\[0\].losses\[0\].temprature'; did you mean 'temperature'"):
        parse_args(DistillConfig, ["--config", str(path)])
    with pytest.raises(ConfigError, match="did you mean 'stage'"):
        parse_args(FinetuneConfig, ["stages.0.epochs=1"])


def test_type_errors_and_missing_files():
    with pytest.raises(ConfigError, match="train.batch_size: expected int"):
        parse_args(DistillConfig, ["train.batch_size=big"])
    with pytest.raises(ConfigError, match="config file not found"):
        parse_args(DistillConfig, ["--config", "nope.yaml"])
    with pytest.raises(ConfigError, match="not an index"):
        parse_args(DistillConfig, ["stages.4.epochs=1"])


@pytest.mark.parametrize("recipe", ["distill_student.py", "finetune_teacher.py"])
def test_recipe_scripts_reject_a_misspelt_key_before_loading_anything(recipe):
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(root / "recipes" / recipe), "--config", str(root / "recipes" / (
        "distill_tinybert.yaml" if recipe.startswith("distill") else "teacher.yaml")), "train.learning_rate=1e-4"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "config error: unknown config key 'train.learning_rate'" in done.stderr
