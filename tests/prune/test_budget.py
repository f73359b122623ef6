"""A parameter budget as the pruning target: unit costs, the round plan, and a run that lands on the budget."""
import pytest

from distill.core.errors import ConfigError
from distill.core.evaluate import count_parameters
from prune.budget import budget_plan, unit_costs
from prune.config import PruneConfig, UnitPruneConfig
from prune.ffn import prune_ffn
from prune.heads import prune_heads
from prune.run import check_prune_config, prune
from tests.helpers.pruning import prune_cfg, tiny_encoder, tiny_llama


@pytest.mark.parametrize("make", [tiny_encoder, tiny_llama])
def test_unit_costs_equal_what_pruning_one_unit_removes(make):
    model = make()
    head_cost, neuron_cost = unit_costs(model)
    before = count_parameters(model)
    prune_heads(model, {0: [2, 3]})  # one key/value group of the Llama, two heads of the encoder
    per_group = 2 if model.config.model_type == "bert" else 1
    assert before - count_parameters(model) == per_group * head_cost
    before = count_parameters(model)
    prune_ffn(model, {1: list(range(1, model.config.intermediate_size))})
    assert before - count_parameters(model) == neuron_cost


def test_plan_removes_fractions_then_lands_just_under_the_budget():
    model = tiny_encoder()  # 4 layers x 4 heads, 4 x 64 neurons
    params = count_parameters(model)
    head_cost, neuron_cost = unit_costs(model)
    budget = params - 5 * head_cost - 100 * neuron_cost
    plan = budget_plan(model, params, budget, 0.25, 0.25, max_rounds=5)
    assert plan[0] == (4, 64)  # a quarter of 16 heads and of 256 neurons
    removed = sum(h * head_cost + n * neuron_cost for h, n in plan)
    assert budget - (head_cost + neuron_cost) < params - removed <= budget
    with pytest.raises(ConfigError, match="needs more than rounds=1 rounds"):
        budget_plan(model, params, budget - 4 * head_cost, 0.25, 0.25, max_rounds=1)
    with pytest.raises(ConfigError, match="out of reach"):
        budget_plan(model, params, params - 13 * head_cost, 0.5, 0.0, max_rounds=9)


def test_budget_run_ends_at_most_at_the_budget(trained_teacher, sentiment_csv, tmp_path):
    teacher = trained_teacher.run_dir / "model"
    params = trained_teacher.metrics["parameters"]
    budget = params - 12_000
    cfg = prune_cfg(sentiment_csv, teacher, tmp_path / "budget", rounds=4, target_parameters=budget,
                    heads=UnitPruneConfig(fraction=0.25), ffn=UnitPruneConfig(fraction=0.25))
    result = prune(cfg)
    assert budget - sum(unit_costs(result.model)) < result.metrics["parameters"] <= budget
    assert (tmp_path / "budget" / "round-1" / "model").is_dir()


@pytest.mark.parametrize("overrides, message", [
    (dict(heads=UnitPruneConfig(count=4)), "set at least one of them and no count"),
    (dict(target_parameters=0), "target_parameters must be positive"),
])
def test_bad_budget_configs_are_named(overrides, message):
    values = dict(target_parameters=1000, heads=UnitPruneConfig(fraction=0.5))
    values.update(overrides)
    with pytest.raises(ConfigError, match=message):
        check_prune_config(PruneConfig(**values))
