"""The start every job that does not train shares (`distill.core.run.open_run`): pruning a causal LM, quantizing a
classifier or a causal LM, GGUF and ONNX export each refuse a folder that holds an unfinished run (config.yaml
without metrics.json) of another config, and leave it as it was; a finished run of another config, or an unfinished
one of the same config, is continued, its config.yaml rewritten to the resolved config. The config is written whole
or not at all. A training run (`start_run`), or a job that makes its own Accelerator, gets its own mixed precision
after another run in the same process, as a pipeline's stages run."""
import dataclasses
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState

import distill.core.run
from distill.core.config import CorpusConfig, config_yaml
from distill.core.errors import ConfigError
from distill.core.run import record_config, start_run
from distill.lm.config import LMDistillConfig
from prune.lm import PRUNE_LM
from quant.config import GgufConfig, LMQuantConfig, OnnxExportConfig, QuantConfig
from quant.quantize import QUANTIZE
from quant.quantize_lm import QUANTIZE_LM
from tests.conftest import data_cfg, save_tiny_teacher, write_review_corpus, write_sentiment_csv
from tests.helpers.pruning import job_cfg, save_tiny_lm

JOBS = ["prune_lm", "quantize", "quantize_lm", "export_gguf", "export_onnx"]


class Started(Exception):
    """Raised once a job's start has recorded its config: what follows is each job's own work."""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("start")
    save_tiny_lm(root / "lm")
    save_tiny_teacher(root / "classifier")
    write_sentiment_csv(root / "sentiment.csv")
    write_review_corpus(root / "corpus.txt", 40)
    return root


def job_and_config(name: str, models: Path, tmp_path: Path):
    """The job and a config of it that passes its checks, writing into `tmp_path/run`."""
    out = str(tmp_path / "run")
    corpus = CorpusConfig(source=str(models / "corpus.txt"), max_length=16)
    if name == "prune_lm":
        return PRUNE_LM, job_cfg(tmp_path, models / "lm")
    if name == "quantize":
        return QUANTIZE, QuantConfig(model=str(models / "classifier"), output_dir=out,
                                     data=data_cfg(models / "sentiment.csv"), variants=["fp32"])
    if name == "quantize_lm":
        return QUANTIZE_LM, LMQuantConfig(model=str(models / "lm"), output_dir=out, data=corpus, variants=["fp32"])
    if name == "export_gguf":
        pytest.importorskip("llama_cpp", reason="scripts/setup.sh builds llama.cpp's bindings")
        from quant.export.gguf import EXPORT_GGUF
        return EXPORT_GGUF, GgufConfig(model=str(models / "lm"), output_dir=out, data=corpus, types=["f16"])
    pytest.importorskip("onnxruntime")
    from quant.export.onnx import EXPORT_ONNX
    return EXPORT_ONNX, OnnxExportConfig(model=str(models / "classifier"), output_dir=out,
                                         data=data_cfg(models / "sentiment.csv"))


def other(cfg):
    """`cfg` with another model: another config."""
    return dataclasses.replace(cfg, model=cfg.model + "-before")


def leave_run(cfg, recorded, finished: bool) -> Path:
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config_yaml(recorded))
    if finished:
        (run_dir / "metrics.json").write_text("{}")
    return run_dir


@pytest.mark.parametrize("name", JOBS)
def test_an_unfinished_run_of_another_config_is_refused_and_left_as_it_was(name, models, tmp_path):
    job, cfg = job_and_config(name, models, tmp_path)
    run_dir = leave_run(cfg, other(cfg), finished=False)
    with pytest.raises(ConfigError, match="holds an unfinished run with a different config"):
        job.run(cfg)
    assert (run_dir / "config.yaml").read_text() == config_yaml(other(cfg))
    assert sorted(path.name for path in run_dir.iterdir()) == ["config.yaml"]


@pytest.mark.parametrize("finished", [True, False], ids=["finished-other-config", "unfinished-same-config"])
@pytest.mark.parametrize("name", JOBS)
def test_a_finished_run_or_one_of_the_same_config_is_continued_with_the_resolved_config(name, finished, models,
                                                                                       tmp_path, monkeypatch):
    job, cfg = job_and_config(name, models, tmp_path)
    run_dir = leave_run(cfg, other(cfg) if finished else cfg, finished)
    (run_dir / "config.yaml").write_text((run_dir / "config.yaml").read_text() + "# as the run left it\n")
    recorded = []

    def record_then_stop(config):
        record_config(config)
        recorded.append(config)
        raise Started

    monkeypatch.setattr(distill.core.run, "record_config", record_then_stop)
    with pytest.raises(Started):
        job.run(cfg)
    assert recorded == [cfg]
    assert (run_dir / "config.yaml").read_text() == config_yaml(cfg)
    assert "config.tmp" not in [path.name for path in run_dir.iterdir()]


def test_a_config_write_that_fails_leaves_the_recorded_config_whole(tmp_path, monkeypatch):
    cfg = QuantConfig(output_dir=str(tmp_path / "run"))
    record_config(cfg)
    monkeypatch.setattr("distill.core.io.os.replace", no_rename)
    with pytest.raises(OSError):
        record_config(other(cfg))
    assert (tmp_path / "run" / "config.yaml").read_text() == config_yaml(cfg)


def no_rename(*args):
    raise OSError("disk full")


def test_a_training_run_gets_its_own_mixed_precision_after_another_run_in_the_same_process(tmp_path):
    for i, precision in enumerate(["no", "bf16", "no"]):
        cfg = LMDistillConfig(output_dir=str(tmp_path / f"run{i}"))
        cfg.train.mixed_precision = precision
        accelerator, _ = start_run(cfg)
        assert accelerator.mixed_precision == precision


def test_pruning_after_a_bf16_run_in_the_same_process_does_not_run_in_bf16(models, tmp_path):
    cfg = LMDistillConfig(output_dir=str(tmp_path / "distil"))
    cfg.train.mixed_precision = "bf16"
    start_run(cfg)
    PRUNE_LM.run(job_cfg(tmp_path, models / "lm"))
    assert AcceleratorState().mixed_precision == "no"
