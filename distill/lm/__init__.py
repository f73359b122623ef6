"""Causal-LM jobs: token-level distillation (`job`), the teacher cache it may read (`cache`), the vocabulary checks
before comparing logits (`vocab`), and perplexity (`metrics`)."""
