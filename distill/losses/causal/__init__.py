"""Token-level losses for causal LMs (forward KL, reverse KL, generalized JSD, KL to a cached top-k, next-token CE):
`divergences` (the per-row values), `fused` (the chunked pass that runs a stage's token losses together),
`registered` (the losses by name), and `cross_tokenizer` (`aligned_kl`, `uld`: a teacher with another tokenizer)."""
from distill.losses.causal import cross_tokenizer, registered  # noqa: F401  (registers the token losses)
