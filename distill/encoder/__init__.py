"""Encoder distillation (docs/encoder-distillation.md): the classifier jobs and distillation methods: fine-tuning a
teacher (`finetune`), one teacher or several (`single`, `multi_teacher`), deep mutual learning (`mutual`), born-again
generations (`born_again`), early exits (`early_exit`), the teacher's logits cached or in reduced precision
(`teacher_logits`), and the distillation job that chooses among them (`job`)."""
