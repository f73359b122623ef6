"""Publishing a model folder on the Hugging Face Hub (or the server `HF_ENDPOINT` names): the repository is
created if missing, then the folder is uploaded in one commit. huggingface_hub finds the token (`HF_TOKEN`, or what
`hf auth login` saved); nothing here reads, prints or logs it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.utils import HFValidationError, validate_repo_id

from distill.core.errors import ConfigError
from distill.core.jobs import Job, register_job


@dataclass
class PushConfig:
    """Upload a model folder (model, tokenizer, model card, compression report) to a Hugging Face Hub repository.
    The token comes from huggingface_hub's usual places (`HF_TOKEN`, or what `hf auth login` saved); `HF_ENDPOINT`
    picks another server."""
    model: str = ""
    """The folder to upload; in a pipeline, the report stage's model (which carries the card)."""
    output_dir: str = "runs/push"
    """The upload writes nothing here; in a pipeline it is the stage's folder, which holds its `stage.json`."""
    repo_id: str = ""
    """`owner/name` (or `name`, under the token's user); created if missing."""
    private: bool = False
    """Create the repository as private; an existing repository keeps its visibility."""
    commit_message: str = "Upload compressed model"
    """The message of the upload's commit."""


def check_push_config(cfg: PushConfig) -> None:
    if not cfg.repo_id:
        raise ConfigError("repo_id is empty; name the Hub repository, e.g. repo_id=your-name/your-model")
    try:
        validate_repo_id(cfg.repo_id)
    except HFValidationError as err:
        raise ConfigError(f"repo_id '{cfg.repo_id}' is not a valid Hub repository id: {err}") from err


def push_folder(cfg: PushConfig) -> dict:
    """Create the repository (if missing) and upload `cfg.model` into it; what was pushed, for the record."""
    check_push_config(cfg)
    folder = Path(cfg.model)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder} is not a saved model folder (no config.json)")
    api = HfApi()
    repo = api.create_repo(cfg.repo_id, private=cfg.private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo.repo_id, folder_path=folder, commit_message=cfg.commit_message)
    files = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())
    return {"repo_id": repo.repo_id, "url": str(repo), "commit": commit.oid, "files": files}


PUSH = register_job(Job("push", PushConfig, check_push_config, push_folder, lambda cfg, pushed: pushed))
