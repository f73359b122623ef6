"""Pushing the served model to the Hub, against a local HTTP server that stands in for it (HF_ENDPOINT): the
repository is created, every file of the folder (model, tokenizer, card, report) arrives in one commit, the token
is sent to the server and never appears in the output or in the pipeline's files."""
import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from distill.core.errors import ConfigError
from distill.pipeline.hub import PushConfig, push_folder

TOKEN = "hf_pipelineTestSecret0123456789"
ROOT = Path(__file__).resolve().parents[2]


class FakeHub(BaseHTTPRequestHandler):
    """Answers what huggingface_hub sends for create_repo and upload_folder (the card's metadata check, preupload,
    then an ndjson commit)."""
    requests: list = []
    created: list = []
    validated: list = []
    uploaded: dict = {}

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.requests.append((self.path, self.headers.get("Authorization")))
        if self.path == "/api/repos/create":
            repo = json.loads(body)
            repo_id = f"{repo['organization']}/{repo['name']}" if repo.get("organization") else repo["name"]
            self.created.append(repo_id)
            return self.answer({"url": f"http://{self.headers['Host']}/{repo_id}"})
        if self.path == "/api/validate-yaml":
            self.validated.append(json.loads(body)["content"])
            return self.answer({"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self.answer({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                          for f in files]})
        if "/commit/" in self.path:
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.uploaded[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            repo_id = self.path.removeprefix("/api/models/").split("/commit/")[0]
            return self.answer({"commitUrl": f"http://{self.headers['Host']}/{repo_id}/commit/{'1' * 40}",
                                "commitOid": "1" * 40})
        self.send_error(404)

    def answer(self, values: dict):
        data = json.dumps(values).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub():
    FakeHub.requests, FakeHub.created, FakeHub.validated, FakeHub.uploaded = [], [], [], {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", FakeHub
    server.shutdown()
    server.server_close()


def test_the_push_stage_uploads_model_tokenizer_card_and_report_without_showing_the_token(tiny_pipeline, hub,
                                                                                          tmp_path):
    endpoint, server = hub
    served = Path(tiny_pipeline[0].output_dir) / "04-report" / "model"
    pipeline = {"output_dir": str(tmp_path / "run"),
                "stages": [{"kind": "push", "model": str(served), "overrides": {"repo_id": "me/tiny-student"}}]}
    (tmp_path / "push.yaml").write_text(yaml.safe_dump(pipeline))
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf-home"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    done = subprocess.run([sys.executable, "recipes/compress.py", "--config", str(tmp_path / "push.yaml")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = {str(p.relative_to(served)) for p in served.rglob("*") if p.is_file()}
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "compression_report.json",
            "compression_report.md", "compression_report.png"} <= expected
    assert server.created == ["me/tiny-student"] and set(server.uploaded) == expected
    assert server.uploaded["README.md"] == (served / "README.md").read_bytes()
    assert server.validated == [(served / "README.md").read_text()]
    assert all(auth == f"Bearer {TOKEN}" for _, auth in server.requests)
    assert TOKEN not in done.stdout + done.stderr
    assert all(TOKEN not in p.read_text(errors="ignore") for p in (tmp_path / "run").rglob("*") if p.is_file())
    marker = json.loads((tmp_path / "run" / "01-push" / "stage.json").read_text())
    assert marker["complete"] and marker["metrics"]["repo_id"] == "me/tiny-student"


@pytest.mark.parametrize("repo_id, message", [("", "repo_id is empty"), ("me/bad name", "not a valid Hub repository")])
def test_a_bad_repository_id_is_refused_before_any_request(repo_id, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        push_folder(PushConfig(model=str(tmp_path), repo_id=repo_id))
