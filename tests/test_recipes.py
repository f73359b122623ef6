"""Every recipe YAML in recipes/ is checked by its own job's one check (the same function the recipe script and the
pipeline planner call), not only parsed."""
from pathlib import Path

import pytest

import distill.lm.cache  # noqa: F401  (each import registers its jobs)
import distill.lm.generate  # noqa: F401
import distill.lm.job  # noqa: F401
import distill.methods.finetune  # noqa: F401
import distill.methods.general  # noqa: F401
import distill.methods.job  # noqa: F401
import distill.pipeline.kinds  # noqa: F401
import prune.pipeline_kinds  # noqa: F401
import quant.pipeline_kinds  # noqa: F401
from distill.core.config import parse_args
from distill.core.jobs import JOBS

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
JOB_OF_PREFIX = {"compress": "pipeline", "teacher": "finetune", "distill_": "distill", "prune_": "prune",
                 "quantize_": "quantize", "qlora_": "qlora", "cache_": "build_teacher_cache",
                 "distill_lm": "distill_lm", "prune_lm": "prune_lm", "quantize_lm": "quantize_lm",
                 "export_gguf": "export_gguf", "export_onnx": "export_onnx", "general_distill": "general_distill",
                 "generate_teacher_data": "generate_teacher_data"}
SCRIPT_OF_JOB = {"pipeline": "compress.py", "finetune": "finetune_teacher.py", "distill": "distill_student.py",
                 "prune": "prune_model.py", "quantize": "quantize_model.py", "qlora": "qlora_distill.py",
                 "build_teacher_cache": "build_teacher_cache.py", "distill_lm": "distill_lm.py",
                 "prune_lm": "prune_lm.py", "quantize_lm": "quantize_lm.py", "export_gguf": "export_gguf.py",
                 "export_onnx": "export_onnx.py", "general_distill": "general_distill.py",
                 "generate_teacher_data": "generate_teacher_data.py"}


def job_of(recipe: Path) -> str:
    matches = [prefix for prefix in JOB_OF_PREFIX if recipe.stem.startswith(prefix)]
    assert matches, f"{recipe.name}: no job for this recipe name"
    return JOB_OF_PREFIX[max(matches, key=len)]


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_recipe_passes_its_jobs_check(recipe):
    job = JOBS[job_of(recipe)]
    job.check(parse_args(job.config_class, ["--config", str(recipe)]))


def test_every_job_has_a_recipe_script():
    """`push` runs only as the pipeline's last stage (`recipes/compress.py --push-to-hub`)."""
    assert set(SCRIPT_OF_JOB) | {"push"} == set(JOBS)
    assert all((RECIPES / script).is_file() for script in SCRIPT_OF_JOB.values())
