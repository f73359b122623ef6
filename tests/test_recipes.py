"""Every recipe YAML in recipes/ parses into its script's config class, and its stages name known losses."""
from pathlib import Path

import pytest

from distill.config import CacheConfig, DistillConfig, FinetuneConfig, LMDistillConfig, parse_args
from distill.lm import check_lm_config
from distill.pipeline import PipelineConfig
from distill.run import check_stages
from prune.config import PruneConfig
from quant.config import QatConfig, QuantConfig

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
CONFIG_OF_PREFIX = {"compress": PipelineConfig, "teacher": FinetuneConfig, "distill_": DistillConfig, "prune_": PruneConfig,
                    "quantize_": QuantConfig, "qlora_": QatConfig, "cache_": CacheConfig, "distill_lm": LMDistillConfig}


def config_class(recipe: Path) -> type:
    matches = [prefix for prefix in CONFIG_OF_PREFIX if recipe.stem.startswith(prefix)]
    assert matches, f"{recipe.name}: no config class for this recipe name"
    return CONFIG_OF_PREFIX[max(matches, key=len)]


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_recipe_parses_and_names_known_losses(recipe):
    cfg = parse_args(config_class(recipe), ["--config", str(recipe)])
    if isinstance(cfg, FinetuneConfig):
        check_stages([cfg.stage])
    elif isinstance(cfg, DistillConfig):
        check_stages(cfg.stages, peers=len(cfg.mutual.peers))
    elif isinstance(cfg, LMDistillConfig):
        check_lm_config(cfg)
