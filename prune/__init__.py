"""Pruning (structured heads, FFN neurons and layers; unstructured and N:M sparsity; low-rank factorization)
with importance criteria, iterative prune + distil-recover rounds, and checkpoints that reload."""
