import pytest
import torch
from transformers import BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

from distill.core.config import StudentConfig
from distill.core.errors import ConfigError
from distill.core.student import build_student, check_student_config, student_layer_indices
from tests.conftest import tiny_bert_config


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(30, num_hidden_layers=6)).eval()


def test_copied_student_holds_the_chosen_teacher_layers(teacher):
    student = build_student(StudentConfig(init="copy_layers", layers=[1, 3, 5]), teacher)
    assert student.config.num_hidden_layers == 3 and teacher.config.num_hidden_layers == 6
    for new, old in enumerate([1, 3, 5]):
        s_layer, t_layer = student.bert.encoder.layer[new], teacher.bert.encoder.layer[old]
        for (name, s_param), (_, t_param) in zip(s_layer.named_parameters(), t_layer.named_parameters()):
            assert torch.equal(s_param, t_param), name
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    # copies, not shared tensors
    assert student.classifier.weight.data_ptr() != teacher.classifier.weight.data_ptr()


def test_copied_student_equals_teacher_when_all_layers_are_kept(teacher):
    student = build_student(StudentConfig(layers=list(range(6))), teacher).eval()
    ids = torch.randint(5, 30, (2, 7))
    assert torch.allclose(student(input_ids=ids).logits, teacher(input_ids=ids).logits, atol=1e-6)


def test_default_layer_choice_is_evenly_spaced_ending_at_the_top():
    assert student_layer_indices(StudentConfig(num_layers=3), 6) == [1, 3, 5]
    assert student_layer_indices(StudentConfig(num_layers=4), 12) == [2, 5, 8, 11]
    assert student_layer_indices(StudentConfig(), 6) == [1, 3, 5]


def test_bad_layer_choices_are_clear_errors(teacher):
    with pytest.raises(ConfigError, match=r"student.layers \[6\] out of range: teacher layers are 0..5"):
        build_student(StudentConfig(layers=[1, 3, 6]), teacher)
    with pytest.raises(ConfigError, match="repeats"):
        build_student(StudentConfig(layers=[1, 1]), teacher)
    with pytest.raises(ConfigError, match="disagrees"):
        build_student(StudentConfig(layers=[1, 3], num_layers=3), teacher)
    with pytest.raises(ConfigError, match="num_layers must be in 1..6"):
        build_student(StudentConfig(num_layers=9), teacher)


def test_fresh_student_is_narrower_and_checks_heads(teacher):
    cfg = StudentConfig(init="fresh", num_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2)
    student = build_student(cfg, teacher)
    assert (student.config.num_hidden_layers, student.config.hidden_size, student.config.intermediate_size,
            student.config.num_attention_heads) == (2, 16, 32, 2)
    assert student.config.vocab_size == teacher.config.vocab_size
    assert teacher.config.hidden_size == 32  # the teacher's config is untouched
    with pytest.raises(ConfigError, match="hidden_size 18 is not divisible by num_attention_heads 4"):
        build_student(StudentConfig(init="fresh", hidden_size=18), teacher)


def test_unsupported_architecture_is_named():
    gpt2 = GPT2ForSequenceClassification(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=30))
    with pytest.raises(ConfigError, match="architecture 'gpt2' is not supported"):
        build_student(StudentConfig(layers=[0]), gpt2)


def test_unknown_init_is_an_error(teacher):
    with pytest.raises(ConfigError, match="student.init"):
        build_student(StudentConfig(init="shrink"), teacher)


def test_student_model_is_the_base_the_student_is_copied_from(teacher, tmp_path):
    torch.manual_seed(1)
    BertForSequenceClassification(tiny_bert_config(30, num_hidden_layers=4)).save_pretrained(tmp_path / "base")
    student = build_student(StudentConfig(layers=[0, 3], model=str(tmp_path / "base")), teacher)
    base = BertForSequenceClassification.from_pretrained(tmp_path / "base")
    assert student.config.num_hidden_layers == 2
    for new, old in enumerate([0, 3]):
        s_layer, b_layer = student.bert.encoder.layer[new], base.bert.encoder.layer[old]
        assert torch.equal(s_layer.output.dense.weight, b_layer.output.dense.weight)
    assert torch.equal(student.classifier.weight, base.classifier.weight)
    assert not torch.equal(student.classifier.weight, teacher.classifier.weight)


def test_sizes_given_with_a_pretrained_student_must_be_its_sizes(teacher, tmp_path):
    BertForSequenceClassification(tiny_bert_config(30, num_hidden_layers=4)).save_pretrained(tmp_path / "base")
    cfg = StudentConfig(init="pretrained", model=str(tmp_path / "base"), num_layers=4, hidden_size=32)
    assert build_student(cfg, teacher).config.num_hidden_layers == 4
    cfg.hidden_size = 64
    with pytest.raises(ConfigError, match="student.hidden_size=64, but the pretrained student .* has 32"):
        build_student(cfg, teacher)


def test_widths_with_copied_layers_are_refused_not_ignored():
    with pytest.raises(ConfigError, match="student.hidden_size is not used with init 'copy_layers'"):
        check_student_config(StudentConfig(num_layers=2, hidden_size=64))
    check_student_config(StudentConfig(num_layers=2))
