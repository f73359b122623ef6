"""A teacher behind a server: its top-k log-probabilities at every token of a corpus, read from an OpenAI-compatible
completions endpoint that echoes the prompt's log-probabilities (`echo: true`, `logprobs: k`), such as
llama-cpp-python's server (`python -m llama_cpp.server --model teacher.gguf`). The rows go into an ordinary teacher
cache (`distill.lm.cache`), so training never holds the teacher.

What the endpoint returns, and how it becomes cache rows (row t: the distribution of token t+1 given tokens 0..t):
- the echoed entry i of a prompt holds the top log-probabilities of the token after token i, keyed by the tokens'
  text; entry 0 is null (the OpenAI convention), so row 0 comes from a second request whose prompt is the first
  token alone and whose one generated token's entry is that distribution;
- the text keys are mapped back to ids through the student's tokenizer. Ids whose text is not unique (byte pieces of
  a character, control tokens that render empty) cannot be told apart and are left out: a row then holds fewer than
  k tokens, padded with the row's first id at probability 0, and the mass left out joins the rest bucket (a row
  inside a character, all of whose entries are byte pieces, keeps nothing: the whole mass is the rest);
- the endpoint tokenizes the text itself: each example's echoed tokens must be the student's, or the build stops;
- log-probabilities are at temperature 1, with no draws from the rest of the distribution (the endpoint returns
  only its top tokens).

The token (`api_key_env` names the environment variable that holds it) is sent as a bearer token and never logged
or written; failed requests are retried with exponential backoff."""
from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from distill.core.errors import ConfigError
from distill.lm.config import EndpointConfig

PAD_LOGPROB = -65000.0
"""Log-probability of a padding slot: exp() is 0 in float32, and it fits float16."""
PROBE = "The film's 2 leads, Ana and Björn, weren't bad at all; it cost $3.5 million (in 1999)."
"""Text whose tokenization the endpoint must share with the student before a build starts."""

logger = logging.getLogger(__name__)


class EndpointError(RuntimeError):
    """A request that still failed after every retry, or was refused (`status`: the HTTP status, if any)."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


class Endpoint:
    """JSON over HTTP to `cfg.url`, with the bearer token from the environment and retries with backoff."""

    def __init__(self, cfg: EndpointConfig):
        self.cfg = cfg
        self.url = cfg.url.rstrip("/")
        self._token = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None

    def request(self, path: str, body: Optional[dict] = None, retries: Optional[int] = None) -> dict:
        retries = self.cfg.retries if retries is None else retries
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        for attempt in range(retries + 1):
            try:
                req = urllib.request.Request(self.url + path, data=data, headers=headers)
                with urllib.request.urlopen(req, timeout=self.cfg.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                reason = f"HTTP {err.code}: {err.read()[:300].decode(errors='replace')}"
                if err.code < 500 and err.code != 429:  # the request itself is wrong: retrying will not help
                    raise EndpointError(f"{self.url}{path} answered {reason}", err.code) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                reason = str(getattr(err, "reason", err))
            if attempt < retries:
                wait = self.cfg.backoff * 2 ** attempt
                logger.warning("%s%s failed (%s); retrying in %.1f s", self.url, path, reason, wait)
                time.sleep(wait)
        raise EndpointError(f"{self.url}{path} failed after {retries + 1} attempts: {reason}")

    def complete(self, prompt: str, k: int, echo: bool) -> dict:
        body = {"prompt": prompt, "max_tokens": 1, "temperature": 0.0, "echo": echo, "logprobs": k}
        if self.cfg.model:
            body["model"] = self.cfg.model
        return self.request("/completions", body)

    def check_reachable(self) -> None:
        """Refuse (ConfigError) an endpoint that does not answer `GET /models`, or that does not serve `cfg.model`."""
        try:
            models = self.request("/models", retries=min(self.cfg.retries, 2))
        except EndpointError as err:
            if err.status in (401, 403):
                raise ConfigError(f"endpoint.api_key_env: the teacher endpoint refused the token in "
                                  f"${self.cfg.api_key_env} ({err})") from None
            raise ConfigError(f"endpoint.url: the teacher endpoint is unreachable: {err}") from None
        names = [entry.get("id") for entry in models.get("data", [])]
        if self.cfg.model and self.cfg.model not in names:
            raise ConfigError(f"endpoint.model: {self.url} serves {names}, not '{self.cfg.model}'")


class ServedTeacher:
    """Cache rows from an `Endpoint`, mapped to the ids of `tokenizer` (the student's, and the endpoint's model's)."""

    def __init__(self, endpoint: Endpoint, tokenizer: PreTrainedTokenizerBase, k: int):
        self.endpoint, self.tokenizer, self.k = endpoint, tokenizer, k
        self.surfaces = [tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in range(len(tokenizer))]
        seen = Counter(self.surfaces)
        self.ids = {text: i for i, text in enumerate(self.surfaces) if seen[text] == 1 and "\ufffd" not in text}
        self.dropped = 0  # top-k entries whose text names no single id
        self.entries = 0
        self.empty_rows = 0  # rows none of whose entries names a single id

    def check_tokenizer(self, examples: Sequence[Sequence[int]]) -> None:
        """Refuse (ConfigError) an endpoint that tokenizes the probe text or the first examples otherwise."""
        probes = [self.tokenizer(PROBE, add_special_tokens=False)["input_ids"], *examples[:3]]
        for ids in probes:
            answer = self.endpoint.complete(self.text(ids), 0, echo=True)
            problem = self.tokenization_problem(ids, answer)
            if problem:
                raise ConfigError(f"endpoint: the served model's tokenizer differs from {self.tokenizer.name_or_path}"
                                  f": {problem}")

    def text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)

    def tokenization_problem(self, ids: Sequence[int], answer: dict) -> Optional[str]:
        """Why the endpoint's echo of `ids`'s text is not `ids` (None when it is)."""
        served = answer["choices"][0]["logprobs"]["tokens"]
        count = answer.get("usage", {}).get("prompt_tokens", len(served))
        if count != len(ids) or len(served) < len(ids):
            return f"{count} tokens for a text of {len(ids)} ({self.text(ids)[:60]!r})"
        for position, (token, text) in enumerate(zip(served, (self.surfaces[i] for i in ids))):
            if "\ufffd" not in text and token != text:
                return f"token {position} of {self.text(ids)[:60]!r} is {token!r} there, {text!r} here"
        return None

    def example_rows(self, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, k) log-probabilities and ids of one example of n tokens."""
        entries: list[Optional[dict]] = [None] * len(ids)
        first = self.endpoint.complete(self.text(ids[:1]), self.k, echo=False)
        if first.get("usage", {}).get("prompt_tokens", 1) != 1:
            raise ConfigError(f"endpoint: token {ids[0]} ({self.surfaces[ids[0]]!r}) alone is "
                              f"{first['usage']['prompt_tokens']} tokens there")
        entries[0] = first["choices"][0]["logprobs"]["top_logprobs"][0]
        if len(ids) > 1:
            answer = self.endpoint.complete(self.text(ids), self.k, echo=True)
            problem = self.tokenization_problem(ids, answer)
            if problem:
                raise ConfigError(f"endpoint: an example tokenizes otherwise there: {problem}")
            entries[1:] = answer["choices"][0]["logprobs"]["top_logprobs"][1:len(ids)]
        rows = [self.row(entry) for entry in entries]
        return torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])

    def row(self, entry: dict) -> tuple[list[float], list[int]]:
        """The k most likely ids of one echoed entry (it may hold one more: the echoed token's own), padded."""
        pairs = sorted(((logprob, self.ids[text]) for text, logprob in entry.items() if text in self.ids),
                       reverse=True)[:self.k]
        self.entries += min(len(entry), self.k)
        self.dropped += min(len(entry), self.k) - len(pairs)
        if not pairs:  # every entry names byte pieces (inside a character): all its mass goes to the rest bucket
            self.empty_rows += 1
            pairs = [(PAD_LOGPROB, 0)]
        pairs += [(PAD_LOGPROB, pairs[0][1])] * (self.k - len(pairs))
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def shard_rows(self, part: list[Sequence[int]], bar: tqdm) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for ids in part:
            rows.append(self.example_rows(ids))
            bar.update(1)
        return torch.cat([r[0] for r in rows]).half(), torch.cat([r[1] for r in rows])
