"""A staged pipeline from teacher to served model: stages run in order (for example finetune -> distill -> prune ->
quantize -> report -> push), each stage's model feeding the next.

Stage kinds are found by name in `STAGE_KINDS`. `distill.pipeline.stages` registers finetune, distill and push,
`prune.stages` prune, and `quant.stages` quantize, qlora and report; the planner has them all
registered first through `distill.core.jobs.load_jobs`, which imports them by name, so that `distill` imports
neither `prune` nor `quant`.

Every stage is resolved and checked before any runs: its kind, its config (a recipe YAML of the kind's config class,
inline overrides over it), its input model, and that the order can work. Stage `i` runs in
`output_dir/<ii>-<name>/` and writes `stage.json` there twice, atomically: when it starts and, last, when it is
complete. The file holds a hash of the stage's resolved config chained to the previous stage's hash, so a re-run
skips a complete stage whose hash is unchanged, reruns one whose config (or any earlier stage's) changed, and lets
an interrupted one resume from its runner's own checkpoints. A stage whose metrics hold a failed gate (a report's
`gate`, `distill.core.gate`) stops the pipeline there, before `push`. The pipeline runs in one process."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from distill.core.config import CorpusConfig, DataConfig, from_dict, merge_values, read_config_file, to_dict
from distill.core.errors import ConfigError
from distill.core.gate import require_passed
from distill.core.io import write_json_atomic
from distill.core.jobs import Job, load_jobs, register_job
from distill.core.models import resolve_model
from distill.core.registry import Registry
from distill.core.run import OnStep

logger = logging.getLogger(__name__)

MARKER = "stage.json"
REPORT_KINDS = ("report", "report_lm")
"""The stage kinds that write the served model's card (and may hold a gate): a push follows one of them."""
REFERENCE = "@"


@dataclass
class StageEntry:
    kind: str = ""
    """A registered stage kind (see `STAGE_KINDS`): finetune, distill, prune, quantize, qlora, report, push."""
    name: Optional[str] = None
    """The stage's unique name, used in its folder and in `@name` references; None: its kind."""
    config: Optional[str] = None
    """A recipe YAML of the kind's config class, e.g. recipes/distill_tinybert.yaml."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Config values over the recipe's, nested as in its YAML; a dotted key sets one value deep inside, list items by
    index (`stages.0.learning_rate: 1.0e-3`). A string `@name` anywhere in them stands for the model of the earlier
    stage `name` (e.g. `teacher: "@finetune"`)."""
    model: Optional[str] = None
    """The input model (a path, an id, or `@name`); None: the previous stage's model. The first stage takes the one
    its config names."""
    output_model: Optional[str] = None
    """Which of the stage's saved models feeds the next stage (a quantize variant); None: the last one."""


@dataclass
class PipelineConfig:
    """Stages in order; each one's output folder feeds the next."""
    output_dir: str = "runs/compress"
    """The pipeline's folder: stage i runs in `<output_dir>/<ii>-<name>/` (e.g. `01-finetune`), whatever
    `output_dir` its own config names."""
    data: Optional[DataConfig] = None
    """When set, the data of every classifier stage: one task from teacher to served model."""
    corpus: Optional[CorpusConfig] = None
    """When set, the corpus of every causal-LM stage (its `data`), so that every stage splits the same texts."""
    stages: list[StageEntry] = field(default_factory=list)
    """The stages, run in order; at least one."""


@dataclass(frozen=True)
class StageKind:
    config_class: type
    """A config dataclass with `output_dir` and the `input_field` key."""
    run: Callable[[Any, "StageContext"], dict]
    """Runs the stage from its resolved config; returns the metrics that `stage.json` records."""
    input_field: str
    """The config key that holds the stage's input model (dotted for a nested one: `student.model`)."""
    outputs: Callable[[Any], dict[str, str]] = lambda cfg: {"model": "model"}
    """The model folders the stage saves, by name, as paths under its `output_dir`, known from the config alone;
    the last feeds the next stage unless the entry's `output_model` picks another."""
    check: Callable[[Any], None] = lambda cfg: None
    """Config-only checks, nothing loaded."""
    after: tuple[str, ...] = ()
    """Kinds one of which must run before this one, unless the entry names its own `model`."""

    @classmethod
    def of_job(cls, job: Job, run: Callable[[Any, "StageContext"], dict], **options) -> StageKind:
        """A kind that runs `job`: its config class and its one check."""
        return cls(job.config_class, run, check=job.check, **options)


STAGE_KINDS: Registry[StageKind] = Registry("stage kind")
register_stage = STAGE_KINDS.add


@dataclass
class Stage:
    """One stage as planned: resolved config, folder, the models it saves and the hash that marks it done."""
    index: int
    name: str
    kind_name: str
    kind: StageKind
    cfg: Any
    folder: Path
    input_model: str
    models: dict[str, Path]
    output: Optional[Path]
    """The model that feeds the next stage; None: the stage saves none."""
    hash: str

    @property
    def label(self) -> str:
        return f"stage {self.index + 1} ('{self.name}')"


@dataclass
class StageContext:
    earlier: list[Stage]
    """The stages before this one, all complete."""
    on_step: OnStep = None


def with_push(cfg: PipelineConfig, repo_id: str) -> PipelineConfig:
    """`cfg` with a final `push` stage to `repo_id`, whose id the report stages' model cards name."""
    stages = [dataclasses.replace(entry, overrides={**entry.overrides, "repo_id": repo_id})
              if entry.kind in REPORT_KINDS else entry for entry in cfg.stages]
    return dataclasses.replace(cfg, stages=stages + [StageEntry(kind="push", overrides={"repo_id": repo_id})])


def run_pipeline(cfg: PipelineConfig, on_step: OnStep = None) -> list[Stage]:
    """Plan and check every stage, then run each one that is not already complete with the same hash."""
    stages = plan_pipeline(cfg)
    for i, stage in enumerate(stages):
        if is_complete(stage):
            logger.info("%s: complete, skipped", stage.label)
            metrics = read_marker(stage.folder)["metrics"]
        else:
            logger.info("%s: running %s into %s", stage.label, stage.kind_name, stage.folder)
            start_stage(stage)
            metrics = stage.kind.run(stage.cfg, StageContext(stages[:i], on_step))
            write_marker(stage, complete=True, metrics=metrics)
        # a report's failed gate stops the pipeline before the next stage (push), on a rerun too
        require_passed(metrics.get("gate", []), stage.label)
    return stages


def plan_pipeline(cfg: PipelineConfig) -> list[Stage]:
    """Every stage resolved and checked, nothing loaded: a pipeline that cannot work fails here."""
    if not cfg.stages:
        raise ConfigError("the pipeline lists no stages")
    stages: list[Stage] = []
    for index, entry in enumerate(cfg.stages):
        stages.append(plan_stage(cfg, index, entry, stages))
    return stages


def plan_stage(cfg: PipelineConfig, index: int, entry: StageEntry, earlier: list[Stage]) -> Stage:
    name = entry.name or entry.kind
    where = f"stage {index + 1} ('{name}')"
    kind = stage_kind(entry.kind, where)
    if any(stage.name == name for stage in earlier):
        raise ConfigError(f"{where}: an earlier stage has this name; give one of them a `name`")
    if kind.after and entry.model is None and not any(stage.kind_name in kind.after for stage in earlier):
        needed = " or ".join(f"'{name}'" for name in kind.after)
        raise ConfigError(f"{where}: a '{entry.kind}' stage needs a {needed} stage before it (or its own `model`)")
    folder = Path(cfg.output_dir) / f"{index + 1:02d}-{name}"
    given = resolve_references(recipe_values(entry, where), earlier, where)
    input_model = input_model_of(entry, dotted_get(given, kind.input_field), earlier, where)
    values = merge_values(to_dict(kind.config_class()), given)
    values["output_dir"] = str(folder)
    dotted_set(values, kind.input_field, input_model)
    data_type = typing.get_type_hints(kind.config_class).get("data")
    for shared, cls in ((cfg.data, DataConfig), (cfg.corpus, CorpusConfig)):
        if shared is not None and data_type is cls:
            values["data"] = to_dict(shared)
    stage_cfg = checked_config(kind, values, where)
    models = {label: folder / path for label, path in kind.outputs(stage_cfg).items()}
    previous_hash = earlier[-1].hash if earlier else ""
    return Stage(index, name, entry.kind, kind, stage_cfg, folder, input_model, models,
                 chosen_output(entry, models, where), stage_hash(entry.kind, stage_cfg, previous_hash, cfg.output_dir))


def dotted_get(values: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(values, dict):
            return None
        values = values.get(key)
    return values


def dotted_set(values: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        values = values.setdefault(key, {})
    values[last] = value


def stage_kind(name: str, where: str) -> StageKind:
    load_jobs()
    return STAGE_KINDS.require(name, f"{where}: ")


def recipe_values(entry: StageEntry, where: str) -> dict[str, Any]:
    """The entry's recipe YAML with its inline overrides on top: only what the entry sets."""
    if not isinstance(entry.overrides, dict):
        raise ConfigError(f"{where}: overrides must be a mapping; got {entry.overrides!r}")
    try:
        recipe = read_config_file(entry.config) if entry.config else {}
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from err
    return merge_values(recipe, entry.overrides)


def resolve_references(value: Any, earlier: list[Stage], where: str) -> Any:
    """`@name` strings (at any depth) replaced by the model of the earlier stage `name`."""
    if isinstance(value, dict):
        return {key: resolve_references(item, earlier, where) for key, item in value.items()}
    if isinstance(value, list):
        return [resolve_references(item, earlier, where) for item in value]
    if isinstance(value, str) and value.startswith(REFERENCE):
        return str(referenced_model(value[len(REFERENCE):], earlier, where))
    return value


def referenced_model(name: str, earlier: list[Stage], where: str) -> Path:
    for stage in earlier:
        if stage.name == name:
            if stage.output is None:
                raise ConfigError(f"{where}: '@{name}' refers to {stage.label}, which saves no model")
            return stage.output
    names = ", ".join(stage.name for stage in earlier) or "none"
    raise ConfigError(f"{where}: '@{name}' names no earlier stage; the stages before it are: {names}")


def input_model_of(entry: StageEntry, configured: Optional[str], earlier: list[Stage], where: str) -> str:
    """The entry's `model`, else the previous stage's model, else (first stage) the one its config names."""
    if entry.model is not None:
        resolved = str(resolve_references(entry.model, earlier, where))
        # an earlier stage's model exists once that stage has run; anything else must exist now
        return resolved if entry.model.startswith(REFERENCE) else existing_model(resolved, where)
    if earlier:
        previous = earlier[-1]
        if previous.output is None:
            raise ConfigError(f"{where} needs a model, but {previous.label} before it saves none; set its `model`")
        return str(previous.output)
    if not configured:
        raise ConfigError(f"{where} is the first stage and names no input model; set its `model`")
    return existing_model(configured, where)


def existing_model(name: str, where: str) -> str:
    try:
        resolve_model(name)
    except ConfigError as err:
        raise ConfigError(f"{where}: input model: {err}") from err
    return name


def checked_config(kind: StageKind, values: dict[str, Any], where: str) -> Any:
    try:
        stage_cfg = from_dict(kind.config_class, values)
        kind.check(stage_cfg)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from err
    return stage_cfg


def chosen_output(entry: StageEntry, models: dict[str, Path], where: str) -> Optional[Path]:
    if entry.output_model is None:
        return list(models.values())[-1] if models else None
    if entry.output_model not in models:
        raise ConfigError(f"{where}: output_model '{entry.output_model}' is not among the models it saves: "
                          f"{', '.join(models) or 'none'}")
    return models[entry.output_model]


def stage_hash(kind: str, cfg: Any, previous_hash: str, root: str) -> str:
    """Of the kind, the resolved config and the previous stage's hash, so that a change reruns every later stage.
    Paths inside the pipeline's folder count relative to it: a moved pipeline folder stays complete."""
    text = json.dumps({"kind": kind, "config": to_dict(cfg), "previous": previous_hash}, sort_keys=True)
    return hashlib.sha256(text.replace(str(Path(root)) + os.sep, "<pipeline>/").encode()).hexdigest()


def read_marker(folder: Path) -> Optional[dict]:
    marker = folder / MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


def is_complete(stage: Stage) -> bool:
    marker = read_marker(stage.folder)
    return (marker is not None and marker["complete"] and marker["hash"] == stage.hash
            and all(path.exists() for path in stage.models.values()))


def start_stage(stage: Stage) -> None:
    """A folder left by another config is removed; one left by this config (interrupted) is kept to resume."""
    marker = read_marker(stage.folder)
    if marker is not None and marker["hash"] != stage.hash:
        shutil.rmtree(stage.folder)
    stage.folder.mkdir(parents=True, exist_ok=True)
    write_marker(stage, complete=False)


def write_marker(stage: Stage, complete: bool, metrics: Optional[dict] = None) -> None:
    values = {"kind": stage.kind_name, "name": stage.name, "hash": stage.hash, "complete": complete,
              "input_model": stage.input_model, "models": {k: str(v) for k, v in stage.models.items()},
              "output": None if stage.output is None else str(stage.output), "metrics": metrics or {}}
    write_json_atomic(values, stage.folder / MARKER)


def pipeline_summary(cfg: PipelineConfig, stages: list[Stage]) -> str:
    return "".join(f"{stage.label}: {stage.output or stage.folder}\n" for stage in stages)


PIPELINE = register_job(Job("pipeline", PipelineConfig, plan_pipeline, run_pipeline, pipeline_summary))
