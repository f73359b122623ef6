"""The causal-LM scripts on a tiny random Llama teacher and a 60-line corpus, through the recipes they read:
lm_perplexity.py (the teacher's held-out perplexity, checked against exp of the mean NLL computed here),
bench_lm_step.py (CE, online and cached runs, each in its own process), bench_trl_gkd.py (our side in this process;
TRL's side only where trl is installed: it is not here, and never installed offline) and compare_teacher_caches.py
(two caches of one teacher)."""
import json
import statistics
import sys
from pathlib import Path

import bench_lm_step
import bench_trl_gkd
import compare_teacher_caches
import lm_perplexity
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.core.config import CorpusConfig
from distill.lm.cache.job import build_from_config
from distill.lm.config import CacheConfig
from distill.lm.data import LMCollator
from tests.conftest import make_sentences
from tests.helpers.lm_runs import WORDS, save_lm

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
MAX_LENGTH = 16


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """The teacher's folder, the corpus file and its lines, and the overrides that put both into an LM recipe."""
    root = tmp_path_factory.mktemp("lm-scripts")
    teacher = save_lm(root / "teacher", WORDS)
    corpus = root / "corpus.txt"
    lines = [text for text, _ in make_sentences(60)]
    corpus.write_text("\n".join(lines) + "\n")
    overrides = [f"teacher={teacher}", f"data.source={corpus}", "data.shuffle_seed=null", "data.limit=null",
                 f"data.max_length={MAX_LENGTH}", "validation_examples=8", "test_examples=8", "student.layers=[1]",
                 "train.batch_size=4", "train.eval_batch_size=8"]
    return teacher, corpus, lines, overrides


def build_cache(folder: Path, teacher: Path, corpus: Path, k: int) -> Path:
    data = CorpusConfig(source=str(corpus), max_length=MAX_LENGTH)
    return build_from_config(CacheConfig(teacher=str(teacher), output_dir=str(folder), data=data, k=k, samples=0,
                                         batch_size=8)).folder


def test_lm_perplexity_is_exp_of_the_mean_nll_over_the_held_out_tokens(lm, capsys):
    teacher, _, lines, overrides = lm
    lm_perplexity.main(["--config", str(RECIPES / "distill_lm.yaml"), *overrides])
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"splits", "teacher", "student_before_training"}
    assert {name: result["splits"][name] for name in ("train", "validation", "test")} == {
        "train": [0, 44], "validation": [44, 52], "test": [52, 60]}
    assert all(set(result[model]) == {"validation", "test"} for model in ("teacher", "student_before_training"))
    tokenizer, model = AutoTokenizer.from_pretrained(teacher), AutoModelForCausalLM.from_pretrained(teacher).eval()
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for text in lines[52:]:
            ids = torch.tensor([tokenizer(text, truncation=True, max_length=MAX_LENGTH)["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            tokens += ids.shape[1] - 1
    assert result["teacher"]["test"] == pytest.approx(torch.tensor(nll / tokens).exp().item(), rel=1e-4)


def test_bench_lm_step_times_three_variants_on_the_same_batches(lm, tmp_path, capsys):
    teacher, corpus, _, overrides = lm
    cache = build_cache(tmp_path / "cache", teacher, corpus, k=4)
    out = tmp_path / "bench.json"
    bench_lm_step.main(["--ce", str(RECIPES / "distill_lm_ce.yaml"), "--online", str(RECIPES / "distill_lm.yaml"),
                        "--cached", str(RECIPES / "distill_lm_cached.yaml"), "--cache", str(cache), "--steps", "2",
                        "--warmup", "1", "--repeats", "1", "--json", str(out), *overrides])
    lines_out = capsys.readouterr().out.splitlines()
    assert lines_out[0] == ("| variant | losses | s/step | steps/s | step time vs CE | peak RSS growth MB | "
                            "peak vs CE |")
    rows = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ") for line in lines_out[2:5]}
    assert list(rows) == ["ce", "online", "cached"]
    assert rows["online"][1] == "0.5 forward_kl + 0.5 next_token_ce + 1 hidden_cosine"
    assert rows["ce"][4] == "1.00x"
    runs = json.loads(out.read_text())["runs"]
    assert all(len(run["step_seconds"]) == 2 for variant in runs.values() for run in variant)
    seconds = {variant: statistics.median(variant_runs[0]["step_seconds"]) for variant, variant_runs in runs.items()}
    assert rows["online"][2] == f"{seconds['online']:.2f}"
    assert rows["online"][4] == f"{seconds['online'] / seconds['ce']:.2f}x"
    # top-k float16 log-probabilities against the full distribution: 2 bytes x the 35 tokens of the vocabulary
    assert lines_out[-1].startswith("Teacher cache: ") and lines_out[-1].endswith(
        f"the full float16 distribution would take {2 * (5 + len(WORDS))} bytes per token.")


def test_bench_trl_gkd_our_side_starts_from_forward_kl_on_the_first_batch(lm, tmp_path):
    teacher, _, _, overrides = lm
    argv = ["--config", str(RECIPES / "distill_lm.yaml"), "--steps", "1", "--warmup", "1", *overrides]
    _, args, rest = bench_trl_gkd.parse([*argv, "--side", "ours", "--student-dir", str(tmp_path / "student"),
                                         "--run-dir", str(tmp_path / "ours")])
    bench_trl_gkd.save_initial_student(args, rest, tmp_path / "student")
    result = bench_trl_gkd.run_side(args, rest)
    assert len(result["step_seconds"]) == 1 and len(result["losses"]) == 2
    cfg = bench_trl_gkd.bench_config(args, rest, str(tmp_path / "student"))
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    batch = LMCollator(tokenizer)(list(bench_trl_gkd.first_batches_in_our_order(cfg, tokenizer, 1)))
    with torch.no_grad():
        log_p, log_q = (AutoModelForCausalLM.from_pretrained(folder).eval()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].log_softmax(-1)
            for folder in (teacher, tmp_path / "student"))
    targets = batch["labels"][:, 1:] != -100
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)[targets].mean().item()  # KL(teacher || student), T = 1
    assert result["losses"][0] == pytest.approx(kl, rel=1e-4)


def test_bench_trl_gkd_table_against_trl(lm, tmp_path, monkeypatch, capsys):
    pytest.importorskip("trl.experimental.gkd", reason="TRL is not installed here (the script installs it online)")
    monkeypatch.setattr(bench_trl_gkd, "trl_python", lambda: Path(sys.executable))
    bench_trl_gkd.main(["--config", str(RECIPES / "distill_lm.yaml"), "--steps", "1", "--warmup", "1", *lm[3]])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| trainer | s/step | steps/s | step time vs ours |")
    assert [line.split(" | ")[0] for line in lines[2:4]] == ["| ours", "| trl"]


def test_compare_teacher_caches_of_one_teacher(lm, tmp_path, capsys):
    teacher, corpus, lines, _ = lm
    first, second = (build_cache(tmp_path / f"cache-{k}", teacher, corpus, k) for k in (4, 2))
    config = tmp_path / "cache.yaml"
    config.write_text(yaml.safe_dump({"teacher": str(teacher), "data": {"source": str(corpus),
                                                                       "max_length": MAX_LENGTH}}))
    compare_teacher_caches.main(["--config", str(config), "--first", str(first), "--second", str(second),
                                 "--limit", "5"])
    result = json.loads(capsys.readouterr().out)
    assert result["top1_agreement"] == 1.0 and result["topk_overlap"] == 1.0  # the same teacher's top 2
    assert result["padded_slots_first"] == 0.0 and result["rows_without_tokens_first"] == 0
    tokenizer, model = AutoTokenizer.from_pretrained(teacher), AutoModelForCausalLM.from_pretrained(teacher).eval()
    masses = {4: [], 2: []}
    with torch.no_grad():
        for text in lines[:5]:
            ids = torch.tensor([tokenizer(text, truncation=True, max_length=MAX_LENGTH)["input_ids"]])
            probs = model(input_ids=ids).logits[0].softmax(-1)
            for k in masses:
                masses[k] += probs.topk(k, -1).values.sum(-1).tolist()
    assert result["examples"] == 5 and result["rows"] == len(masses[4])
    assert result["mass_in_slots_first"] == pytest.approx(statistics.mean(masses[4]), abs=1e-3)
    assert result["mass_in_slots_second"] == pytest.approx(statistics.mean(masses[2]), abs=1e-3)
