"""Teacher-to-student layer maps. Hidden-state indices count the embedding output as 0 (as in
`output_hidden_states`); attention indices are 0-based transformer layers."""
from __future__ import annotations

from dataclasses import dataclass

from distill.core.config import LayerMapConfig
from distill.core.errors import ConfigError

MAP_KINDS = ("uniform", "last", "explicit")


@dataclass(frozen=True)
class LayerMap:
    hidden: list[tuple[int, int]]
    """(student hidden-state index, teacher hidden-state index), embeddings (0, 0) first."""

    @property
    def attention(self) -> list[tuple[int, int]]:
        return [(s - 1, t - 1) for s, t in self.hidden if s > 0]

    def partner(self, student_index: int) -> int:
        """The teacher hidden-state index matched to a student hidden-state index."""
        return dict(self.hidden)[student_index]


def check_layer_map_config(cfg: LayerMapConfig) -> None:
    """Config-only checks; the layers are checked against both models when the map is built."""
    if cfg.kind not in MAP_KINDS:
        raise ConfigError(f"layer_map.kind must be one of {MAP_KINDS}, got '{cfg.kind}'")
    if cfg.kind != "explicit" and cfg.layers is not None:
        raise ConfigError(f"layer_map.layers is only used with kind 'explicit' (kind is '{cfg.kind}')")


def build_layer_map(cfg: LayerMapConfig, student_layers: int, teacher_layers: int) -> LayerMap:
    check_layer_map_config(cfg)
    if cfg.kind == "uniform":
        targets = [round(j * teacher_layers / student_layers) for j in range(1, student_layers + 1)]
    elif cfg.kind == "last":
        if student_layers > teacher_layers:
            raise ConfigError(f"layer_map 'last': student has {student_layers} layers, teacher only {teacher_layers}")
        targets = [teacher_layers - student_layers + j for j in range(1, student_layers + 1)]
    else:
        targets = _explicit_targets(cfg.layers, student_layers, teacher_layers)
    return LayerMap(hidden=[(0, 0)] + [(j, t) for j, t in enumerate(targets, start=1)])


def _explicit_targets(layers: list[int] | None, student_layers: int, teacher_layers: int) -> list[int]:
    if layers is None or len(layers) != student_layers:
        got = "none" if layers is None else len(layers)
        raise ConfigError(f"layer_map.layers must list one teacher layer per student layer ({student_layers}), got {got}")
    bad = [t for t in layers if not 0 <= t < teacher_layers]
    if bad:
        raise ConfigError(f"layer_map.layers {bad} out of range: teacher layers are numbered 0..{teacher_layers - 1}")
    return [t + 1 for t in layers]
