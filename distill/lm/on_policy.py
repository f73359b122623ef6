"""On-policy distillation (GKD, Agarwal et al. 2024; MiniLLM, Gu et al. 2024): a share `lmbda` of the training
batches is replaced by the student's own completions of the batch's prompts (of plain text: each text's first
`prompt_tokens` tokens), which the teacher then scores token by token in the same fused pass as any batch; the
other batches are the data's. Off-policy distillation learns the teacher's distributions on text the student would
not write; on its own samples the student is corrected where its mistakes take it.

Whether a batch goes on-policy, and every token drawn for it, come from a generator seeded by the run's seed, the
process, the stage, the epoch and the batch's index in it: a resumed run draws what an uninterrupted run drew,
without a generator state to save."""
from __future__ import annotations

import hashlib

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.core.trainer import TrainState
from distill.lm.config import OnPolicyConfig
from distill.lm.data import text_prompts
from distill.lm.sampling import SamplingConfig, batch_prompts, complete, pack_completions, real_rows, stop_tokens


class OnPolicyBatches:
    """The trainer's batch transform: each batch, with chance `lmbda`, becomes the student's completions of its
    prompts. Counts what the teacher scores: the batches on-policy, their completion tokens, every token read."""

    def __init__(self, cfg: OnPolicyConfig, tokenizer: PreTrainedTokenizerBase, seed: int, rank: int,
                 plain_text: bool = False):
        self.cfg, self.seed, self.rank, self.plain_text = cfg, seed, rank, plain_text
        self.sampling = SamplingConfig(cfg.temperature, cfg.top_p, cfg.max_new_tokens)
        self.stops, self.pad_id = stop_tokens(tokenizer), tokenizer.pad_token_id
        self.counts = {"on_policy_batches": 0, "batches": 0, "target_tokens": 0, "teacher_tokens": 0}

    def generator(self, state: TrainState) -> torch.Generator:
        where = f"{self.seed}/{self.rank}/{state.stage}/{state.epoch}/{state.batches_done}".encode()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(where).digest()[:8], "little") >> 1)

    def __call__(self, batch: dict[str, torch.Tensor], state: TrainState, student: PreTrainedModel
                 ) -> dict[str, torch.Tensor]:
        generator = self.generator(state)
        if self.cfg.lmbda > 0 and torch.rand((), generator=generator).item() < self.cfg.lmbda:
            prompts = (text_prompts(real_rows(batch), self.cfg.prompt_tokens) if self.plain_text
                       else batch_prompts(batch))
            completions = complete(student, prompts, self.sampling, self.stops, self.pad_id, generator)
            batch = {name: value.to(batch["input_ids"].device)
                     for name, value in pack_completions(prompts, completions, self.pad_id).items()}
            self.counts["on_policy_batches"] += 1
        self.counts["batches"] += 1
        self.counts["target_tokens"] += int((batch["labels"] != -100).sum())
        self.counts["teacher_tokens"] += int(batch["attention_mask"].sum())
        return batch
