"""Causal-LM pruning, Minitron-style, on a tiny random model of every supported family: depth and every width axis
(key/value head groups, FFN neurons, hidden channels) cut to uniform sizes give the family's stock architecture;
one distillation step from the unpruned model trains it (hidden-state loss through the learned projection); saved,
it reloads with plain `from_pretrained` to identical logits. The job end to end, its parameter target and the inputs
it refuses before any work."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, BertModel, PreTrainedModel

from distill.core.cli import run_recipe
from distill.core.config import LayerMapConfig, LossConfig
from distill.core.errors import ConfigError
from distill.core.loss_interface import LossSetup, build_losses
from distill.core.mapping import build_layer_map
from distill.core.trainer import Objective
from prune.config import CalibrationConfig, DepthConfig, LMPruneConfig, WidthConfig
from prune.lm import PRUNE_LM, Sizes, check_prune_lm, parameters_of, plan_sizes, prune_lm, prune_model
from prune.saving import save_compressed
from tests.conftest import make_tokenizer, tiny_bert_config
from tests.helpers.families import FAMILIES, VOCAB, lm_batch, tiny_family_model
from tests.helpers.lm_runs import WORDS
from tests.helpers.pruning import job_cfg, save_tiny_lm

SIZES = Sizes(hidden_size=36, intermediate_size=64, key_value_heads=1, remove_layers=1)  # 36: a multiple of 3 heads


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_prunes_to_its_stock_architecture_trains_and_reloads_to_the_same_logits(family, tmp_path):
    teacher = tiny_family_model(family)
    student = tiny_family_model(family)
    kept = prune_model(student, LMPruneConfig(importance="activation"), SIZES, [lm_batch(0), lm_batch(1)])
    config = student.config
    assert len(kept) == 3 and config.num_hidden_layers == 3
    assert (config.hidden_size, config.intermediate_size) == (36, 64)
    assert (config.num_attention_heads, config.num_key_value_heads) == (3, 1)
    assert sum(p.numel() for p in student.parameters()) == parameters_of(teacher.config, SIZES)

    layer_map = build_layer_map(LayerMapConfig(kind="explicit", layers=kept), 3, 4)
    losses = build_losses([LossConfig(name="forward_kl", weight=0.5), LossConfig(name="next_token_ce", weight=0.5),
                           LossConfig(name="hidden_cosine")], LossSetup(config, teacher.config, layer_map, VOCAB))
    objective = Objective(student.train(), losses, teacher.get_output_embeddings())
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-2)
    batch = lm_batch(2)
    with torch.no_grad():
        teacher_out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              output_hidden_states=True)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    loss, parts = objective(batch, teacher_out)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and set(parts) == {"forward_kl", "next_token_ce", "hidden_cosine"}
    assert any(not torch.equal(p, before[name]) for name, p in student.named_parameters())
    assert losses["hidden_cosine"].projection.weight.shape == (48, 36)  # pruned width -> teacher width

    save_compressed(student.eval(), make_tokenizer(WORDS), tmp_path / "pruned")
    saved = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert "auto_map" not in saved and "compression" not in saved
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")  # plain: no trust_remote_code
    inputs = {k: v for k, v in lm_batch(3).items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(student(**inputs).logits, reloaded(**inputs).logits)


def test_activation_scores_rank_a_silenced_neuron_and_head_group_last():
    model = tiny_family_model("llama")
    layer = model.model.layers[0]
    with torch.no_grad():
        layer.mlp.down_proj.weight[:, 5] = 0  # no effect on the output, but its activation is still there
        layer.mlp.gate_proj.weight[5] = 0  # its activation: silu(0) * up = 0
        layer.self_attn.v_proj.weight[8:16] = 0  # key/value group 1: its heads' outputs are 0
    from prune.importance import score

    scores = score(model, "activation", [lm_batch(0)])
    assert scores.neurons[0].argmin() == 5
    assert scores.heads[0][3:].sum() == 0 < scores.heads[0][:3].min()
    assert scores.hidden.shape == (48,) and (scores.layers > 0).all()


def test_the_job_prunes_saves_a_stock_model_and_reports_it(tmp_path):
    cfg = job_cfg(tmp_path, save_tiny_lm(tmp_path / "lm"))
    result = prune_lm(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["stock_architecture"] and metrics["reload_max_abs_diff"] == 0.0
    assert metrics["sizes"] == {"hidden_size": None, "intermediate_size": 32, "key_value_heads": 1,
                                "layers_removed": 1}
    assert len(metrics["kept_layers"]) == 1 and metrics["calibration_tokens"] >= 1024
    parameters = sum(p.numel() for p in result.model.parameters())
    assert metrics["parameters"] == parameters < metrics["unpruned"]["parameters"]
    assert metrics["splits"]["train"] == [0, 130] and metrics["splits"]["validation"] == [130, 140]
    validation = (tmp_path / "corpus.txt").read_text().splitlines()[130:140]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "model")
    unpruned = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    assert metrics["unpruned"]["validation_perplexity"] == pytest.approx(
        perplexity_by_hand(unpruned, tokenizer, validation), rel=1e-5)
    assert metrics["validation_perplexity"] == pytest.approx(
        perplexity_by_hand(result.model, tokenizer, validation), rel=1e-5)


@torch.no_grad()
def perplexity_by_hand(model, tokenizer, texts: list[str]) -> float:
    """exp of the mean negative log-likelihood of every next token of `texts` (cut to the job's 16 tokens), one text
    at a time: no padding."""
    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor(tokenizer(text, truncation=True, max_length=16)["input_ids"])
        logits = model.eval()(input_ids=ids[None]).logits[0, :-1]
        nll += F.cross_entropy(logits, ids[1:], reduction="sum").item()
        count += len(ids) - 1
    return math.exp(nll / count)


def no_weights(*args, **kwargs):
    raise AssertionError("weights loaded before the check")


@pytest.mark.parametrize("target", [None, 999_999_999])  # None: exactly the model's own count
def test_a_target_at_or_above_the_models_size_is_refused_before_any_weights_load(tmp_path, monkeypatch, target):
    model_dir = save_tiny_lm(tmp_path / "lm")
    full = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    target = target or full
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(no_weights))
    cfg = job_cfg(tmp_path, model_dir, target_parameters=target, width=WidthConfig(), depth=DepthConfig())
    with pytest.raises(ConfigError, match=rf"^target_parameters={target:,} is not below the model's own {full:,} "
                                          r"parameters: nothing to prune$"):
        prune_lm(cfg)
    assert not (tmp_path / "run").exists()


def test_an_encoder_is_refused_in_one_line_before_any_weights_load(tmp_path, monkeypatch, capfd):
    tokenizer = make_tokenizer(WORDS)
    BertModel(tiny_bert_config(len(tokenizer))).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(no_weights))
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit:
        run_recipe(PRUNE_LM, [f"model={tmp_path / 'bert'}", f"output_dir={tmp_path / 'run'}",
                              "width.intermediate_size=8"])
    assert exit.value.code == 2
    assert capfd.readouterr() == ("", "config error: causal-LM pruning supports the families llama, mistral, qwen2, "
                                      "qwen3, gemma2, gemma3_text, phi3; 'bert' is not one of them\n")


def test_a_parameter_target_picks_the_largest_sizes_under_it():
    config = tiny_family_model("llama").config
    full = parameters_of(config, Sizes(None, None, None, 0))
    target = int(full * 0.7)
    cfg = LMPruneConfig(target_parameters=target, target_axes=["hidden", "ffn", "heads"],
                        width=WidthConfig(multiple_of=4))
    sizes = plan_sizes(cfg, config)
    assert parameters_of(config, sizes) <= target
    wider = Sizes(sizes.hidden_size, sizes.intermediate_size + 4, sizes.key_value_heads, 0)
    assert sizes.intermediate_size == config.intermediate_size or parameters_of(config, wider) > target
    assert parameters_of(config, Sizes(sizes.hidden_size, sizes.intermediate_size, sizes.key_value_heads, 0)) > int(
        full * 0.6)  # not far under: the FFN took what budget the coarse axes left
    assert sizes.hidden_size % (sizes.key_value_heads * 3) == 0  # a whole number of the query heads kept
    depth = plan_sizes(LMPruneConfig(target_parameters=target, target_axes=["depth"]), config)
    assert parameters_of(config, depth) <= target < parameters_of(config, Sizes(None, None, None,
                                                                                 depth.remove_layers - 1))


@pytest.mark.parametrize("change, message", [
    (dict(importance="hessian"), "importance: unknown importance criterion 'hessian'"),
    (dict(depth=DepthConfig(strategy="random")), "depth.strategy must be one of"),
    (dict(target_parameters=10, width=WidthConfig(intermediate_size=8)), "target_parameters picks the sizes of ffn"),
    (dict(target_axes=["depth", "ffn"], target_parameters=10), "'depth' is searched alone"),
    (dict(width=WidthConfig(hidden_size=16), importance="taylor"), "needs a criterion that ranks hidden channels"),
    (dict(width=WidthConfig(), depth=DepthConfig(), target_parameters=10, importance="fisher"),
     "pruning the hidden size needs a criterion"),
    (dict(width=WidthConfig(), depth=DepthConfig()), "nothing to prune"),
])
def test_bad_configs_are_refused_before_anything_loads(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        check_prune_lm(job_cfg(tmp_path, tmp_path / "absent", **change))


@pytest.mark.parametrize("family, change, message", [
    ("llama", dict(width=WidthConfig(key_value_heads=3)), r"width.key_value_heads=3 is out of reach: the model has 2"),
    ("llama", dict(depth=DepthConfig(count=4)), "removing 4 of 4 layers would leave none"),
    ("llama", dict(depth=DepthConfig(count=3, strategy="alternate")), "'alternate' removes at most 2 of 4"),
    ("gemma2", dict(width=WidthConfig(hidden_size=40, key_value_heads=1)),
     r"the pruned gemma2 config would be invalid: The hidden size \(40\) is not a multiple of the number of "
     r"attention heads \(3\)"),
    ("llama", dict(target_parameters=100, target_axes=["hidden", "ffn"]), "target_parameters=100 is out of reach"),
])
def test_targets_the_architecture_cannot_reach_are_refused_from_its_config(tmp_path, family, change, message):
    with pytest.raises(ConfigError, match=message):
        plan_sizes(job_cfg(tmp_path, tmp_path / "absent", **change), tiny_family_model(family).config)


def test_an_unsupported_family_and_a_small_calibration_set_are_refused_by_name(tmp_path):
    from transformers import GPT2Config

    with pytest.raises(ConfigError, match="supports the families llama, mistral, qwen2, qwen3, gemma2, gemma3_text, "
                                          "phi3; 'gpt2' is not one of them"):
        plan_sizes(job_cfg(tmp_path, tmp_path / "absent"), GPT2Config())
    cfg = job_cfg(tmp_path, save_tiny_lm(tmp_path / "lm"), calibration=CalibrationConfig(examples=4))
    with pytest.raises(ConfigError, match=r"calibration has \d+ tokens \(4 texts of at most 16\); ranking by "
                                          r"'activation' needs at least 1024"):
        prune_lm(cfg)
    assert not (tmp_path / "run").exists()


def test_non_uniform_widths_reload_through_the_shipped_modeling_code_and_are_refused_for_gguf(tmp_path):
    from distill.core.models import load_causal_lm
    from quant.export.gguf import check_exportable

    model = tiny_family_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(10)  # layer 0's neurons outrank the others' globally
    batches = [lm_batch(0)]
    prune_model(model, LMPruneConfig(width=WidthConfig(uniform=False)), Sizes(None, 48, None, 0), batches)
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    assert len(set(widths)) > 1 and sum(widths) == 48 * 4
    save_compressed(model, make_tokenizer(WORDS), tmp_path / "pruned")
    assert "compression" in json.loads((tmp_path / "pruned" / "config.json").read_text())
    reloaded = load_causal_lm(str(tmp_path / "pruned"))
    inputs = {k: v for k, v in lm_batch(1).items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reloaded(**inputs).logits)
    with pytest.raises(ConfigError, match="llama.cpp cannot run: GGUF export needs uniform widths"):
        check_exportable(str(tmp_path / "pruned"))
