"""How far a quantized model's next-token distributions are from its unquantized model's on the same token ids, the
figures of llama.cpp's `perplexity --kl-divergence`: the mean and 99th percentile over positions of
KL(unquantized || quantized), and the share of positions whose most likely next token is the same."""
from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def token_divergences(reference: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position (rows of the two (positions, vocabulary) logit arrays): KL(reference || model), and whether their
    top-1 tokens agree."""
    p, q = log_softmax(reference), log_softmax(logits)
    return (np.exp(p) * (p - q)).sum(-1), p.argmax(-1) == q.argmax(-1)


def divergence_summary(kls: list[np.ndarray], same: list[np.ndarray]) -> dict[str, float]:
    kl, agree = np.concatenate(kls), np.concatenate(same)
    return {"kld_mean": float(kl.mean()), "kld_p99": float(np.percentile(kl, 99)), "same_top1": float(agree.mean())}
