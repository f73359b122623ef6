"""Sequence-level distillation data on a tiny random Llama teacher with a chat template: the training rows hold the
teacher's completions (greedy ones equal `complete` on each prompt alone, sampled ones the shard generator's draws
over the shard's length batches), the held-out rows the references, in the input's order; prompts that fill
data.max_length are left out as a distillation run drops them, so both hold out the same examples; a run killed
after its first shard resumes to the same bytes without writing that shard again; other settings over the folder
are refused before the teacher loads; chat rows round-trip; bad settings are refused before work; a distillation
run trains on the output and holds out the references."""
import json

import pytest
import torch

import distill.lm.generate
from distill.core.chat import prompt_ids
from distill.core.config import CorpusConfig, LossConfig
from distill.core.data import corpus_tokens, load_pairs
from distill.core.errors import ConfigError
from distill.core.models import ensure_pad_token, load_causal_lm, load_tokenizer
from distill.lm.generate import GenerateConfig, check_generate, generate_teacher_data, length_batches, shard_generator
from distill.lm.job import distill_lm
from distill.lm.sampling import SamplingConfig, complete, stop_tokens
from tests.conftest import Interrupt, make_sentences, tiny_causal_lm
from tests.helpers.lm_runs import chat_tokenizer, lm_cfg

GREEDY = SamplingConfig(temperature=0, max_new_tokens=6)
SAMPLED = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=5)
TRAIN = 44  # the 60 examples of `pairs_file` less 8 validation and 8 test examples: shards of 16, 16 and 12


@pytest.fixture
def teacher_dir(tmp_path):
    """A tiny teacher whose output layer is not tied to its embedding: a tied random one repeats its last input
    token, the template's special [CLS], whose text is empty."""
    tokenizer = chat_tokenizer()
    tiny_causal_lm(len(tokenizer), tied=False).save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    return tmp_path / "teacher"


def generate_cfg(tmp_path, teacher, source, name="data", data_format="prompt_completion", **overrides):
    values = dict(teacher=str(teacher), output_dir=str(tmp_path / name),
                  data=CorpusConfig(source=str(source), format=data_format, max_length=32), validation_examples=8,
                  test_examples=8, sampling=GREEDY, batch_size=4, shard_examples=16)
    values.update(overrides)
    return GenerateConfig(**values)


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def teacher_and_tokenizer(folder):
    """The teacher on the device the job runs it on (the same numerics), its tokenizer and stop ids."""
    tokenizer = ensure_pad_token(load_tokenizer(str(folder)))
    teacher = load_causal_lm(str(folder)).to("cuda" if torch.cuda.is_available() else "cpu")
    return teacher, tokenizer, stop_tokens(tokenizer)


def test_greedy_rows_are_the_teachers_completions_and_the_held_out_rows_the_references(
        tmp_path, teacher_dir, pairs_file):
    cfg = generate_cfg(tmp_path, teacher_dir, pairs_file)
    manifest = generate_teacher_data(cfg)
    rows, pairs = rows_of(tmp_path / "data" / "data.jsonl"), load_pairs(cfg.data)
    assert [row["prompt"] for row in rows] == [pair.prompt[0]["content"] for pair in pairs]
    assert all(row["completion"] for row in rows[:TRAIN])  # the teacher writes words, not only special tokens
    assert [row["completion"] for row in rows[TRAIN:]] == [pair.completion for pair in pairs[TRAIN:]]
    teacher, tokenizer, stops = teacher_and_tokenizer(teacher_dir)
    written = [complete(teacher, [prompt_ids(tokenizer, pair.prompt)], GREEDY,
                        stops, tokenizer.pad_token_id)[0] for pair in pairs[:TRAIN]]
    assert [row["completion"] for row in rows[:TRAIN]] == [
        tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in written]
    assert manifest["completion_tokens"] == sum(len(ids) for ids in written)
    assert manifest["at_max_new_tokens"] == sum(len(ids) == 6 and ids[-1] not in stops for ids in written)
    assert (manifest["examples"], manifest["training_examples"], manifest["shard_count"]) == (60, TRAIN, 3)
    assert manifest["held_out"] == {"validation": 8, "test": 8} and manifest["complete"]
    # what a distillation run over the output holds out (its last 16 examples) is what it holds out of the input
    output = CorpusConfig(source=str(tmp_path / "data" / "data.jsonl"), format="prompt_completion", max_length=32)
    assert corpus_tokens(output, tokenizer).ids[TRAIN:] == corpus_tokens(cfg.data, tokenizer).ids[TRAIN:]


def test_prompts_that_fill_max_length_are_left_out_as_a_distillation_run_drops_them(tmp_path, teacher_dir,
                                                                                      pairs_file):
    cfg = generate_cfg(tmp_path, teacher_dir, pairs_file, data=CorpusConfig(source=str(pairs_file),
                                                                             format="prompt_completion", max_length=9))
    manifest = generate_teacher_data(cfg)
    tokenizer = ensure_pad_token(load_tokenizer(str(teacher_dir)))
    source = corpus_tokens(cfg.data, tokenizer)
    output = corpus_tokens(CorpusConfig(source=str(tmp_path / "data" / "data.jsonl"), format="prompt_completion",
                                        max_length=9), tokenizer)
    assert 0 < manifest["dropped"] == source.dropped and output.dropped == 0
    assert len(output.ids) == manifest["examples"] == 60 - source.dropped
    assert output.ids[-16:] == source.ids[-16:]


def test_a_killed_run_resumes_to_the_same_bytes_and_sampled_rows_are_the_shard_generators_draws(
        tmp_path, teacher_dir, pairs_file, monkeypatch):
    full = generate_cfg(tmp_path, teacher_dir, pairs_file, "full", sampling=SAMPLED, seed=3)
    generate_teacher_data(full)
    rows, pairs = rows_of(tmp_path / "full" / "data.jsonl"), load_pairs(full.data)
    teacher, tokenizer, stops = teacher_and_tokenizer(teacher_dir)
    prompts = [prompt_ids(tokenizer, pair.prompt) for pair in pairs[16:32]]
    generator, expected = shard_generator(3, 1), {}
    for batch in length_batches([len(ids) for ids in prompts], 4):
        written = complete(teacher, [prompts[i] for i in batch], SAMPLED, stops, tokenizer.pad_token_id, generator)
        expected.update({16 + i: tokenizer.decode(ids, skip_special_tokens=True).strip()
                         for i, ids in zip(batch, written)})
    assert [rows[i]["completion"] for i in range(16, 32)] == [expected[i] for i in range(16, 32)]

    def kill(shard):
        raise Interrupt

    resumed = generate_cfg(tmp_path, teacher_dir, pairs_file, "resumed", sampling=SAMPLED, seed=3)
    with pytest.raises(Interrupt):
        generate_teacher_data(resumed, on_shard=kill)
    first = tmp_path / "resumed" / "part-00000.jsonl"
    written_at = first.stat().st_mtime_ns
    assert not (tmp_path / "resumed" / "data.jsonl").exists()
    prompted = []

    def counting_complete(model, batch, *args):
        prompted.extend(batch)
        return complete(model, batch, *args)

    monkeypatch.setattr(distill.lm.generate, "complete", counting_complete)
    generate_teacher_data(resumed)
    assert len(prompted) == TRAIN - 16 and first.stat().st_mtime_ns == written_at
    assert (tmp_path / "resumed" / "data.jsonl").read_bytes() == (tmp_path / "full" / "data.jsonl").read_bytes()


@pytest.mark.parametrize("change, setting", [({"sampling": SamplingConfig(temperature=0, top_p=0.5)},
                                              r"sampling.top_p \(1.0; this run: 0.5\)"),
                                             ({"seed": 1}, r"seed \(0; this run: 1\)")])
def test_other_settings_over_the_same_folder_are_refused_before_the_teacher_loads(
        tmp_path, teacher_dir, pairs_file, monkeypatch, change, setting):
    generate_teacher_data(generate_cfg(tmp_path, teacher_dir, pairs_file))

    def no_teacher(name):
        raise AssertionError("the teacher loaded for a refused run")

    monkeypatch.setattr(distill.lm.generate, "load_causal_lm", no_teacher)
    with pytest.raises(ConfigError, match="holds teacher data generated with another " + setting):
        generate_teacher_data(generate_cfg(tmp_path, teacher_dir, pairs_file, **change))
    generate_teacher_data(generate_cfg(tmp_path, teacher_dir, pairs_file))  # the same settings: nothing to generate


def test_chat_rows_round_trip(tmp_path, teacher_dir):
    system = {"role": "system", "content": "a review"}
    conversations = [[*([system] if i % 2 else []), {"role": "user", "content": first},
                      {"role": "assistant", "content": second}]
                     for i, ((first, _), (second, _)) in enumerate(zip(make_sentences(24, 1), make_sentences(24, 2)))]
    source = tmp_path / "chat.jsonl"
    source.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in conversations))
    cfg = generate_cfg(tmp_path, teacher_dir, source, data_format="chat", validation_examples=2, test_examples=2)
    generate_teacher_data(cfg)
    rows = rows_of(tmp_path / "data" / "data.jsonl")
    assert [row["messages"][:-1] for row in rows] == [messages[:-1] for messages in conversations]
    assert [row["messages"] for row in rows[20:]] == conversations[20:]
    assert all(row["messages"][-1]["role"] == "assistant" for row in rows)
    output = load_pairs(CorpusConfig(source=str(tmp_path / "data" / "data.jsonl"), format="chat"))
    assert [pair.prompt for pair in output] == [messages[:-1] for messages in conversations[:len(output)]]


@pytest.mark.parametrize("change, message", [
    ({"data": CorpusConfig(format="text")}, "data.format must be prompt_completion or chat"),
    ({"sampling": SamplingConfig(temperature=-0.5)}, "sampling.temperature must be >= 0"),
    ({"sampling": SamplingConfig(top_p=0)}, r"sampling.top_p must be in \(0, 1\]"),
    ({"sampling": SamplingConfig(top_p=1.5)}, r"sampling.top_p must be in \(0, 1\]"),
    ({"sampling": SamplingConfig(max_new_tokens=0)}, "sampling.max_new_tokens must be at least 1"),
    ({"test_examples": -1}, "validation_examples and test_examples must be 0 or more"),
    ({"shard_examples": 0}, "batch_size and shard_examples must be at least 1"),
])
def test_bad_settings_are_refused_before_work(tmp_path, change, message):
    cfg = generate_cfg(tmp_path, tmp_path / "absent", tmp_path / "absent.jsonl", **change)
    with pytest.raises(ConfigError, match=message):
        check_generate(cfg)
    with pytest.raises(ConfigError, match=message):
        generate_teacher_data(cfg)


def test_too_few_examples_for_the_held_out_slices_is_refused(tmp_path, teacher_dir, pairs_file):
    with pytest.raises(ConfigError, match=r"the data has 60 examples: too few to hold out 30 \+ 30"):
        generate_teacher_data(generate_cfg(tmp_path, teacher_dir, pairs_file, validation_examples=30,
                                           test_examples=30))


def test_a_distillation_run_trains_on_the_teachers_data(tmp_path, teacher_dir, pairs_file):
    generate_teacher_data(generate_cfg(tmp_path, teacher_dir, pairs_file))
    corpus = CorpusConfig(source=str(tmp_path / "data" / "data.jsonl"), format="prompt_completion", max_length=32)
    result = distill_lm(lm_cfg(tmp_path, teacher_dir, corpus, [LossConfig(name="next_token_ce")]))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(record.get("train_next_token_ce", 0) > 0 for record in records)
    splits = result.metrics["splits"]
    assert (splits["train"], splits["validation"], splits["test"]) == ([0, TRAIN], [TRAIN, 52], [52, 60])
    assert 1 < result.metrics["test_perplexity"] < float("inf")
