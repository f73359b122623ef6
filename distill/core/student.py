"""Build a student from the teacher (or from `student.model`): a subset of its layers (DistilBERT/TinyBERT init), a
fresh narrower config of its family with random weights, or the given pretrained model as it is."""
from __future__ import annotations

from typing import Callable, Optional

from transformers import PretrainedConfig, PreTrainedModel

from distill.core.arch import config_for_layers, layer_list_path, renumbered_paths
from distill.core.config import StudentConfig
from distill.core.errors import ConfigError
from distill.core.models import load_classifier

STUDENT_INITS = ("copy_layers", "fresh", "pretrained")


def check_student_config(cfg: StudentConfig) -> None:
    """Config-only checks; layer indices and sizes are checked against the teacher when the student is built."""
    if cfg.init not in STUDENT_INITS:
        raise ConfigError(f"student.init must be one of {', '.join(STUDENT_INITS)}; got '{cfg.init}'")
    if cfg.init == "pretrained" and not cfg.model:
        raise ConfigError("student.init 'pretrained' needs student.model")
    if cfg.init != "copy_layers" and cfg.layers is not None:
        raise ConfigError(f"student.layers is only used with init 'copy_layers' (init is '{cfg.init}')")
    widths = [size for size in SIZES[1:] if getattr(cfg, size) is not None]
    if cfg.init == "copy_layers" and widths:
        raise ConfigError(f"student.{widths[0]} is not used with init 'copy_layers', which keeps the teacher's "
                          "widths; use init 'fresh' for a narrower student")


def build_student(cfg: StudentConfig, teacher: Optional[PreTrainedModel],
                  load_model: Optional[Callable[[str], PreTrainedModel]] = None) -> PreTrainedModel:
    """The student, built from `cfg.model` when given, else from the teacher (then not None). `load_model` reads
    `cfg.model`; by default as a classifier with the teacher's labels."""
    check_student_config(cfg)
    if not cfg.model:
        base = teacher
    elif load_model is not None:
        base = load_model(cfg.model)
    else:
        base = load_classifier(cfg.model, num_labels=teacher.config.num_labels, id2label=teacher.config.id2label,
                               label2id=teacher.config.label2id)
    if cfg.init == "copy_layers":
        return copy_layers(base, student_layer_indices(cfg, base.config.num_hidden_layers))
    if cfg.init == "fresh":
        return fresh_student(cfg, base)
    check_sizes_match(cfg, base)
    return base


SIZES = ("num_layers", "hidden_size", "intermediate_size", "num_attention_heads")
CONFIG_KEYS = {"num_layers": "num_hidden_layers"}


def check_sizes_match(cfg: StudentConfig, model: PreTrainedModel) -> None:
    """With `pretrained`, sizes in the config describe the model loaded: refuse any it does not have."""
    for size in SIZES:
        given, actual = getattr(cfg, size), getattr(model.config, CONFIG_KEYS.get(size, size), None)
        if given is not None and given != actual:
            raise ConfigError(f"student.{size}={given}, but the pretrained student {cfg.model} has {actual}")


def student_layer_indices(cfg: StudentConfig, teacher_layers: int) -> list[int]:
    """Teacher layers to copy: explicit, or `num_layers` evenly spaced ending at the top layer."""
    if cfg.layers is not None:
        layers = list(cfg.layers)
        if cfg.num_layers is not None and cfg.num_layers != len(layers):
            raise ConfigError(f"student.num_layers={cfg.num_layers} disagrees with student.layers={layers}")
    else:
        n = cfg.num_layers or teacher_layers // 2
        if not 1 <= n <= teacher_layers:
            raise ConfigError(f"student.num_layers must be in 1..{teacher_layers}, got {n}")
        layers = evenly_spaced(n, teacher_layers)
    bad = [i for i in layers if not 0 <= i < teacher_layers]
    if bad or not layers:
        raise ConfigError(f"student.layers {bad or layers} out of range: teacher layers are 0..{teacher_layers - 1}")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"student.layers {layers} repeats a layer")
    return layers


def evenly_spaced(n: int, total: int) -> list[int]:
    """`n` of `total` layers evenly spaced, ending at the top one (the layers that the uniform layer map pairs with a
    student of `n` layers); some repeat when n > total."""
    return [max(0, round((j + 1) * total / n) - 1) for j in range(n)]


def copy_layers(teacher: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """A student whose layer i is a copy of teacher layer layers[i]; embeddings, pooler and head are copied too."""
    student = type(teacher)(checked(config_for_layers(teacher.config, layers)))
    state = renumbered_paths(teacher.state_dict(), layer_list_path(teacher), layers)
    student.load_state_dict({key: value.clone() for key, value in state.items()}, strict=True)
    return student


def fresh_student(cfg: StudentConfig, teacher: PreTrainedModel) -> PreTrainedModel:
    """Randomly initialised model of the teacher's family and vocabulary with smaller dimensions."""
    if cfg.layers is not None:
        raise ConfigError("student.layers is only used with init 'copy_layers'")
    for size in SIZES:
        if getattr(cfg, size) is not None and getattr(cfg, size) < 1:
            raise ConfigError(f"student.{size} must be positive, got {getattr(cfg, size)}")
    teacher_layers = teacher.config.num_hidden_layers
    # each layer's attention kind (sliding window or full) is that of the teacher layer it is mapped to
    config = config_for_layers(teacher.config, evenly_spaced(cfg.num_layers or teacher_layers, teacher_layers))
    if hasattr(config, "compression"):  # a compressed teacher's module shapes; a fresh student has stock ones
        del config.compression
    for size in SIZES[1:]:
        if getattr(cfg, size) is not None:
            setattr(config, size, getattr(cfg, size))
    if config.hidden_size % config.num_attention_heads:
        raise ConfigError(
            f"student hidden_size {config.hidden_size} is not divisible by num_attention_heads "
            f"{config.num_attention_heads}"
        )
    return type(teacher)(checked(config))


def checked(config: PretrainedConfig) -> PretrainedConfig:
    """`config`, refused now if its family's validation fails, rather than when the trained student is saved."""
    try:
        config.validate()
    except Exception as err:  # transformers raises its own validation errors
        raise ConfigError(f"the student's {config.model_type} config is invalid: {err.__cause__ or err}") from None
    return config
