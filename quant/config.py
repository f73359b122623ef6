"""Typed configuration of a quantization run (which model, which variants, the bitsandbytes settings, which
modules stay in full precision, and how accuracy, memory and latency are measured) and of a quantization-aware
distillation run (a quantized base with LoRA adapters, distilled from the full-precision teacher). Loaded like every
other config: YAML plus `key.sub=value` overrides."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from distill.core.config import (
    CalibrationConfig,
    CorpusConfig,
    DataConfig,
    LayerMapConfig,
    LossConfig,
    StageConfig,
    TrainConfig,
)
from distill.core.gate import GateRule
from quant.measure.lm_eval import DEFAULT_TASKS


@dataclass
class BnbConfig:
    """bitsandbytes settings, passed to transformers' `BitsAndBytesConfig`."""
    int8_threshold: float = 6.0
    """LLM.int8 outlier threshold: input features with a magnitude above it are multiplied in 16-bit
    (`llm_int8_threshold`); 0 disables the decomposition."""
    double_quant: bool = True
    """4-bit: quantize the per-block scales too (`bnb_4bit_use_double_quant`), saving about 0.4 bits per weight."""
    compute_dtype: str = "float32"
    """4-bit: dtype of the matrix multiplication, `float32`, `bfloat16` or `float16` (`bnb_4bit_compute_dtype`)."""


@dataclass
class WeightSchemeConfig:
    """Settings of the compressed-tensors variants (`rtn_w4a16`, `gptq_w4a16`, `w8a8_int8`), made by llm-compressor."""
    group_size: int = 64
    """4-bit variants: consecutive weights of a row that share one scale. It must divide the input width of every
    quantized Linear (refused before work otherwise): 64 divides SmolLM2's 576, which 128, the usual choice for wider
    models, does not."""
    dtype: str = "bf16"
    """The precision of everything around the quantized weights (embeddings, norms, LM head, scales) and of the
    activations, as the serving engine runs the folder: `bf16` or `fp16` (the A16 of W4A16), or `fp32` (the
    unquantized tensors then take twice the disk)."""


@dataclass
class LatencyConfig:
    """Latency of one forward pass on a fixed batch of the evaluation texts, padded to `max_length`."""
    batch_size: int = 32
    """Examples in the timed batch: the split's first texts, repeated when it has fewer."""
    max_length: int = 64
    """Tokens each example of the timed batch is padded or truncated to."""
    warmup: int = 3
    """Untimed forward passes before each round's timed ones, per model."""
    repeats: int = 10
    """Timed forward passes per round; a round's number is their median."""
    rounds: int = 3
    """Rounds alternating between the variants; the reported number is the median of the rounds."""
    threads: Optional[int] = None
    """torch CPU threads while measuring; None leaves torch's choice."""


@dataclass
class QuantConfig:
    """Quantize a saved model into each variant, save every variant, reload it, and compare them on one table."""
    model: str = "runs/student/model"
    """The saved full-precision sequence classifier to quantize (a path, `offline:NAME` or a Hub id)."""
    output_dir: str = "runs/student-quant"
    """Each variant is saved to `<output_dir>/<variant>/`, beside config.yaml, metrics.json and report.md."""
    data: DataConfig = field(default_factory=DataConfig)
    """The classification task whose `split` every variant is measured on."""
    split: str = "test"
    """The split whose accuracy the report shows: `validation` or `test`."""
    eval_batch_size: int = 128
    """Examples per batch when measuring accuracy."""
    variants: list[str] = field(default_factory=lambda: ["fp32", "bf16", "dynamic_int8", "bnb_int8", "bnb_nf4"])
    """Any of `quant.schemes.variants.VARIANTS`: fp32, bf16, fp16, dynamic_int8, bnb_int8, bnb_nf4, bnb_fp4."""
    skip_modules: Optional[list[str]] = None
    """Modules kept in full precision by the bitsandbytes and dynamic-int8 variants, matched as transformers
    matches `llm_int8_skip_modules` (a path prefix, a regex, or a name suffix). None: the task heads, pooler and
    LM head of the architecture (`distill.core.arch.Arch.task_heads`); [] quantizes every Linear."""
    bnb: BnbConfig = field(default_factory=BnbConfig)
    """Settings of the bitsandbytes variants."""
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    """How latency is measured."""


@dataclass
class AdapterConfig:
    """LoRA adapters on the quantized Linears (peft's `LoraConfig`)."""
    r: int = 8
    """The adapters' rank: the inner width of each adapter's two low-rank matrices."""
    alpha: float = 16.0
    """Scale of the adapter's update: it is multiplied by alpha / r."""
    dropout: float = 0.05
    """Dropout probability on each adapter's input while training, in [0, 1)."""
    target_modules: Optional[list[str]] = None
    """Modules that get an adapter, matched as peft matches `target_modules` (a module path or a dotted suffix of
    it). Each must be a Linear that the base quantizes. None: every Linear inside the transformer layers
    (`distill.core.arch`: query, key, value and attention output; FFN in and out)."""


def default_qat_stage() -> StageConfig:
    return StageConfig(name="qlora", epochs=1.0, learning_rate=2e-4, losses=[
        LossConfig(name="kl", temperature=2.0), LossConfig(name="ce", weight=0.5), LossConfig(name="hidden_mse")])


@dataclass
class QatConfig:
    """Quantization-aware distillation: the student is a 4-bit or 8-bit base with LoRA adapters (its task heads
    stay in full precision and train whole), distilled from the full-precision teacher; the adapters are saved on
    their own and, with `merge`, merged into a full-precision copy of the base."""
    teacher: str = "runs/teacher/model"
    """The full-precision teacher classifier (a path, `offline:NAME` or a Hub id); its tokenizer tokenizes `data`."""
    student: Optional[str] = None
    """The model that is quantized and adapted; None: the teacher itself (quantize it, then recover what the
    quantization lost)."""
    output_dir: str = "runs/qlora"
    """The run folder: config.yaml, metrics.jsonl, checkpoints while it runs, then `adapter/`, `model/` (with
    `merge`) and metrics.json."""
    seed: int = 0
    """Random seed of the run: weight initialisation, dropout and the order of training batches."""
    data: DataConfig = field(default_factory=DataConfig)
    """The classification task."""
    bits: int = 4
    """4 (bitsandbytes NF4 or FP4) or 8 (LLM.int8)."""
    quant_type: str = "nf4"
    """4-bit data type: `nf4` or `fp4` (ignored for 8 bits)."""
    bnb: BnbConfig = field(default_factory=BnbConfig)
    """bitsandbytes settings of the quantized base."""
    lora: AdapterConfig = field(default_factory=AdapterConfig)
    """The LoRA adapters."""
    layer_map: LayerMapConfig = field(default_factory=LayerMapConfig)
    """Hidden-state losses: student layer j <- teacher layer; `uniform` is the identity for equal depths."""
    stages: list[StageConfig] = field(default_factory=lambda: [default_qat_stage()])
    """The training stages, run in order, each with its own losses, epochs and learning rate."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop's settings."""
    base_dropout: bool = False
    """Keep the base model's own dropout (hidden states, attention, classifier) while training. Off by default:
    the adapters learn to undo the quantization error, and dropout noise at the usual 0.1 swamps it (on the tiny
    test model, training with it left the hidden states further from the teacher's than post-training quantization
    had). LoRA's own dropout is `lora.dropout`."""
    merge: bool = True
    """Also save the adapters merged into a full-precision copy of the base (`model/`), and measure that copy
    re-quantized as the base was."""
    merge_into: str = "dequantized"
    """`dequantized`: the base's quantized weights in fp32, so the merged model computes what the trained one
    did; `original`: the fp32 weights the base was quantized from (the usual QLoRA merge)."""


@dataclass
class ModelCardConfig:
    """The model card's metadata, which the report stages write."""
    base_model: Optional[str] = None
    """The card's `base_model` (a Hub id); None: the model the pipeline compressed, when it names a Hub model (a
    classifier report's first stage's input model, a causal-LM report's teacher)."""
    datasets: Optional[list[str]] = None
    """The card's `datasets` (Hub ids); None: from `data.source` when it names a Hub dataset."""
    license: Optional[str] = None
    """The card's `license` (a Hub license id, e.g. `apache-2.0`); None: the card names none."""
    tags: list[str] = field(default_factory=list)
    """Card tags besides those of the stages that ran (distillation, pruning, quantization)."""
    repo_id: Optional[str] = None
    """The Hub id that the card's loading code names (the push stage's `repo_id`); None: a placeholder."""


@dataclass
class ReportConfig(ModelCardConfig):
    """The compression report of a pipeline: every model the earlier stages saved, measured side by side on one split
    and one latency batch; then the served model (`model`) is copied with its model card and the report."""
    model: str = ""
    """The model to serve; in a pipeline, the previous stage's."""
    output_dir: str = "runs/report"
    """The stage's folder; the served model, its model card (README.md) and the report go to `model/` in it."""
    data: DataConfig = field(default_factory=DataConfig)
    """The classification task whose `split` every model is measured on."""
    split: str = "test"
    """The split whose accuracy the report shows: `validation` or `test`."""
    eval_batch_size: int = 128
    """Examples per batch when measuring accuracy."""
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    """How latency is measured."""
    gate: list[GateRule] = field(default_factory=list)
    """Thresholds on the measured figures (`distill.core.gate`), e.g. `"accuracy >= 0.98 * teacher"`: a failing
    one stops the pipeline before `push`; the report and the card record each outcome. Empty: no gate."""


DEFAULT_PROMPTS = ["This movie was", "I watched this film because", "The worst part of the story",
                   "The acting in this film"]


@dataclass
class GgufConfig:
    """Export a causal LM to GGUF for llama.cpp (and Ollama, LM Studio) with llama.cpp's own converter and quantizer,
    then check each file in llama.cpp: greedy continuations against the transformers model, perplexity."""
    model: str = "runs/student-lm/model"
    """The causal LM to export (a saved folder of the stock architecture)."""
    output_dir: str = "runs/gguf"
    """The run folder: config.yaml, one `model-<type>.gguf` per type, and metrics.json."""
    types: list[str] = field(default_factory=lambda: ["f16", "q8_0", "q4_k_m"])
    """GGUF types: `f32`, `f16`, `bf16`, `q8_0` (written by the converter) or any type llama.cpp's quantizer knows
    (`q4_0`, `q4_k_m`, `q5_k_m`, `q6_k`, ...: made from the F16 file)."""
    data: CorpusConfig = field(default_factory=CorpusConfig)
    """The corpus, split as the causal-LM distillation job splits it: perplexity is measured on its test slice."""
    validation_examples: int = 50
    """Held-out texts before the test slice (as in the distillation job, so the slices are the same)."""
    test_examples: int = 200
    """The last texts of the corpus: the test slice."""
    eval_examples: Optional[int] = 50
    """Test texts whose perplexity is measured in llama.cpp and in transformers (the first ones); None: all."""
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    """Fixed prompts each file continues greedily, compared token by token with the transformers model."""
    max_new_tokens: int = 32
    """Tokens of each greedy continuation."""
    threads: Optional[int] = None
    """llama.cpp threads; None: as many as the CPU cores torch uses."""
    calibration: Optional[CalibrationConfig] = None
    """With this section, an importance matrix (the mean squared input of each weight column over these first
    training texts, what `llama-imatrix` computes) weighs the rounding of every type the quantizer makes (k- and
    i-quants); None: quantized without one."""


@dataclass
class OnnxExportConfig:
    """Export a sequence classifier (an encoder: BERT, RoBERTa, XLM-R, ELECTRA; pruned, vocabulary-pruned and int8
    embedding checkpoints included) to ONNX for ONNX Runtime, with a dynamic-int8 copy, then check both files against
    the PyTorch model on one split."""
    model: str = "runs/student/model"
    """The saved full-precision classifier (a path, `offline:NAME` or a Hub id)."""
    output_dir: str = "runs/student-onnx"
    """The run folder: config.yaml, metrics.json and `model/` (model.onnx, model-int8.onnx, config.json, the tokenizer
    files)."""
    opset: int = 17
    """ONNX opset of the graph: 14 (the first that PyTorch's scaled-dot-product attention exports to) to 20 (the
    TorchScript exporter's last)."""
    int8: bool = True
    """Also write `model-int8.onnx`: ONNX Runtime's dynamic quantization (int8 weights with per-channel scales, the
    activations quantized per batch; the pooler and classifier stay in fp32)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The classification task whose `split` the parity check runs on (`data.max_eval_examples` caps it)."""
    split: str = "test"
    """The split of the parity check: `validation` or `test`."""
    eval_batch_size: int = 128
    """Examples per batch in the parity check (each batch padded to its longest example)."""
    tolerance: float = 1e-3
    """The largest |logit difference| between the fp32 file and the PyTorch model that passes the check; past it the
    export fails."""


@dataclass
class LMQuantConfig:
    """Quantize a causal LM into several variants, save and reload each, and measure it by perplexity, agreement of
    its greedy next token with the teacher's, weight memory and size on disk."""
    model: str = "runs/student-lm/model"
    """The saved causal LM to quantize."""
    teacher: Optional[str] = None
    """The model whose greedy next token each variant is compared with; None: `model` in fp32."""
    output_dir: str = "runs/student-lm-quant"
    """The run folder: config.yaml, a folder per variant, metrics.json and report.md."""
    variants: list[str] = field(default_factory=lambda: ["fp32", "bf16", "dynamic_int8", "bnb_int8", "bnb_nf4"])
    """The variants, as for classifiers: `fp32`, `bf16`, `fp16`, `dynamic_int8`, `bnb_int8`, `bnb_nf4`, `bnb_fp4`;
    and, saved as compressed-tensors (vLLM, SGLang): `rtn_w4a16` (int4 weights rounded to nearest), `gptq_w4a16`
    (int4 weights calibrated by GPTQ) and `w8a8_int8` (SmoothQuant, then GPTQ int8 weights and int8 activations)."""
    skip_modules: Optional[list[str]] = None
    """Modules kept in full precision; None: the LM head (the architecture's task heads)."""
    bnb: BnbConfig = field(default_factory=BnbConfig)
    """bitsandbytes settings for `bnb_*` variants."""
    scheme: WeightSchemeConfig = field(default_factory=WeightSchemeConfig)
    """Settings of the compressed-tensors variants."""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    """The calibration text of `gptq_w4a16` and `w8a8_int8`, as pruning and the importance matrix take
    it (the first training texts; `batch_size` is not used: each text runs alone). It must hold at least as many
    tokens as the widest quantized Linear has input features."""
    data: CorpusConfig = field(default_factory=CorpusConfig)
    """The corpus, split as the causal-LM distillation job splits it."""
    validation_examples: int = 50
    """Held-out texts before the test slice."""
    test_examples: int = 200
    """The last texts of the corpus: the test slice."""
    eval_examples: Optional[int] = 50
    """Test texts measured (the first ones); None: all."""
    eval_batch_size: int = 8
    """Texts per forward pass."""


@dataclass
class SpeedConfig:
    """Generation speed on the CPU at batch 1: prefill (one prompt) and decode (greedy new tokens after it)."""
    prompt_tokens: int = 512
    """Tokens of the prefill prompt (a test text, repeated to this length)."""
    new_tokens: int = 128
    """Tokens decoded after the prompt."""
    threads: Optional[int] = None
    """CPU threads for torch and llama.cpp; None: torch's choice."""
    repeats: int = 1
    """Timed runs per model; the median counts."""


@dataclass
class HarnessConfig:
    """lm-evaluation-harness tasks run on the teacher and every transformers model of the report
    (`quant.measure.lm_eval`), in process on the CPU."""
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    """lm-eval task names. Offline: the tasks shipped in quant/measure/lm_eval_tasks (Rotten Tomatoes sentiment as a
    zero-shot choice, and the last word of a review); with the Hub, any lm-eval task."""
    limit: Optional[int] = 30
    """Documents per task (the first ones); None: all. The default keeps the default pipeline within a few extra
    minutes on 2 cores, at the price of wide error bars."""
    batch_size: int = 8
    """Requests per forward pass."""


@dataclass
class BudgetConfig:
    """What the served model may cost: the report recommends the artifact with the lowest test perplexity within it,
    whichever stage made it (the teacher's own quantized files included)."""
    disk_mb: Optional[float] = None
    """The most megabytes on disk; None: no limit."""
    decode_tokens_per_s: Optional[float] = None
    """The least decode speed (tokens/s at batch 1 on the report's CPU); None: no limit."""


@dataclass
class CompletionConfig:
    """Greedy completions of the test texts' openings, by every model of the report: the share that loop, their
    distinct-2 and mean length (`distill.lm.metrics.generation_scores`)."""
    prompts: int = 50
    """The first test texts whose openings each model completes; 0: not measured."""
    prompt_tokens: int = 16
    """The tokens of each text's opening (fewer for a shorter text)."""
    max_new_tokens: int = 32
    """The most tokens written after each opening (fewer when the model writes its end-of-text token)."""
    draft_prompts: int = 16
    """The first of those openings (at most `prompts`) on which each model is also measured as the teacher's
    speculative-decoding draft (`distill.lm.acceptance`), against the teacher's greedy continuation of
    `max_new_tokens` tokens: `draft_alpha` (the sampled rule's acceptance rate) and `draft_tokens_per_pass` (greedy,
    at `draft_k` proposals per pass; the teacher's own row is the ceiling, about `draft_k` + 1). 0: not measured."""
    draft_k: int = 4
    """Draft tokens proposed per teacher pass for `draft_tokens_per_pass`."""


@dataclass
class LMReportConfig(ModelCardConfig):
    """The report of a causal-LM pipeline: the teacher and every model the earlier stages saved (GGUF files included),
    side by side; then the served model is copied with its model card and the report."""
    model: str = ""
    """The model to serve; in a pipeline, the previous stage's."""
    output_dir: str = "runs/report-lm"
    """The stage's folder; the served model, its card and the report go to `model/` in it."""
    teacher: str = "offline:SmolLM2-135M-Instruct"
    """The unpruned model: the first row, and the reference of next-token agreement."""
    data: CorpusConfig = field(default_factory=CorpusConfig)
    """The corpus, split as the causal-LM distillation job splits it."""
    validation_examples: int = 50
    """Held-out texts before the test slice."""
    test_examples: int = 200
    """The last texts of the corpus: the test slice."""
    eval_examples: Optional[int] = 50
    """Test texts measured (the first ones); None: all. The validation texts are the stages' to select on; the
    report measures none of them."""
    eval_batch_size: int = 8
    """Texts per forward pass."""
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    """How generation speed is measured."""
    budget: Optional[BudgetConfig] = None
    """With it, the report and the card name the best artifact within this budget; None: they show the Pareto fronts
    only."""
    completions: CompletionConfig = field(default_factory=CompletionConfig)
    """Generation quality beside perplexity: each model's greedy completions of the same test openings (GGUF files
    in llama.cpp)."""
    gate: list[GateRule] = field(default_factory=list)
    """Thresholds on the measured figures (`distill.core.gate`), e.g. `"test_perplexity <= 1.5 * teacher"`,
    `"kld_mean <= 0.05"`, `"test_loop_share <= 0.2"`: a failing one stops the pipeline before `push`; the report and
    the card record each outcome. Empty: no gate."""
    lm_eval: Optional[HarnessConfig] = field(default_factory=HarnessConfig)
    """lm-evaluation-harness tasks measured on each transformers model (a table in the report and the card); None:
    none."""
