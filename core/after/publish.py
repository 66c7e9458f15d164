"""``fx push``: publish a run on the Hugging Face hub, for users with an account (the last step of the tutorial).

What is pushed: the merged model (``merged/``, from ``fx merge`` or the merge stage) when the run has one, else
the adapter, which loads onto the base with peft.
"""

from __future__ import annotations

from pathlib import Path

from fx.after import inference
from fx.errors import UserError
from fx.run.directory import RunDir


def what_to_push(run_dir: Path) -> Path:
    merged = RunDir(run_dir).merged
    if (merged / "config.json").is_file():
        return merged
    return inference.adapter_dir(run_dir)


def push(run_dir: Path, repo: str) -> str:
    """Upload the run's merged model (or adapter) to the hub repository ``repo``; return its address."""
    from huggingface_hub import HfApi, get_token

    inference.experiment(run_dir)  # refuse a folder that is not a run before asking for an account
    folder = what_to_push(run_dir)
    token = get_token()
    if not token:
        raise UserError("fx push needs a Hugging Face account: log in with `hf auth login` or set HF_TOKEN "
                        "(no token was found, so nothing was sent)")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo,
                          commit_message=f"fx: {folder.name} of {Path(run_dir).name}")
    except Exception as exc:  # the hub or the network refused (HTTP, connection, permission): say so in a line
        first = (str(exc).splitlines() or [""])[0][:300]
        raise UserError(f"fx push to {repo!r} failed: {type(exc).__name__}: {first}") from None
    return str(url)
