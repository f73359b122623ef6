"""Quantization-aware distillation, QLoRA-style: the student is a bitsandbytes 4-bit (NF4 or FP4) or 8-bit base
with LoRA adapters (peft) on its quantized Linears, distilled from the full-precision teacher with `distill`'s
losses and training loop. The task heads and the pooler stay in full precision and train whole (peft's
`modules_to_save`); the quantized weights and the embeddings stay frozen.

Outputs in `output_dir`, beside `config.yaml`, `metrics.jsonl` and `metrics.json`:
- `adapter/`: the adapters and the trained heads (`PeftModel.save_pretrained`), the tokenizer, and
  `quantized_base.json` (the base and how it was quantized). `load_adapter` quantizes the base again (bitsandbytes'
  quantization is deterministic) and applies them.
- `model/` (with `merge`): the adapters merged into a full-precision copy of the base (`merge_adapter`), a plain
  transformers model.

`metrics.json` compares, on the test split, the fp32 base, the base after post-training quantization (`ptq`), the
trained quantized model (`qlora`), the merged model and the merged model quantized again as the base was: accuracy,
KL divergence from the teacher, and agreement with the teacher's predictions.

Checkpoints hold the whole model, the frozen quantized weights included;
`quant.schemes.bnb.accept_frozen_quantized_state` lets a resumed run load them back. peft's
`prepare_model_for_kbit_training` is not used: on the CPU the unquantized parameters are already fp32, the adapters are
leaves inside the layers so gradients reach them without input-gradient hooks, and the gradient checkpointing it
switches on trades compute for memory that these encoders do not need."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Callable

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import distill.losses  # noqa: F401  (registers the losses a stage names)
from distill.core.arch import arch_of
from distill.core.errors import ConfigError, require_package
from distill.core.evaluate import disk_size_mb
from distill.core.io import save_model
from distill.core.jobs import Job, register_job
from distill.core.loss_interface import LossSetup, attention_implementation, check_stages
from distill.core.mapping import build_layer_map
from distill.core.models import check_same_vocabulary, load_classifier, load_tokenizer
from distill.core.run import OnStep, RunResult, Task, check_class_count, check_train, end_run, load_task, start_run
from distill.core.trainer import Trainer
from distill.losses.response import soft_kl
from quant.config import AdapterConfig, BnbConfig, QatConfig
from quant.quantize import check_classifier, quiet_int8_cast_warning
from quant.schemes.bnb import (
    accept_frozen_quantized_state,
    check_bnb_config,
    int8_row_scales,
    quantize_bnb,
    require_bitsandbytes,
)
from quant.schemes.loading import empty_model, load_config, skip_patterns

if TYPE_CHECKING:
    from peft import PeftModel

PURPOSE = "quantization-aware distillation"
PEFT_INSTALL = 'pip install "peft>=0.15"'
QUANT_TYPES = ("nf4", "fp4")
MERGE_TARGETS = ("dequantized", "original")
BASE_FILE = "quantized_base.json"


@dataclass
class QuantizedBase:
    """The model the adapters train on, as `quantized_base.json` records it."""
    model: str
    variant: str
    bnb: BnbConfig
    skip_modules: list[str]

    def load(self) -> PreTrainedModel:
        return quantize_bnb(self.model, self.variant, self.bnb, self.skip_modules)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def read(cls, adapter_dir: str | Path) -> QuantizedBase:
        values = json.loads(Path(adapter_dir, BASE_FILE).read_text())
        return cls(**{**values, "bnb": BnbConfig(**values["bnb"])})


@dataclass
class Reference:
    """The test split and the teacher's logits on it: every model of the run is measured against them."""
    loader: DataLoader
    accelerator: Accelerator
    labels: torch.Tensor
    teacher_logits: torch.Tensor

    def measure(self, model: nn.Module) -> tuple[dict, torch.Tensor]:
        """Scores and test logits of `model`, moved to the loader's device."""
        logits = logits_over(model.to(self.accelerator.device), self.loader, self.accelerator)[0]
        return scores(logits, self.labels, self.teacher_logits), logits

    def teacher_accuracy(self) -> float:
        return (self.teacher_logits.argmax(-1) == self.labels).float().mean().item()


def qat_distill(cfg: QatConfig, on_step: OnStep = None) -> RunResult:
    """Quantize the base, add adapters, distil them from the teacher, then save and measure the adapters (and the
    merged model)."""
    check_qat_config(cfg)
    base_name = cfg.student or cfg.teacher
    check_classifier(base_name, load_config(base_name))
    accelerator, run_dir = start_run(cfg)
    quiet_int8_cast_warning()
    task = load_task(cfg.data, cfg.teacher)
    attention = attention_implementation(cfg.stages)
    teacher = load_classifier(cfg.teacher, attn_implementation=attention)
    base = QuantizedBase(base_name, variant_of(cfg), cfg.bnb, skip_patterns(empty_model(base_name)))
    quantized = load_quantized_student(cfg, base, teacher, task)
    targets = lora_targets(quantized, cfg.lora.target_modules, cfg.bits)
    reference = teacher_reference(teacher, task.splits["test"], task.collate, cfg.train.eval_batch_size, accelerator)
    rows = {"fp32": reference.measure(load_classifier(cfg.student) if cfg.student else teacher)[0],
            "ptq": reference.measure(quantized)[0]}
    quantized.set_attn_implementation(attention)
    if not cfg.base_dropout:
        switch_off_dropout(quantized)
    model = add_adapters(quantized, cfg.lora, targets, base.skip_modules)
    layer_map = build_layer_map(cfg.layer_map, model.config.num_hidden_layers, teacher.config.num_hidden_layers)
    trainer = Trainer(accelerator, model, teacher, task.splits, task.collate, cfg.train, cfg.seed, run_dir, on_step)
    trainer.log({"trainable_parameters": trainable_parameters(model)})
    model = trainer.fit(cfg.stages, LossSetup(model.config, teacher.config, layer_map))
    model.get_base_model().set_attn_implementation("sdpa")
    metrics = save_and_measure(cfg, base, model, task, reference, rows, run_dir)
    end_run(accelerator, run_dir, metrics)
    return RunResult(model, metrics, run_dir)


def load_quantized_student(cfg: QatConfig, base: QuantizedBase, teacher: PreTrainedModel, task: Task
                           ) -> PreTrainedModel:
    """The quantized base, once it is known to fit the teacher and the data."""
    check_class_count(teacher.config.num_labels, task.labels, "teacher")
    if cfg.student:
        check_same_vocabulary(load_tokenizer(cfg.student), task.tokenizer)
    quantized = base.load()
    if quantized.config.num_labels != teacher.config.num_labels:
        raise ConfigError(f"student {base.model} predicts {quantized.config.num_labels} classes, the teacher "
                          f"{teacher.config.num_labels}")
    return quantized


def save_and_measure(cfg: QatConfig, base: QuantizedBase, model: PeftModel, task: Task, reference: Reference,
                     rows: dict, run_dir: Path) -> dict:
    """Save the adapters (and the merged model), reload and measure them: the run's metrics."""
    rows["qlora"], logits = reference.measure(model)
    adapter_dir = run_dir / "adapter"
    if reference.accelerator.is_main_process:
        save_model(model, task.tokenizer, adapter_dir, extra_files={BASE_FILE: base.to_json()})
    reference.accelerator.wait_for_everyone()
    extra = {"adapter_reload_equal": torch.equal(reference.measure(load_adapter(adapter_dir))[1], logits),
             "adapter_disk_mb": disk_size_mb(adapter_dir)}
    if cfg.merge:
        extra.update(merge_and_measure(base, adapter_dir, cfg.merge_into, run_dir / "model", task.tokenizer,
                                       reference, rows, logits))
    metrics = {"teacher": cfg.teacher, "base": base.model, "variant": base.variant,
               "test_examples": len(task.splits["test"]), "teacher_test_accuracy": reference.teacher_accuracy(),
               "trainable_parameters": trainable_parameters(model), "models": rows,
               "recovered": recovered_share(rows), **extra}
    return metrics


def check_qat_config(cfg: QatConfig) -> None:
    """Config-only checks, before any model is loaded."""
    if cfg.bits not in (4, 8):
        raise ConfigError(f"bits must be 4 or 8; got {cfg.bits}")
    if cfg.bits == 4 and cfg.quant_type not in QUANT_TYPES:
        raise ConfigError(f"quant_type must be one of {', '.join(QUANT_TYPES)}; got '{cfg.quant_type}'")
    if cfg.merge_into not in MERGE_TARGETS:
        raise ConfigError(f"merge_into must be one of {', '.join(MERGE_TARGETS)}; got '{cfg.merge_into}'")
    check_adapter_config(cfg.lora)
    check_bnb_config(cfg.bnb)
    check_stages(cfg.stages)
    check_train(cfg.train)
    require_bitsandbytes()
    require_peft()


def check_adapter_config(cfg: AdapterConfig) -> None:
    if cfg.r < 1:
        raise ConfigError(f"lora.r must be at least 1; got {cfg.r}")
    if cfg.alpha <= 0:
        raise ConfigError(f"lora.alpha must be positive; got {cfg.alpha}")
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"lora.dropout must be in [0, 1); got {cfg.dropout}")


def require_peft() -> ModuleType:
    return require_package("peft", "quantization-aware distillation needs", PEFT_INSTALL)


def variant_of(cfg: QatConfig) -> str:
    """The `quant.schemes.bnb` variant name of the configured quantization."""
    return "bnb_int8" if cfg.bits == 8 else f"bnb_{cfg.quant_type}"


def add_adapters(model: PreTrainedModel, cfg: AdapterConfig, targets: list[str], heads: list[str]) -> PeftModel:
    """LoRA adapters (`cfg`) on the modules that `targets` names (see `lora_targets`); the full-precision `heads`
    train whole; everything else is frozen."""
    peft = require_peft()
    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                             modules_to_save=list(heads),  # peft extends this list in place
                             task_type=peft.TaskType.SEQ_CLS)
    adapted = peft.get_peft_model(model, config)
    accept_frozen_quantized_state(adapted)
    return adapted


def lora_targets(model: PreTrainedModel, requested: list[str] | None, bits: int) -> list[str]:
    """`requested`, or the Linears inside each layer; every module an entry matches must be a Linear that
    bitsandbytes quantized, or a ConfigError names it."""
    arch = arch_of(model, PURPOSE)
    targets = list(requested) if requested is not None else [*arch.attention_inputs(), arch.attention_out,
                                                              *arch.ffn_in, arch.ffn_out]
    if not targets:
        raise ConfigError("lora.target_modules is empty: name at least one quantized Linear")
    peft = require_peft()
    quantized = quantized_linear_types()
    for entry in targets:
        matcher = peft.LoraConfig(target_modules=[entry])
        matched = {name: module for name, module in model.named_modules()
                   if name and peft.tuners.tuners_utils.check_target_module_exists(matcher, name)}
        if not matched:
            raise ConfigError(f"lora.target_modules entry '{entry}' matches no module of {type(model).__name__}")
        for name, module in matched.items():
            if not isinstance(module, quantized):
                raise ConfigError(f"lora.target_modules entry '{entry}' asks for {bits}-bit training of {name}, "
                                  f"{why_not_quantized(module)}")
    return targets


def quantized_linear_types() -> tuple[type, ...]:
    bnb = require_bitsandbytes()
    return bnb.nn.Linear4bit, bnb.nn.Linear8bitLt


def why_not_quantized(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return ("which stays in full precision: task heads and the pooler are not quantized (they train whole, "
                "without an adapter)")
    return f"a module of type {type(module).__name__}, which bitsandbytes cannot quantize (only Linears)"


def switch_off_dropout(model: nn.Module) -> None:
    """Zero the dropout of every `nn.Dropout` of `model`: all of an encoder's, attention included (decoders'
    attention dropout is a config value, 0 in the supported architectures)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_adapter(adapter_dir: str | Path) -> PeftModel:
    """The model `adapter_dir` holds: its base quantized again as `quantized_base.json` records, with the saved
    adapters and heads applied; in eval mode."""
    peft = require_peft()
    base = QuantizedBase.read(adapter_dir).load()
    return peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def merge_adapter(adapter_dir: str | Path, into: str = "dequantized") -> PreTrainedModel:
    """The adapters and heads of `adapter_dir` merged into a full-precision copy of the base: `dequantized` (the
    quantized weights in fp32, so the merged model computes what the trained one did) or `original` (the weights
    the base was quantized from). A plain transformers model, in eval mode."""
    if into not in MERGE_TARGETS:
        raise ConfigError(f"merge_into must be one of {', '.join(MERGE_TARGETS)}; got '{into}'")
    peft = require_peft()
    base = QuantizedBase.read(adapter_dir)
    model = load_classifier(base.model)
    if into == "dequantized":
        copy_dequantized_weights(base.load(), model)
    return peft.PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload().eval()


@torch.no_grad()
def copy_dequantized_weights(quantized: nn.Module, model: nn.Module) -> None:
    """Set the weight of each Linear of `model` that `quantized` holds in bitsandbytes form to its dequantized
    value."""
    bnb = require_bitsandbytes()
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            weight = bnb.functional.int8_vectorwise_dequant(module.weight.data, int8_row_scales(module))
        else:
            continue
        model.get_submodule(name).weight.copy_(weight)


def merge_and_measure(base: QuantizedBase, adapter_dir: Path, into: str, merged_dir: Path,
                      tokenizer: PreTrainedTokenizerBase, reference: Reference, rows: dict,
                      qlora_logits: torch.Tensor) -> dict:
    """Merge, save and reload the merged model, measure it and it quantized again as the base was (into `rows`);
    the reload check, the largest logit difference to the trained quantized model, and the size on disk."""
    merged = merge_adapter(adapter_dir, into)
    if reference.accelerator.is_main_process:
        save_model(merged, tokenizer, merged_dir)
    reference.accelerator.wait_for_everyone()
    rows["merged"], logits = reference.measure(merged)
    rows["merged_requantized"] = reference.measure(quantize_bnb(str(merged_dir), base.variant, base.bnb,
                                                                base.skip_modules))[0]
    return {"merged_reload_equal": torch.equal(reference.measure(load_classifier(str(merged_dir)))[1], logits),
            "merged_max_abs_logit_difference_to_qlora": (logits - qlora_logits).abs().max().item(),
            "merged_disk_mb": disk_size_mb(merged_dir)}


def teacher_reference(teacher: PreTrainedModel, test_split: Dataset, collate: Callable, batch_size: int,
                      accelerator: Accelerator) -> Reference:
    loader = accelerator.prepare(DataLoader(test_split, batch_size, collate_fn=collate))
    teacher_logits, labels = logits_over(teacher.to(accelerator.device), loader, accelerator)
    return Reference(loader, accelerator, labels, teacher_logits)


@torch.no_grad()
def logits_over(model: nn.Module, loader: DataLoader, accelerator: Accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels over the whole loader, gathered across processes, in fp32."""
    model.eval()
    logits, labels = [], []
    for batch in loader:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        batch_logits, batch_labels = accelerator.gather_for_metrics((model(**inputs).logits, batch["labels"]))
        logits.append(batch_logits.float())
        labels.append(batch_labels)
    return torch.cat(logits), torch.cat(labels)


def scores(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor) -> dict:
    predictions = logits.argmax(-1)
    return {"test_accuracy": (predictions == labels).float().mean().item(),
            "test_kl_to_teacher": soft_kl(logits, teacher_logits, temperature=1.0).item(),
            "test_agreement_with_teacher": (predictions == teacher_logits.argmax(-1)).float().mean().item()}


def recovered_share(rows: dict) -> float | None:
    """The share of the accuracy that post-training quantization lost and training won back (None: nothing was
    lost)."""
    lost = rows["fp32"]["test_accuracy"] - rows["ptq"]["test_accuracy"]
    return (rows["qlora"]["test_accuracy"] - rows["ptq"]["test_accuracy"]) / lost if lost > 0 else None


def qat_summary(cfg: QatConfig, result: RunResult) -> dict:
    outputs = {"adapter": f"{cfg.output_dir}/adapter", "merged": f"{cfg.output_dir}/model" if cfg.merge else None}
    return {**outputs, **result.metrics}


QLORA = register_job(Job("qlora", QatConfig, check_qat_config, qat_distill, qat_summary))
