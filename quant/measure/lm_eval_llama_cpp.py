"""A GGUF file as an lm-evaluation-harness model, in process: the log-likelihood requests of lm-eval's tasks scored
from llama.cpp's logits. The text is tokenized by the transformers tokenizer as lm-eval's `hf` backend tokenizes it,
so a GGUF file and the folder it was exported from score the same token ids and differ only by their weights."""
from __future__ import annotations

import numpy as np
from lm_eval.api.model import TemplateLM
from transformers import PreTrainedTokenizerBase

from quant.export.gguf import gguf_logits
from quant.measure.divergence import log_softmax


class LlamaCppLM(TemplateLM):
    """`llm`: a `llama_cpp.Llama` that keeps every position's logits (`quant.export.gguf.loaded`)."""

    def __init__(self, llm, tokenizer: PreTrainedTokenizerBase):
        super().__init__()
        self.llm, self.tokenizer = llm, tokenizer

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer(string, **special)["input_ids"]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        scores = []
        for _, context, continuation in requests:
            ids = (context + continuation)[-self.llm.n_ctx():]
            rows = log_softmax(gguf_logits(self.llm, ids))[len(ids) - len(continuation) - 1:len(ids) - 1]
            picked = rows[np.arange(len(continuation)), continuation]
            scores.append((float(picked.sum()), bool((rows.argmax(-1) == continuation).all())))
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("lm-eval on a GGUF file runs log-likelihood and multiple-choice tasks only")

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError("lm-eval on a GGUF file runs log-likelihood and multiple-choice tasks only")
