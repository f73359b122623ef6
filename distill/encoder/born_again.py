"""Born-again self-distillation (Furlanello et al., 2018): a chain of students of one architecture. Generation 1
learns from `teacher`, generation g from generation g-1's student. Every generation's student is built the same way
(`student`) from the original teacher, so from generation 2 on the teacher has the student's architecture; the
layer map is rebuilt for each (student, teacher) pair.

Each generation is a complete run folder, `output_dir/generation-<g>/`, whose config.yaml records its own teacher;
generation 1's config is the chain's, so it is the plain one-generation run. Running the chain again skips the
finished generations and resumes an interrupted one from its checkpoint. `output_dir/metrics.json` holds the final
student's metrics and a row per generation.

Every generation keeps the configured seed (same batch order, same initial weights for a `fresh` student), so the
teacher is the only thing that changes from one generation to the next."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from distill.core.errors import ConfigError
from distill.core.io import write_json_atomic
from distill.core.models import load_classifier
from distill.core.run import OnStep, RunResult, joined_processes, record_config, same_config
from distill.encoder.config import DistillConfig
from distill.encoder.single import distill_single


def born_again(cfg: DistillConfig, on_step: OnStep = None) -> RunResult:
    """Run (or finish) every generation, then summarise the chain in `output_dir/metrics.json`."""
    chain = [generation_config(cfg, g) for g in range(1, cfg.generations + 1)]
    done = [is_finished(generation) for generation in chain]
    root, main = Path(cfg.output_dir), joined_processes().is_main_process
    if main:
        record_config(cfg)
    result = None
    for generation, finished in zip(chain, done):
        if not finished:
            result = distill_single(generation, on_step)
    final_dir = Path(chain[-1].output_dir)
    summary = summarise(chain)
    if main:
        write_json_atomic(summary, root / "metrics.json")
    model = load_classifier(str(final_dir / "model")) if done[-1] else result.model
    return RunResult(model, summary, final_dir)


def check_generations(cfg: DistillConfig) -> None:
    """Config-only checks, before anything is loaded."""
    if cfg.generations < 1:
        raise ConfigError(f"generations must be at least 1; got {cfg.generations}")
    if cfg.generations > 1 and cfg.mutual.peers:
        raise ConfigError("generations > 1 and mutual.peers cannot be combined: a chain has one student per generation")
    if cfg.generations > 1 and cfg.layer_map.kind == "explicit":
        raise ConfigError(
            "layer_map.kind 'explicit' names layers of the original teacher, but from generation 2 on the teacher is "
            "the previous student; use 'uniform' or 'last' with generations > 1"
        )


def generation_config(cfg: DistillConfig, g: int) -> DistillConfig:
    """Generation g's own run: generation 1 is `cfg` itself (with its teachers); generation g > 1 learns from
    generation g-1's model alone and builds its student from the original teacher (or `student.model`)."""
    output_dir = str(Path(cfg.output_dir) / f"generation-{g}")
    if g == 1:
        return dataclasses.replace(cfg, output_dir=output_dir, generations=1)
    previous = Path(cfg.output_dir) / f"generation-{g - 1}" / "model"
    student = dataclasses.replace(cfg.student, model=cfg.student.model or cfg.teacher)
    return dataclasses.replace(cfg, output_dir=output_dir, generations=1, teacher=str(previous), extra_teachers=[],
                               teacher_weights=None, student=student)


def is_finished(generation: DistillConfig) -> bool:
    """Whether the generation's model and metrics are saved; a finished one must have been run with this config."""
    run_dir = Path(generation.output_dir)
    if not ((run_dir / "model").is_dir() and (run_dir / "metrics.json").is_file()):
        return False
    recorded = run_dir / "config.yaml"
    if not recorded.is_file() or not same_config(recorded, generation):
        raise ConfigError(
            f"{run_dir} holds a finished generation run with a different config ({recorded}); run the chain with "
            "that config, or choose another output_dir"
        )
    return True


def summarise(chain: list[DistillConfig]) -> dict:
    """The final generation's metrics, which folder that is, and each generation's teacher and accuracies."""
    metrics = [json.loads((Path(generation.output_dir) / "metrics.json").read_text()) for generation in chain]
    rows = [
        {"generation": g, "run_dir": generation.output_dir, "teacher": generation.teacher,
         "validation_accuracy": m["validation_accuracy"], "test_accuracy": m["test_accuracy"]}
        for g, (generation, m) in enumerate(zip(chain, metrics), start=1)
    ]
    return {**metrics[-1], "final": chain[-1].output_dir, "generations": rows}
