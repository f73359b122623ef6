"""Registries behave alike: a name registered twice is an error, an unknown name is a ConfigError naming the closest
registered one (losses, importance criteria, stage kinds, quantization variants, jobs)."""
import pytest

import distill.losses  # noqa: F401  (registers the losses)
from distill.core.errors import ConfigError
from distill.core.jobs import load_jobs
from distill.core.loss_interface import LOSSES
from distill.core.registry import Registry
from distill.pipeline.plan import STAGE_KINDS
from prune.importance import CRITERIA
from quant.schemes.variants import VARIANTS


def test_a_name_registered_twice_is_an_error():
    colours = Registry("colour")
    colours.add("red", 1)
    with pytest.raises(ValueError, match="colour 'red' is already registered"):
        colours.add("red", 2)
    assert colours["red"] == 1


@pytest.mark.parametrize("registry, typo, expected", [
    (LOSSES, "hiden_mse", "unknown loss 'hiden_mse'; did you mean 'hidden_mse'?"),
    (CRITERIA, "taylr", "unknown importance criterion 'taylr'; did you mean 'taylor'?"),
    (STAGE_KINDS, "distil", "unknown stage kind 'distil'; did you mean 'distill'?"),
    (VARIANTS, "bnb_nf5", "unknown variant 'bnb_nf5'; did you mean 'bnb_nf4'?"),
    (load_jobs(), "finetun", "unknown job 'finetun'; did you mean 'finetune'?"),
])
def test_every_registry_names_the_closest_known_name(registry, typo, expected):
    with pytest.raises(ConfigError) as caught:
        registry.require(typo, "here: ")
    assert str(caught.value) == "here: " + expected


def test_a_name_with_nothing_close_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown importance criterion 'hessian'; known: activation, "
                                          r"activation_squared, fisher, magnitude, random, taylor"):
        CRITERIA.require("hessian")
