"""The teacher-logit cache on a tiny random Llama: cached rows equal the teacher's top-k, batches line up with padded
input_ids, a cache built from anything else is refused by name, corruption is caught, a killed build resumes to
the same cache, and its size on disk follows from k; sampled rows estimate the whole distribution without bias."""
import json
import struct

import pytest
import torch
from safetensors.torch import load_file
from transformers import DataCollatorWithPadding

from distill.core.config import CorpusConfig, parse_args
from distill.core.errors import ConfigError
from distill.core.models import ensure_pad_token
from distill.lm.cache.build import build_cache
from distill.lm.cache.store import CachedTeacherCollator, CacheKey, TeacherCache
from distill.lm.config import CacheConfig
from recipes.build_teacher_cache import main as build_recipe
from tests.conftest import (
    NEGATIVE,
    NEUTRAL,
    POSITIVE,
    REPO,
    launch_two_processes,
    make_sentences,
    make_tokenizer,
    tiny_causal_lm,
)

WORDS = POSITIVE + NEGATIVE + NEUTRAL


@pytest.fixture
def tokenizer():
    return make_tokenizer(WORDS)


@pytest.fixture
def teacher(tokenizer):
    return tiny_causal_lm(len(tokenizer), tied=True)


@pytest.fixture
def examples(tokenizer):
    """Ten sentences of 6 to 12 tokens."""
    return tokenizer([text for text, _ in make_sentences(10)])["input_ids"]


def build(teacher, tokenizer, examples, folder, k=5, temperature=2.0, **kwargs):
    return build_cache(teacher, tokenizer, examples, folder, k, temperature, shard_examples=4, batch_size=3, **kwargs)


def reference_topk(teacher, ids, k, temperature):
    with torch.no_grad():
        logits = teacher(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits / temperature, dim=-1).topk(k, dim=-1)


@pytest.mark.parametrize("vocab_size, index_dtype", [(len(WORDS) + 5, "uint16"), (70_000, "int32")])
def test_cached_rows_are_the_teachers_top_k_at_every_position(tokenizer, examples, tmp_path, vocab_size, index_dtype):
    teacher = tiny_causal_lm(vocab_size, tied=False)
    cache = TeacherCache.open(build(teacher, tokenizer, examples, tmp_path / "cache"))
    assert len({len(ids) for ids in examples}) > 3 and len(cache) == 10
    assert cache.manifest["tokens"] == sum(len(ids) for ids in examples)
    assert cache.manifest["indices_dtype"] == index_dtype
    assert str(load_file(tmp_path / "cache" / "shard-00000.safetensors")["indices"].dtype) == f"torch.{index_dtype}"
    for i, ids in enumerate(examples):
        logprobs, indices = cache[i]
        expected = reference_topk(teacher, ids, k=5, temperature=2.0)
        assert logprobs.shape == indices.shape == (len(ids), 5)
        assert torch.equal(indices, expected.indices)
        torch.testing.assert_close(logprobs, expected.values, atol=2e-3, rtol=1e-3)  # float16 on disk


def test_sampled_rows_hold_the_top_k_then_draws_from_the_rest_weighted_by_its_mass(tokenizer, examples, tmp_path):
    teacher = tiny_causal_lm(len(tokenizer), tied=False)
    folder = build(teacher, tokenizer, examples, tmp_path / "cache", samples=7, sample_seed=3)
    cache = TeacherCache.open(folder)
    assert (cache.k, cache.samples) == (5, 7) and cache.sizes()["payload_per_token"] == 12 * (2 + 2)
    raw = load_file(folder / "shard-00000.safetensors")
    for i, ids in enumerate(examples[:4]):
        logprobs, indices = cache[i]
        expected = reference_topk(teacher, ids, k=5, temperature=2.0)
        assert logprobs.shape == indices.shape == (len(ids), 12)
        assert torch.equal(indices[:, :5], expected.indices)
        assert not (indices[:, 5:, None] == expected.indices[:, None, :]).any()  # drawn from outside the top k
        rest = 1 - expected.values.exp().sum(-1, keepdim=True)
        stored = raw["logprobs"][raw["offsets"][i]:raw["offsets"][i + 1]].float()
        torch.testing.assert_close(stored[:, 5:], (rest / 7).log().expand(-1, 7), atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(logprobs.exp().sum(-1), torch.ones(len(ids)))  # renormalised on reading
    again = build(teacher, tokenizer, examples, tmp_path / "again", samples=7, sample_seed=3)
    assert all(torch.equal(cache[i][1], TeacherCache.open(again)[i][1]) for i in range(len(cache)))
    other_seed = TeacherCache.open(build(teacher, tokenizer, examples, tmp_path / "seed4", samples=7, sample_seed=4))
    assert not all(torch.equal(cache[i][1], other_seed[i][1]) for i in range(len(cache)))


def test_draws_average_to_the_teachers_whole_distribution():
    from distill.lm.cache.build import Draws

    logprobs = torch.log_softmax(torch.randn(3, 40, generator=torch.Generator().manual_seed(0)) * 2, -1)
    top = logprobs.topk(4, -1).indices
    weights, drawn = Draws(100_000, seed=0, shard=0, device=torch.device("cpu")).rows(logprobs, top)
    assert not (drawn[:, :, None] == top[:, None, :]).any()
    estimate = torch.zeros_like(logprobs).scatter(-1, top, logprobs.gather(-1, top).exp())
    estimate.scatter_add_(-1, drawn, weights.exp())
    torch.testing.assert_close(estimate.sum(-1), torch.ones(3))
    torch.testing.assert_close(estimate, logprobs.exp(), atol=4e-3, rtol=0)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batches_line_up_with_padded_input_ids_and_a_tokenizer_without_pad(teacher, tokenizer, examples, tmp_path,
                                                                          padding_side):
    cache = TeacherCache.open(build(teacher, tokenizer, examples, tmp_path / "cache"))
    tokenizer.pad_token, tokenizer.eos_token, tokenizer.padding_side = None, "[SEP]", padding_side
    collate = CachedTeacherCollator(cache, DataCollatorWithPadding(ensure_pad_token(tokenizer), return_tensors="pt"))
    assert tokenizer.pad_token == "[SEP]"
    chosen = [7, 2, 5]
    batch = collate([{"input_ids": examples[i], "cache_index": i} for i in chosen])
    mask = batch["attention_mask"].bool()
    assert batch["teacher_topk_logprobs"].shape == batch["teacher_topk_indices"].shape == (*mask.shape, 5)
    assert not mask.all()  # some padding
    with torch.no_grad():  # the teacher run on the padded batch itself: its positions are the student's
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = torch.log_softmax(logits / 2.0, dim=-1).topk(5, dim=-1)
    assert torch.equal(batch["teacher_topk_indices"][mask], expected.indices[mask])
    torch.testing.assert_close(batch["teacher_topk_logprobs"][mask], expected.values[mask], atol=2e-3, rtol=1e-3)
    assert not batch["teacher_topk_logprobs"][~mask].any()
    for row, i in enumerate(chosen):
        assert torch.equal(batch["teacher_topk_indices"][row][mask[row]], cache[i][1])
    with pytest.raises(ValueError, match="not tokenized as the cached corpus"):
        collate([{"input_ids": examples[7][:-1], "cache_index": 7}])


def changed_weights(teacher, tokenizer, examples):
    other = tiny_causal_lm(len(tokenizer), tied=True)
    with torch.no_grad():
        other.model.norm.weight[0] += 1e-3
    return CacheKey.of(other, tokenizer, examples, 5, 0, 2.0)


REFUSALS = {
    "teacher_weights_sha256": changed_weights,
    "tokenizer_sha256": lambda teacher, tokenizer, examples: CacheKey.of(teacher, make_tokenizer(WORDS + ["new"]),
                                                                          examples, 5, 0, 2.0),
    "corpus_sha256": lambda teacher, tokenizer, examples: CacheKey.of(teacher, tokenizer,
                                                                       [examples[0][::-1], *examples[1:]], 5, 0, 2.0),
    "k": lambda teacher, tokenizer, examples: CacheKey.of(teacher, tokenizer, examples, 4, 0, 2.0),
    "samples": lambda teacher, tokenizer, examples: CacheKey.of(teacher, tokenizer, examples, 5, 3, 2.0),
    "temperature": lambda teacher, tokenizer, examples: CacheKey.of(teacher, tokenizer, examples, 5, 0, 1.0),
}


@pytest.mark.parametrize("field", list(REFUSALS))
def test_a_cache_built_from_something_else_is_refused_naming_the_field(teacher, tokenizer, examples, tmp_path, field):
    folder = build(teacher, tokenizer, examples, tmp_path / "cache")
    expect = REFUSALS[field](teacher, tokenizer, examples)
    cached = json.loads((folder / "manifest.json").read_text())["key"][field]
    with pytest.raises(ConfigError, match=f"another {field}: the cache has {cached!r}, this run has "
                                          f"{getattr(expect, field)!r}"):
        TeacherCache.open(folder, expect=expect)


def test_the_key_ignores_where_teacher_and_tokenizer_were_loaded_from(teacher, tokenizer, examples, tmp_path):
    from distill.core.models import load_causal_lm, load_tokenizer

    folder = build(teacher, tokenizer, examples, tmp_path / "cache")
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    reloaded = CacheKey.of(load_causal_lm(str(tmp_path / "teacher")), ensure_pad_token(load_tokenizer(
        str(tmp_path / "teacher"))), examples, 5, 0, 2.0)
    assert len(TeacherCache.open(folder, expect=reloaded)) == 10


def test_missing_or_corrupt_shards_are_refused(teacher, tokenizer, examples, tmp_path):
    folder = build(teacher, tokenizer, examples, tmp_path / "cache")
    shard = folder / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0xFF  # a changed token index (the last tensor): same size, so only the checksum sees it
    shard.write_bytes(bytes(data))
    TeacherCache.open(folder)
    with pytest.raises(ConfigError, match="shard shard-00001.safetensors is corrupt"):
        TeacherCache.open(folder, verify=True)
    shard.write_bytes(bytes(data[:-8]))
    with pytest.raises(ConfigError, match=f"has {len(data) - 8} bytes, the manifest says {len(data)}"):
        TeacherCache.open(folder)
    shard.unlink()
    with pytest.raises(ConfigError, match="shard shard-00001.safetensors is missing"):
        TeacherCache.open(folder)


@pytest.mark.parametrize("samples", [0, 3])
def test_a_killed_build_leaves_no_cache_and_a_rerun_resumes_to_a_clean_builds_cache(teacher, tokenizer, examples,
                                                                                 tmp_path, samples):
    def kill_after_first(index):
        raise KeyboardInterrupt

    folder = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        build(teacher, tokenizer, examples, folder, samples=samples, on_shard=kill_after_first)
    assert not folder.exists()
    with pytest.raises(ConfigError, match="no complete teacher cache.*unfinished build"):
        TeacherCache.open(folder)
    first_shard = folder.with_name("cache.tmp") / "shard-00000.safetensors"
    written = first_shard.stat().st_mtime_ns

    done = []
    build(teacher, tokenizer, examples, folder, samples=samples, on_shard=done.append)
    assert done == [1, 2]  # three shards of 4, 4 and 2 examples; the first kept
    assert (folder / first_shard.name).stat().st_mtime_ns == written
    assert not folder.with_name("cache.tmp").exists() and not (folder / "progress.json").exists()
    clean = build(teacher, tokenizer, examples, tmp_path / "clean", samples=samples)
    assert (folder / "manifest.json").read_text() == (clean / "manifest.json").read_text()

    build(teacher, tokenizer, examples, folder, samples=samples, on_shard=done.append)  # same key, complete: kept
    assert done == [1, 2]
    build(teacher, tokenizer, examples, folder, k=4, samples=samples, on_shard=done.append)  # another key: rebuilt
    assert done == [1, 2, 0, 1, 2] and TeacherCache.open(folder).k == 4


def test_bytes_per_token_are_k_times_value_and_index_bytes_plus_offsets_and_header(tokenizer, tmp_path):
    teacher = tiny_causal_lm(128, tied=True)
    examples = [list(range(1 + i, 1 + i + length)) for i, length in enumerate([3, 9, 5, 17, 2, 8, 11])]
    cache = TeacherCache.open(build_cache(teacher, tokenizer, examples, tmp_path / "cache", k=64, shard_examples=3))
    tokens, files = 55, sorted((tmp_path / "cache").glob("shard-*.safetensors"))
    overhead = 0
    for path, shard in zip(files, cache.manifest["shards"]):
        (header,) = struct.unpack("<Q", path.read_bytes()[:8])
        assert path.stat().st_size == shard["tokens"] * 64 * (2 + 2) + 8 * (shard["examples"] + 1) + 8 + header
        overhead += 8 * (shard["examples"] + 1) + 8 + header
    sizes = cache.sizes()
    assert sizes["tokens"] == tokens and sizes["payload_per_token"] == 256
    assert sizes["total"] == tokens * 256 + overhead and sizes["per_token"] == sizes["total"] / tokens


def test_recipe_builds_a_cache_from_a_text_file_and_reports_its_size(teacher, tokenizer, tmp_path, capsys):
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    texts = [text for text, _ in make_sentences(6)]
    (tmp_path / "corpus.txt").write_text("\n\n".join(texts) + "\n")  # blank lines are no examples
    build_recipe([f"teacher={tmp_path / 'teacher'}", f"output_dir={tmp_path / 'cache'}",
                  f"data.source={tmp_path / 'corpus.txt'}", "data.limit=5", "data.max_length=6", "k=3",
                  "samples=2", "shard_examples=2"])
    report = json.loads(capsys.readouterr().out)
    cache = TeacherCache.open(report["cache"], verify=True)
    assert len(cache) == report["examples"] == 5
    assert report["tokens"] == sum(min(6, len(ids)) for ids in tokenizer(texts[:5])["input_ids"])
    assert report["payload_per_token"] == (3 + 2) * 4 and report["per_token"] > 20


def test_two_processes_build_the_one_process_cache_byte_for_byte(teacher, tokenizer, tmp_path, capsys):
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    (tmp_path / "corpus.txt").write_text("\n".join(text for text, _ in make_sentences(11)) + "\n")
    args = [f"teacher={tmp_path / 'teacher'}", f"data.source={tmp_path / 'corpus.txt'}", "data.max_length=12", "k=3",
            "samples=2", "shard_examples=2", "batch_size=2"]
    build_recipe([*args, f"output_dir={tmp_path / 'one'}"])
    done = launch_two_processes(REPO / "recipes" / "build_teacher_cache.py", [*args, f"output_dir={tmp_path / 'two'}"],
                                tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = sorted((tmp_path / "one").iterdir()), sorted((tmp_path / "two").iterdir())
    assert [p.name for p in one] == [p.name for p in two] and len(one) == 7  # six shards of 2, 2, 2, 2, 2 and 1
    for a, b in zip(one, two):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert not (tmp_path / "two.tmp").exists()


def test_config_errors_come_before_any_loading(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'temperature'"):
        parse_args(CacheConfig, ["temprature=2"])
    from distill.lm.cache.job import build_from_config

    for bad, message in [({"k": 0}, "k must be at least 1"), ({"temperature": 0.0}, "temperature must be positive"),
                         ({"samples": -1}, "samples must be 0"),
                         ({"data": CorpusConfig(limit=0)}, "data.max_length and data.limit must be at least 1")]:
        with pytest.raises(ConfigError, match=message):
            build_from_config(CacheConfig(teacher=str(tmp_path / "absent"), **bad))


def test_a_launch_whose_processes_accelerate_did_not_join_is_refused(teacher, tokenizer, tmp_path, monkeypatch):
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    (tmp_path / "corpus.txt").write_text("the film was good\n")
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's; without ACCELERATE_USE_CPU=1 each would build alone
    with pytest.raises(ConfigError, match="started 2 processes but Accelerate joined 1.*ACCELERATE_USE_CPU=1"):
        build_recipe([f"teacher={tmp_path / 'teacher'}", f"output_dir={tmp_path / 'cache'}", "--debug",
                      f"data.source={tmp_path / 'corpus.txt'}", "k=3"])
    assert not (tmp_path / "cache.tmp").exists()
