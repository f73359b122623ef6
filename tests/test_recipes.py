"""Every recipe YAML in recipes/ is checked by its own job's one check (the same function the recipe script and the
pipeline planner call), not only parsed; and the job table names each job's module, script and stage kind truly."""
import sys
from pathlib import Path

import pytest

from distill.core.config import parse_args
from distill.core.jobs import JOB_TABLE, load_jobs
from distill.pipeline.plan import STAGE_KINDS

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
OTHER_PREFIXES = {"compress": "pipeline", "qad": "pipeline", "teacher": "finetune", "cache_": "build_teacher_cache"}
"""A recipe YAML's name starts with its job's name (`distill_lm_chat.yaml`: distill_lm), or else with one of these."""


def job_of(recipe: Path) -> str:
    prefixes = {**{name: name for name in JOB_TABLE}, **OTHER_PREFIXES}
    matches = [prefix for prefix in prefixes if recipe.stem.startswith(prefix)]
    assert matches, f"{recipe.name}: no job for this recipe name"
    return prefixes[max(matches, key=len)]


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_recipe_passes_its_jobs_check(recipe):
    job = load_jobs()[job_of(recipe)]
    job.check(parse_args(job.config_class, ["--config", str(recipe)]))


def test_the_job_table_names_each_jobs_module_script_and_stage_kind():
    jobs = load_jobs()
    assert set(jobs) == set(JOB_TABLE)
    for name, entry in JOB_TABLE.items():
        assert jobs[name] in vars(sys.modules[entry.module]).values(), f"{entry.module} defines no job '{name}'"
        assert entry.recipe is None or (RECIPES / entry.recipe).is_file(), entry.recipe
        if entry.stage_kind is not None:
            assert STAGE_KINDS[name].run.__module__ == entry.stage_kind, name
            assert STAGE_KINDS[name].config_class is jobs[name].config_class
    assert {name for name, entry in JOB_TABLE.items() if entry.stage_kind} == set(STAGE_KINDS) & set(jobs)
