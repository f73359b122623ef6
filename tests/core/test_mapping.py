import pytest

from distill.core.config import LayerMapConfig
from distill.core.errors import ConfigError
from distill.core.mapping import build_layer_map


def test_uniform_map_is_tinybert_every_kth_layer_with_embeddings():
    layer_map = build_layer_map(LayerMapConfig(kind="uniform"), student_layers=3, teacher_layers=6)
    assert layer_map.hidden == [(0, 0), (1, 2), (2, 4), (3, 6)]
    assert layer_map.attention == [(0, 1), (1, 3), (2, 5)]
    assert build_layer_map(LayerMapConfig(), 4, 12).hidden[1:] == [(1, 3), (2, 6), (3, 9), (4, 12)]


def test_last_map_uses_top_teacher_layers():
    assert build_layer_map(LayerMapConfig(kind="last"), 2, 6).hidden == [(0, 0), (1, 5), (2, 6)]
    with pytest.raises(ConfigError, match="student has 7 layers, teacher only 6"):
        build_layer_map(LayerMapConfig(kind="last"), 7, 6)


def test_explicit_map_is_zero_based_and_validated():
    layer_map = build_layer_map(LayerMapConfig(kind="explicit", layers=[0, 3, 5]), 3, 6)
    assert layer_map.hidden == [(0, 0), (1, 1), (2, 4), (3, 6)]
    with pytest.raises(ConfigError, match=r"\[6\] out of range.*0\.\.5"):
        build_layer_map(LayerMapConfig(kind="explicit", layers=[1, 3, 6]), 3, 6)
    with pytest.raises(ConfigError, match="one teacher layer per student layer \\(3\\), got 2"):
        build_layer_map(LayerMapConfig(kind="explicit", layers=[1, 3]), 3, 6)


def test_unknown_kind_and_misplaced_layers_are_errors():
    with pytest.raises(ConfigError, match="layer_map.kind"):
        build_layer_map(LayerMapConfig(kind="every_other"), 3, 6)
    with pytest.raises(ConfigError, match="only used with kind 'explicit'"):
        build_layer_map(LayerMapConfig(kind="uniform", layers=[1, 2, 3]), 3, 6)
