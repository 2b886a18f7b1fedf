"""Uploading the final model to the Hugging Face Hub (private repos; the token comes from HF_TOKEN or the
huggingface-cli login and is never printed or written anywhere)."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi

UPLOAD_IGNORE = ["checkpoints/**", ".final_model.tmp/**", "wandb/**", "*.tmp"]


class HubError(RuntimeError):
    pass


def resolve_repo_id(args, api: HfApi | None = None) -> str:
    """The target repo; checks the login first so a bad token fails before training, not after."""
    api = api or HfApi()
    try:
        user = api.whoami()["name"]
    except Exception as exc:  # the hub client raises several types for a missing or bad token
        raise HubError(
            "--push_to_hub needs a Hugging Face login: set HF_TOKEN or run `huggingface-cli login` "
            f"({type(exc).__name__})."
        ) from None
    return args.hf_repo_id or f"{user}/{args.exp_name}"


def push_folder(folder: str | Path, repo_id: str, api: HfApi | None = None) -> str:
    """Create the private repo if needed and upload the folder (without checkpoints); return the repo URL."""
    api = api or HfApi()
    api.create_repo(repo_id, private=True, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, ignore_patterns=UPLOAD_IGNORE,
                      commit_message=f"Upload {Path(folder).name}")
    return f"https://huggingface.co/{repo_id}"
