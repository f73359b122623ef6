"""Every kind of student (copied layers, fresh, pretrained, width-pruned) of every supported decoder family takes one
causal-LM distillation step, is saved, and reloads to the logits it had. Its per-layer config follows its layers:
each layer attends as the teacher layer it stands for (copied: the chosen ones; fresh: those the uniform layer map
pairs it with; pruned: those kept), and a saved student keeps its own."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from distill.core.config import CorpusConfig, LayerMapConfig, LossConfig, StageConfig, StudentConfig
from distill.core.mapping import build_layer_map
from distill.lm.config import LMDistillConfig, LMEvalConfig
from distill.lm.job import distill_lm
from prune.config import DepthConfig, LMPruneConfig
from prune.lm import Sizes, prune_model
from prune.saving import save_compressed
from tests.conftest import make_sentences, make_tokenizer, train_cfg
from tests.helpers.student_families import FAMILIES, TEACHER_LAYERS, WORDS, layer_types, save_family_lm

COPIED = [0, 1, 4]
FRESH = StudentConfig(init="fresh", num_layers=3, hidden_size=8, intermediate_size=16, num_attention_heads=2)
PRUNED_AWAY = [0, 3]
PRUNED_SIZES = Sizes(hidden_size=12, intermediate_size=16, key_value_heads=1, remove_layers=len(PRUNED_AWAY))


def copied_student(family, teacher_dir, tmp_path):
    return StudentConfig(layers=COPIED), COPIED


def fresh_student(family, teacher_dir, tmp_path):
    uniform = build_layer_map(LayerMapConfig(kind="uniform"), FRESH.num_layers, TEACHER_LAYERS)
    return FRESH, [teacher - 1 for _, teacher in uniform.hidden[1:]]


def pretrained_student(family, teacher_dir, tmp_path):
    folder = save_family_lm(family, tmp_path / "pretrained", layers=2, seed=1)
    return StudentConfig(init="pretrained", model=str(folder)), None


def pruned_student(family, teacher_dir, tmp_path):
    """The teacher pruned in width and depth by the prune stage's own function, saved, then loaded as it is."""
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    ids = torch.randint(5, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    depth = DepthConfig(strategy="explicit", layers=PRUNED_AWAY)
    prune_model(model, LMPruneConfig(importance="activation", depth=depth), PRUNED_SIZES, [batch])
    save_compressed(model.eval(), make_tokenizer(WORDS), tmp_path / "pruned")
    assert not (tmp_path / "pruned" / "modeling_compressed.py").exists()  # uniform widths: a stock model
    kept = [i for i in range(TEACHER_LAYERS) if i not in PRUNED_AWAY]
    return StudentConfig(init="pretrained", model=str(tmp_path / "pruned")), kept


KINDS = {"copy_layers": copied_student, "fresh": fresh_student, "pretrained": pretrained_student,
         "width_pruned": pruned_student}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_teacher(request, tmp_path_factory):
    """Each family's teacher, saved once for the four kinds of student."""
    return request.param, save_family_lm(request.param, tmp_path_factory.mktemp(request.param) / "teacher")


def one_step_cfg(tmp_path, teacher_dir, student: StudentConfig) -> LMDistillConfig:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(text for text, _ in make_sentences(12)) + "\n")
    return LMDistillConfig(
        teacher=str(teacher_dir), output_dir=str(tmp_path / "run"), student=student,
        data=CorpusConfig(source=str(corpus), max_length=16), validation_examples=2, test_examples=2,
        stages=[StageConfig(epochs=1, learning_rate=1e-3, losses=[LossConfig(name="forward_kl", weight=0.5),
                                                                  LossConfig(name="next_token_ce", weight=0.5)])],
        eval=LMEvalConfig(prompts=["the film"], max_new_tokens=1),
        train=train_cfg(batch_size=8, eval_batch_size=8, max_steps_per_stage=1))


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_student_of_every_family_distils_saves_and_reloads(family_teacher, kind, tmp_path):
    family, teacher_dir = family_teacher
    student_cfg, stands_for = KINDS[kind](family, teacher_dir, tmp_path)
    start = AutoConfig.from_pretrained(student_cfg.model) if student_cfg.model else None
    result = distill_lm(one_step_cfg(tmp_path, teacher_dir, student_cfg))

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    ids = torch.tensor([[2, 10, 11, 12, 13, 14, 15, 3]])  # longer than the 4-token sliding window
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits)
    teacher_types = layer_types(AutoConfig.from_pretrained(teacher_dir))
    expected = layer_types(start) if stands_for is None else teacher_types and [teacher_types[i] for i in stands_for]
    assert layer_types(reloaded.config) == expected
    assert reloaded.config.num_hidden_layers == len(stands_for or range(start.num_hidden_layers))
