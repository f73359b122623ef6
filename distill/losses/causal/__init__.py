"""Token-level losses for causal LMs (forward KL, reverse KL, generalized JSD, KL to a cached top-k, next-token CE):
`divergences` (the per-row values), `fused` (the chunked pass that runs a stage's token losses together) and
`registered` (the losses by name)."""
from distill.losses.causal import registered  # noqa: F401  (registers the token losses)
