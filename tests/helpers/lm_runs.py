"""The causal-LM tests' shared setting: the tiny word-level vocabulary, a tiny random Llama saved with it, a short
distillation run's config over a teacher and a corpus, and a word-level tokenizer with a chat template."""
from __future__ import annotations

from transformers import LlamaForCausalLM

from distill.core.config import LossConfig, StageConfig, StudentConfig
from distill.lm.config import LMDistillConfig, LMEvalConfig
from tests.conftest import NEGATIVE, NEUTRAL, POSITIVE, make_tokenizer, tiny_causal_lm, train_cfg

WORDS = POSITIVE + NEGATIVE + NEUTRAL
ONLINE = [LossConfig(name="forward_kl", weight=0.5), LossConfig(name="next_token_ce", weight=0.5)]
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}[CLS] {{ m['content'] }} [SEP]"
            "{% else %}{{ m['content'] }} [SEP] {% endif %}{% endfor %}{% if add_generation_prompt %}[CLS]{% endif %}")


def save_lm(folder, words, layers=2):
    tokenizer = make_tokenizer(words)
    model = tiny_causal_lm(len(tokenizer), tied=True)
    if layers != 2:
        model.config.num_hidden_layers = layers
        model = LlamaForCausalLM(model.config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def lm_cfg(tmp_path, teacher_dir, corpus, losses=ONLINE, **overrides):
    values = dict(teacher=str(teacher_dir), output_dir=str(tmp_path / "run"), data=corpus, validation_examples=8,
                  test_examples=8, student=StudentConfig(layers=[1]),
                  stages=[StageConfig(epochs=1, learning_rate=1e-3, losses=losses)],
                  eval=LMEvalConfig(prompts=["the film was", "a movie"], max_new_tokens=4),
                  train=train_cfg(batch_size=8, eval_batch_size=8, max_steps_per_stage=3))
    values.update(overrides)
    return LMDistillConfig(**values)


def chat_tokenizer():
    tokenizer = make_tokenizer(WORDS)
    tokenizer.chat_template, tokenizer.eos_token = TEMPLATE, "[SEP]"
    return tokenizer
