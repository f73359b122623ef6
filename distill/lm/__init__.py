"""Causal-LM jobs: token-level distillation (`job`, its settings in `config`, its data and held-out slices in
`data`), the teacher cache it may read (`cache`), a teacher served behind an endpoint (`served`), teacher-written
data (`generate`), on-policy distillation (`on_policy`, with `sampling`), cross-tokenizer alignment (`align`), the
vocabulary checks before comparing logits (`vocab`), perplexity (`metrics`), and a draft's acceptance by its target
in speculative decoding (`acceptance`)."""
