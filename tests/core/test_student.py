import pytest
import torch
from transformers import AutoModelForCausalLM, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

from distill.core.config import StudentConfig
from distill.core.errors import ConfigError
from distill.core.models import load_causal_lm
from distill.core.student import build_student, check_student_config, student_layer_indices
from prune.config import LMPruneConfig, WidthConfig
from prune.lm import Sizes, prune_model
from prune.saving import save_compressed
from tests.conftest import make_tokenizer, tiny_bert_config
from tests.helpers.student_families import FULL, SLIDING, WORDS, family_config, save_family_lm


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
    with pytest.raises(ConfigError, match="student.num_layers must be positive, got 0"):
        build_student(StudentConfig(init="fresh", num_layers=0), teacher)


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


@pytest.mark.parametrize("student_cfg, stands_for", [
    (StudentConfig(layers=[0, 4]), [0, 4]),
    (StudentConfig(init="fresh", num_layers=2), [2, 5]),  # the layers the uniform layer map pairs it with
])
def test_qwens_window_bound_follows_the_students_layers(student_cfg, stands_for):
    teacher = AutoModelForCausalLM.from_config(family_config("qwen2"))  # layers 0-2 attend fully, 3-5 in a window
    config = build_student(student_cfg, teacher).config
    assert config.layer_types == [teacher.config.layer_types[i] for i in stands_for] == [FULL, SLIDING]
    # the family's own rule, from the bound alone, gives the same kinds (what readers of the bound will see)
    assert type(config).from_dict({**config.to_dict(), "layer_types": None}).layer_types == config.layer_types


def test_students_of_a_compressed_model_take_the_shapes_of_their_layers(tmp_path):
    """A model pruned to different FFN widths per layer records them in `config.compression` by layer; a student
    copying some of its layers has theirs, and reloads (through the saved modeling code) to the same logits; a fresh
    one has the family's stock shapes."""
    teacher = AutoModelForCausalLM.from_pretrained(save_family_lm("llama", tmp_path / "teacher"))
    ids = torch.randint(5, teacher.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    prune_model(teacher, LMPruneConfig(importance="activation", width=WidthConfig(uniform=False)),
                Sizes(hidden_size=None, intermediate_size=16, key_value_heads=None, remove_layers=0),
                [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}])
    save_compressed(teacher, make_tokenizer(WORDS), tmp_path / "pruned")
    base = load_causal_lm(str(tmp_path / "pruned"))
    widths = [layer.mlp.down_proj.in_features for layer in base.model.layers]
    assert len(set(widths)) > 1  # the test needs layers of different widths
    layers = [widths.index(min(widths)), widths.index(max(widths))]
    student = build_student(StudentConfig(layers=layers, model=str(tmp_path / "pruned")), None, load_causal_lm)
    assert [layer.mlp.down_proj.in_features for layer in student.model.layers] == [min(widths), max(widths)]
    student.save_pretrained(tmp_path / "student")
    with torch.no_grad():
        assert torch.equal(load_causal_lm(str(tmp_path / "student"))(input_ids=ids).logits,
                           student.eval()(input_ids=ids).logits)
    fresh = build_student(StudentConfig(init="fresh", num_layers=3, model=str(tmp_path / "pruned")), None,
                          load_causal_lm)
    assert [layer.mlp.down_proj.in_features for layer in fresh.model.layers] == [base.config.intermediate_size] * 3
