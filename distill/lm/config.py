"""The configs of the causal-LM jobs: distillation on unlabelled text, and the teacher cache it may read."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from distill.core.config import CorpusConfig, LayerMapConfig, LossConfig, StageConfig, StudentConfig, TrainConfig


@dataclass
class EndpointConfig:
    """A served teacher: an OpenAI-compatible completions endpoint that echoes the prompt's top log-probabilities
    (`echo` with `logprobs`), such as llama-cpp-python's server (`distill.lm.served`)."""
    url: str = ""
    """The API's base URL, up to and including `/v1`, e.g. `http://127.0.0.1:8080/v1`."""
    model: Optional[str] = None
    """The served model's name, sent with each request and checked against `GET /models`; None: the server's own."""
    api_key_env: Optional[str] = "DISTILL_TEACHER_API_KEY"
    """The environment variable holding the endpoint's token, sent as a bearer token (never logged or written);
    unset or empty: no token."""
    timeout: float = 120.0
    """Seconds to wait for one answer."""
    retries: int = 4
    """Further attempts after a failed request (connection errors, HTTP 429 and 5xx), waiting backoff, 2 x backoff,
    4 x backoff, ... seconds between them."""
    backoff: float = 1.0


@dataclass
class CacheConfig:
    """Run a causal-LM teacher once over a corpus and keep its top-k log-probabilities at every token
    (`distill.lm.cache`), for distillation that never loads the teacher."""
    teacher: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """The causal-LM teacher (a path, `offline:NAME` or a Hub id); it runs on the GPU when there is one."""
    output_dir: str = "runs/teacher-cache"
    """The cache folder, written as `<output_dir>.tmp` and renamed into place when complete."""
    data: CorpusConfig = field(default_factory=CorpusConfig)
    """The corpus, tokenized with the teacher's tokenizer; a run that reads the cache must use the same."""
    k: int = 32
    """Log-probabilities kept per token: the k most likely next tokens."""
    samples: int = 32
    """Tokens also drawn (with replacement) at every position from the teacher's distribution outside its top k,
    each kept with weight (the mass outside the top k) / samples. With them a row is an unbiased estimate of the
    whole distribution, so the forward-KL gradient through it is unbiased; the top k alone leaves the shape of the
    tail out (what that costs is measured in docs/results.md). 0: the top k only."""
    sample_seed: int = 0
    """Seed of the draws (per shard, so that a resumed build draws what an uninterrupted one would)."""
    temperature: float = 1.0
    """The teacher's logits are divided by it before the log-softmax; a loss must use the same."""
    batch_size: int = 8
    """Examples per teacher forward pass (batched by similar length within a shard)."""
    shard_examples: int = 1024
    """Examples per shard file: the unit of resume after a kill."""
    endpoint: Optional[EndpointConfig] = None
    """Read the teacher's log-probabilities from a server instead of running `teacher` here; `teacher` still names
    the tokenizer (which the endpoint must share: checked before the build) and the config. Needs `samples: 0` and
    `temperature: 1.0`."""


@dataclass
class LMEvalConfig:
    """What an LM distillation run measures beyond the held-out perplexity."""
    prompts: list[str] = field(default_factory=lambda: [
        "This movie was", "I watched this film because", "The worst part of the story", "The acting in this film"])
    """Fixed prompts, each completed greedily by the final student (generations.jsonl)."""
    max_new_tokens: int = 32
    """The most tokens generated after each prompt."""
    teacher_nll_prompts: int = 50
    """How many test prompts the final student completes greedily (up to `max_new_tokens`): with prompt/completion
    or chat data the examples' prompts, with plain text each text's first `prompt_tokens` tokens. metrics.json gets
    the share of completions that loop (`test_loop_share`, `distill.lm.metrics.loops`), their distinct-2 and mean
    length, and the teacher's mean negative log-likelihood per completion token (`test_teacher_nll`; lower: the
    student writes what the teacher would); completions.jsonl the completions. The teacher is loaded for it if the
    run did not load it (a cached run). Not measured with `student_tokenizer` (the teacher cannot read the student's
    tokens). 0: not measured."""
    prompt_tokens: int = 16
    """With plain text: the tokens of each test text's opening that form its prompt (fewer for a shorter text, so
    that at least one token of it is left to continue)."""
    draft_prompts: int = 16
    """How many of those test prompts also measure the final student as the teacher's draft for speculative decoding
    (`distill.lm.acceptance`, on the teacher's greedy continuations of up to `max_new_tokens`): metrics.json's
    `draft_acceptance` holds the share of the teacher's tokens the student would propose, the sampled acceptance
    rate alpha and, per k in `draft_k`, the tokens each teacher pass yields. Not measured with `student_tokenizer`
    (a draft must propose the teacher's own token ids). 0: not measured."""
    draft_k: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """Draft tokens proposed per teacher pass, each at least 1."""


@dataclass
class OnPolicyConfig:
    """On-policy distillation (`distill.lm.on_policy`): batches in which the student writes the completions."""
    lmbda: float = 0.0
    """The share of training batches whose completions the student samples from the batch's prompts (GKD's
    lambda); the teacher scores every sampled token. 0: every batch is the data's (off-policy); 1: all on-policy."""
    temperature: float = 1.0
    """The student's sampling temperature (0: greedy)."""
    top_p: float = 1.0
    """Nucleus sampling of the student's tokens; 1 draws from the whole distribution."""
    max_new_tokens: int = 64
    """The most tokens the student writes per prompt."""
    prompt_tokens: int = 16
    """With plain text: the tokens of each training text's opening that form the prompt the student continues
    (fewer for a shorter text, so that one token of it is left to continue); the data's own prompts otherwise."""


@dataclass
class QADConfig:
    """Quantization-aware distillation: the student trains with its weights fake-quantized on a serving format's
    grid (straight-through), so that the format's ordinary export of the saved weights is the model it trained."""
    format: str = "gguf"
    """The serving format whose grid the weights train on; `gguf`: llama.cpp's own quantizer, each tensor in the type
    llama.cpp gives it in a file of `type` (`quant.qad.gguf`)."""
    type: str = "q4_k_m"
    """The format's type, as its export names it (GGUF: `q4_k_m`, `q3_k_m`, `q2_k`, `q4_0`, `q8_0`, ...)."""


@dataclass
class LMDistillConfig:
    """Distil a causal LM into a smaller one on unlabelled text, token by token (`distill.lm.job`)."""
    teacher: str = "offline:SmolLM2-135M-Instruct"
    """The causal-LM teacher (a path, `offline:NAME` or a Hub id); its tokenizer tokenizes `data`."""
    output_dir: str = "runs/student-lm"
    """The run folder: config.yaml, metrics.jsonl, checkpoints while it runs, then the student in `model/`,
    generations.jsonl and metrics.json."""
    seed: int = 0
    """Random seed of the run: weight initialisation, dropout and the order of training batches."""
    data: CorpusConfig = field(default_factory=CorpusConfig)
    """The corpus, tokenized with the teacher's tokenizer; its last `validation_examples + test_examples` texts are
    held out (validation, then test), the rest are trained on."""
    validation_examples: int = 50
    """Held-out texts before the test slice: the validation perplexity that `train.select_best` uses."""
    test_examples: int = 200
    """The last texts of the corpus: the reported test perplexity."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """As for `DistillConfig`, with causal LMs: by default every other teacher layer, ending at the top one."""
    student_tokenizer: Optional[str] = None
    """A tokenizer other than the teacher's (a path, `offline:NAME` or a Hub id) that the student reads the text
    through: a `fresh` student gets its vocabulary. Each text is also tokenized by the teacher, the two aligned by
    character offsets, and the student learns by the cross-tokenizer losses (with `next_token_ce`): `aligned_kl` /
    `uld` from the live teacher, `aligned_topk_kl` from a `cache` of the teacher's tokenization; plain text only.
    None: the teacher's tokenizer."""
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig(losses=[
        LossConfig(name="forward_kl"), LossConfig(name="next_token_ce")])])
    """Causal token losses (`forward_kl`, `reverse_kl`, `jsd`, `total_variation`, `topk_kl` (needs `cache`),
    `next_token_ce`), cross-tokenizer losses (`aligned_kl`, `uld`, `aligned_topk_kl` (needs `cache`); with
    `student_tokenizer`), and hidden-state losses over `layer_map` (`hidden_mse`, `hidden_cosine`; they need the
    running teacher)."""
    layer_map: LayerMapConfig = field(default_factory=LayerMapConfig)
    """Which teacher layer's hidden state each student layer matches, for `hidden_mse` / `hidden_cosine`."""
    cache: Optional[str] = None
    """A teacher cache folder (recipes/build_teacher_cache.py over the same `data`) that `topk_kl` (or, with
    `student_tokenizer`, `aligned_topk_kl`) reads. It must
    match this run's tokenizer, corpus token ids, k and temperature, and the teacher's config; the teacher's weights
    are compared too when the run loads the teacher anyway (a student copied from it, or a loss that runs it)."""
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    """On-policy batches: the student's own completions of the data's prompts, or of plain texts' openings (needs a
    token loss that runs the teacher; plain text is not packed then)."""
    eval: LMEvalConfig = field(default_factory=LMEvalConfig)
    """What the run measures beyond perplexity: greedy completions of fixed prompts, and of test prompts (the share
    that loop, their distinct-2 and length, the teacher's NLL of them)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop's settings."""
    qad: Optional[QADConfig] = None
    """Quantization-aware distillation: the student (e.g. the teacher itself, `student.model` = the teacher, or a
    pruned model) trains fake-quantized on a format's grid; `model/` holds its latent weights, which the format's
    export (GGUF: export_gguf with the same type, without calibration) puts on the trained grid. The reported
    perplexities are the fake-quantized student's. None: plain training."""
