"""Transfer sets, TinyBERT-style augmentation, the stored teacher logits and general distillation, on tiny models."""
import json
import random

import datasets
import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertModel

from distill.core.config import LossConfig, StageConfig, StudentConfig
from distill.core.data import load_splits
from distill.core.errors import ConfigError
from distill.core.loss_interface import IGNORED_LABEL
from distill.core.run import load_task
from distill.core.student import build_student
from distill.encoder import teacher_logits as logits_module
from distill.encoder.augment import Augmenter, neighbours, whole_word_ids
from distill.encoder.config import AugmentConfig, DistillConfig, GeneralDistillConfig, TextSetConfig, TransferConfig
from distill.encoder.general import attention_kl_metric, general_distill
from distill.encoder.job import check_distill, distill
from distill.encoder.teacher_logits import stored_teacher_logits
from distill.encoder.transfer import add_unlabelled, split_sentences, text_set, unlabelled_texts
from distill.losses.response import hard_label_ce
from tests.conftest import NEGATIVE, NEUTRAL, POSITIVE, data_cfg, make_sentences, make_tokenizer, never_train, train_cfg


def write_reviews(path, count=30, seed=0):
    """Reviews of two or three sentences from the tiny vocabulary, one per line, with HTML line breaks."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        sentences = [" ".join(rng.choices(NEUTRAL + POSITIVE + NEGATIVE, k=rng.randint(2, 7))) + rng.choice(".!?")
                     for _ in range(rng.randint(2, 3))]
        lines.append("<br /><br />".join(sentences))
    path.write_text("\n".join(lines) + "\n")
    return path


def saved_test_accuracy(folder, data) -> float:
    """The accuracy of the model saved in `folder`, read back with its own tokenizer, on the test split of `data`:
    what metrics.json should report, computed apart from the job's evaluation."""
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    test = load_splits(data)["test"]
    batch = tokenizer(list(test["text"]), truncation=True, max_length=data.max_length, padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1)
    return (predicted == torch.tensor(list(test["label"]))).sum().item() / len(test)


def test_split_sentences_cuts_after_end_marks_and_drops_markup():
    assert split_sentences("A good film.<br /><br />The plot was dull! Why? no end") == [
        "A good film.", "The plot was dull!", "Why?", "no end"]


def test_text_set_cuts_filters_shuffles_and_limits(tmp_path):
    path = tmp_path / "reviews.txt"
    path.write_text("one two three. four five six seven!\nshort. a much longer sentence here?\n")
    whole = text_set(TextSetConfig(source=str(path)), "transfer")
    assert sorted(whole) == sorted(["one two three. four five six seven!", "short. a much longer sentence here?"])
    cut = text_set(TextSetConfig(source=str(path), sentences=True, min_words=3), "transfer")
    assert sorted(cut) == sorted(["one two three.", "four five six seven!", "a much longer sentence here?"])
    again = text_set(TextSetConfig(source=str(path), sentences=True, min_words=3), "transfer")
    assert again == cut  # seeded shuffle
    assert len(text_set(TextSetConfig(source=str(path), sentences=True, min_words=3, limit=2), "transfer")) == 2


def test_text_set_reads_a_jsonl_column_and_names_a_missing_one(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"text {i}", "n": i}) for i in range(5)) + "\n")
    assert sorted(text_set(TextSetConfig(source=str(path), text_column="body"), "transfer")) == [
        f"text {i}" for i in range(5)]
    with pytest.raises(ConfigError, match=r"^transfer\.text_column='text' is not a column"):
        text_set(TextSetConfig(source=str(path)), "transfer")


@pytest.mark.parametrize("where", ["transfer", "corpus"])
def test_text_set_errors_name_the_sets_own_keys(tmp_path, where):
    """Not `data.`, which the loader names for a job's data, nor `format`, a key text sets lack."""
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("un film très bien\n".encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        text_set(TextSetConfig(source=str(latin1)), where)
    assert f"(line 1); set {where}.encoding to the file's encoding, e.g. {where}.encoding=latin-1" in str(caught.value)
    with pytest.raises(ConfigError, match=rf"^{where}\.encoding 'latin-2000' is not an encoding"):
        text_set(TextSetConfig(source=str(latin1), encoding="latin-2000"), where)
    with pytest.raises(ConfigError, match=rf"^{where}\.split='test' is not a split of .*; splits: train$"):
        text_set(TextSetConfig(source=str(latin1), encoding="latin-1", split="test"), where)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    with pytest.raises(ConfigError) as caught:
        text_set(TextSetConfig(source=str(prompts)), where)
    assert str(caught.value) == (f"{where}.text_column='text' is not a column of {prompts}; "
                                 "columns: prompt, completion")


def test_hard_label_ce_skips_unlabelled_examples_and_is_zero_without_labels():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]], requires_grad=True)
    labels = torch.tensor([0, IGNORED_LABEL, 1])
    expected = (torch.log1p(torch.exp(torch.tensor(-2.0))) + torch.log1p(torch.exp(torch.tensor(10.0)))) / 2
    assert torch.isclose(hard_label_ce(logits, labels), expected)
    none = hard_label_ce(logits, torch.full((3,), IGNORED_LABEL))
    none.backward()
    assert none.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_neighbours_are_the_nearest_other_rows_by_cosine():
    embedding = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0], [0.1, 0.9]])
    assert neighbours(embedding, [0, 2, 3, 4], k=1).tolist() == [[3], [3], [1], [1]]  # positions into the ids
    assert neighbours(embedding, [0, 1, 2], k=5).shape == (3, 2)  # at most the other ids


def test_only_one_piece_alphabetic_words_are_replaceable():
    tokenizer = make_tokenizer(POSITIVE + NEGATIVE + NEUTRAL + ["##s"])
    words = whole_word_ids(tokenizer, ["the films was good , [UNK] zzz", "moving"])
    assert set(words) == {"the", "was", "good", "moving"}  # "films" is two pieces; ",", specials and unknowns stay
    assert words["good"] == tokenizer.convert_tokens_to_ids("good")


def augmenter_for(rate=0.5, copies=3, seed=0):
    tokenizer = make_tokenizer(POSITIVE + NEGATIVE + NEUTRAL)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=16))
    texts = ["the film was good", "a dull and boring plot", "very lovely acting and story"]
    return Augmenter(AugmentConfig(copies=copies, rate=rate, candidates=3, seed=seed), model, tokenizer, texts), texts


def test_augmentation_is_seeded_and_draws_from_each_words_neighbours():
    augmenter, texts = augmenter_for()
    copies = augmenter.copies(texts)
    assert len(copies) == 9 and copies == augmenter_for()[0].copies(texts)
    assert copies != augmenter_for(seed=1)[0].copies(texts)
    changed = 0
    for i, copy in enumerate(copies):
        original = texts[i // 3].split()
        assert len(copy.split()) == len(original)
        for old, new in zip(original, copy.split()):
            if new != old:
                changed += 1
                assert new in augmenter.candidates[old]
    assert changed > 0


def test_augmented_copies_and_transfer_examples_join_the_training_split_unlabelled(sentiment_csv, trained_teacher,
                                                                                    tmp_path):
    teacher_dir = str(trained_teacher.run_dir / "model")
    task = load_task(data_cfg(sentiment_csv), teacher_dir)
    labelled = len(task.splits["train"])
    reviews = write_reviews(tmp_path / "reviews.txt")
    transfer = TransferConfig(source=str(reviews), sentences=True, min_words=2, limit=40)
    texts = unlabelled_texts(data_cfg(sentiment_csv), transfer, AugmentConfig(copies=2), trained_teacher.model,
                             task.tokenizer)
    grown = add_unlabelled(task, texts, data_cfg(sentiment_csv).max_length)
    train = grown.splits["train"]
    assert len(train) == labelled + 2 * labelled + 40
    assert train["labels"][:labelled] == task.splits["train"]["labels"]
    assert set(train["labels"][labelled:]) == {IGNORED_LABEL}
    assert grown.splits["test"] is task.splits["test"]
    alone_transfer = TransferConfig(source=str(reviews), limit=10, with_task_data=False)
    alone_texts = unlabelled_texts(data_cfg(sentiment_csv), alone_transfer, AugmentConfig(), trained_teacher.model,
                                   task.tokenizer)
    alone = add_unlabelled(task, alone_texts, data_cfg(sentiment_csv).max_length, alone_transfer.with_task_data)
    assert len(alone.splits["train"]) == 10 and set(alone.splits["train"]["labels"]) == {IGNORED_LABEL}


def test_distillation_on_a_transfer_set_alone_learns_from_the_teacher(sentiment_csv, trained_teacher, tmp_path):
    """Only unlabelled text: CE sees no label and adds nothing, KL teaches, and the student learns the task."""
    reviews = write_reviews(tmp_path / "reviews.txt", count=150)
    cfg = DistillConfig(teacher=str(trained_teacher.run_dir / "model"), output_dir=str(tmp_path / "student"),
                        data=data_cfg(sentiment_csv), student=StudentConfig(layers=[1, 3]),
                        transfer=TransferConfig(source=str(reviews), sentences=True, min_words=2,
                                                with_task_data=False),
                        stages=[StageConfig(epochs=3, learning_rate=3e-3, losses=[
                            LossConfig(name="kl", temperature=2.0), LossConfig(name="ce", weight=0.5)])],
                        train=train_cfg(log_steps=1, cache_teacher_logits=True))
    result = distill(cfg)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train_ce"] == 0.0 for r in records if "train_ce" in r)
    assert result.metrics["test_accuracy"] >= 0.8


def test_stored_teacher_logits_are_reused_by_a_second_run(monkeypatch, tmp_path, trained_teacher, sentiment_csv):
    monkeypatch.setenv("DISTILL_COMPRESS_CACHE", str(tmp_path / "cache"))
    task = load_task(data_cfg(sentiment_csv), str(trained_teacher.run_dir / "model"))
    first = stored_teacher_logits(trained_teacher.model, task.splits["train"], task.collate, 32, torch.device("cpu"))
    files = list((tmp_path / "cache" / "teacher-logits").glob("*.safetensors"))
    assert len(files) == 1 and first.shape == (len(task.splits["train"]), 2)

    def refuse(*args):
        raise AssertionError("the teacher ran again")

    monkeypatch.setattr(logits_module, "teacher_logits", refuse)
    again = stored_teacher_logits(trained_teacher.model, task.splits["train"], task.collate, 32, torch.device("cpu"))
    assert torch.equal(again, first)
    with pytest.raises(AssertionError, match="ran again"):  # other examples: another key
        stored_teacher_logits(trained_teacher.model, task.splits["train"].select(range(5)), task.collate, 32,
                              torch.device("cpu"))


@pytest.mark.parametrize("change, message", [
    ({"augment": AugmentConfig(copies=1, rate=0.0)}, "augment.rate must be in"),
    ({"augment": AugmentConfig(copies=-1)}, "augment.copies must be at least 0"),
    ({"transfer": TransferConfig(source="x.txt", limit=0)}, "transfer.limit must be at least 1"),
    ({"transfer": TransferConfig(with_task_data=False)}, "needs transfer.source"),
])
def test_bad_transfer_and_augment_settings_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        check_distill(DistillConfig(**change))


def test_augmenting_a_sentence_pair_task_is_refused():
    cfg = DistillConfig(augment=AugmentConfig(copies=1))
    cfg.data.text_pair_column = "hypothesis"
    with pytest.raises(ConfigError, match="augment works on single texts"):
        check_distill(cfg)


def save_tiny_base_encoder(folder):
    tokenizer = make_tokenizer(POSITIVE + NEGATIVE + NEUTRAL)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def general_cfg(teacher, corpus, out, **changes):
    values = dict(teacher=str(teacher), output_dir=str(out), max_length=16, validation_examples=20,
                  corpus=TextSetConfig(source=str(corpus), sentences=True, min_words=2),
                  student=StudentConfig(init="fresh", num_layers=2, hidden_size=16, num_attention_heads=2,
                                        intermediate_size=32),
                  stages=[StageConfig(name="general", epochs=3, learning_rate=3e-3, losses=[
                      LossConfig(name="hidden_mse"), LossConfig(name="attention_kl", head_match="group")])],
                  train=train_cfg())
    values.update(changes)
    return GeneralDistillConfig(**values)


def test_general_distillation_brings_a_narrow_student_closer_to_the_base_encoder(tmp_path):
    teacher_dir = save_tiny_base_encoder(tmp_path / "base")
    corpus = write_reviews(tmp_path / "reviews.txt", count=120)
    result = general_distill(general_cfg(teacher_dir, corpus, tmp_path / "general"))
    teacher = AutoModel.from_pretrained(teacher_dir, attn_implementation="eager").eval()
    torch.manual_seed(0)
    untrained = BertModel(BertConfig(**{**teacher.config.to_dict(), "num_hidden_layers": 2, "hidden_size": 16,
                                        "num_attention_heads": 2, "intermediate_size": 32}))
    untrained.set_attn_implementation("eager")
    texts = datasets.Dataset.from_dict(dict(make_tokenizer(POSITIVE + NEGATIVE + NEUTRAL)(
        ["the film was good and the plot was dull", "a lovely story"] * 4)))
    loader = torch.utils.data.DataLoader(texts, batch_size=4, collate_fn=lambda rows: {
        k: torch.nn.utils.rnn.pad_sequence([torch.tensor(r[k]) for r in rows], batch_first=True) for k in rows[0]})
    metric = attention_kl_metric(teacher)
    saved = AutoModel.from_pretrained(result.run_dir / "model", attn_implementation="eager")
    assert saved.config.hidden_size == 16 and saved.config.num_hidden_layers == 2
    assert metric.compute(saved, loader, Accelerator()) < metric.compute(untrained, loader, Accelerator())


def test_a_generally_distilled_encoder_starts_a_task_distillation(tmp_path, sentiment_csv, trained_teacher):
    teacher_dir = save_tiny_base_encoder(tmp_path / "base")
    corpus = write_reviews(tmp_path / "reviews.txt", count=60)
    general = general_distill(general_cfg(teacher_dir, corpus, tmp_path / "general",
                                          stages=[StageConfig(epochs=1, learning_rate=3e-3,
                                                              losses=[LossConfig(name="hidden_mse")])]))
    cfg = DistillConfig(teacher=str(trained_teacher.run_dir / "model"), output_dir=str(tmp_path / "student"),
                        data=data_cfg(sentiment_csv),
                        student=StudentConfig(init="pretrained", model=str(general.run_dir / "model")),
                        stages=[StageConfig(epochs=1, learning_rate=1e-3, losses=[LossConfig(name="kl")])],
                        train=train_cfg())
    start = build_student(cfg.student, trained_teacher.model)
    encoder = AutoModel.from_pretrained(general.run_dir / "model")
    for name, value in encoder.state_dict().items():
        assert torch.equal(start.bert.state_dict()[name], value), name
    result = distill(cfg)
    assert result.model.config.hidden_size == 16 and result.model.config.num_labels == 2
    assert result.metrics["test_accuracy"] == saved_test_accuracy(result.run_dir / "model", cfg.data)


@pytest.mark.parametrize("change, message", [
    ({"stages": [StageConfig(losses=[LossConfig(name="kl")])]}, "loss 'kl' needs logits or labels"),
    ({"corpus": TextSetConfig()}, "corpus.source is not set"),
    ({"validation_examples": 0}, "validation_examples must be at least 1"),
])
def test_bad_general_distillation_settings_are_refused(change, message):
    from distill.encoder.general import check_general
    with pytest.raises(ConfigError, match=message):
        check_general(GeneralDistillConfig(**change))


def test_a_vocabulary_pruned_student_learns_from_cached_logits_through_its_own_tokenizer(trained_teacher,
                                                                                           sentiment_csv, tmp_path):
    """The teacher reads its tokenization of each text, the student its own (fewer tokens, other ids)."""
    from distill.core.io import save_model
    from distill.core.models import load_classifier, load_tokenizer
    from prune.vocab import prune_vocabulary

    teacher_dir = str(trained_teacher.run_dir / "model")
    student = load_classifier(teacher_dir)
    texts = [text for text, _ in make_sentences(20)]
    report = prune_vocabulary(student, load_tokenizer(teacher_dir), texts, max_tokens=12)  # the student's ids
    # run past the teacher's vocabulary: fed the teacher's ids, its embedding would fail
    save_model(student, report.tokenizer, tmp_path / "pruned")
    reviews = write_reviews(tmp_path / "reviews.txt", count=20)
    cfg = DistillConfig(teacher=teacher_dir, output_dir=str(tmp_path / "student"), data=data_cfg(sentiment_csv),
                        student=StudentConfig(init="pretrained", model=str(tmp_path / "pruned")),
                        transfer=TransferConfig(source=str(reviews), sentences=True, min_words=2),
                        stages=[StageConfig(epochs=1, learning_rate=1e-3, losses=[LossConfig(name="kl")])],
                        train=train_cfg(cache_teacher_logits=True))
    result = distill(cfg)
    saved = load_tokenizer(str(result.run_dir / "model"))
    assert len(saved) == 12 and saved.get_vocab() == report.tokenizer.get_vocab()
    assert result.model.config.vocab_size == 12
    assert result.metrics["test_accuracy"] == saved_test_accuracy(result.run_dir / "model", cfg.data)
    cfg.train.cache_teacher_logits = False
    with pytest.raises(ConfigError, match="tokenizers differ .* train.cache_teacher_logits: true"):
        distill(cfg, on_step=never_train)
