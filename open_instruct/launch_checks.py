"""What mason checks before it submits a job, so a typo or a missing dataset fails in seconds on the login node
instead of after a queue wait on 64 GPUs: the trainer's flags (with the trainer's own parser), the data sources and
the model (local paths exist; hub repos exist and are readable), the eval sources and multiple-choice files too."""

from __future__ import annotations

from pathlib import Path

from open_instruct.data import DataError, resolve_mixture
from open_instruct.evaluation import check_eval_spec, eval_mixer_items
from open_instruct.launch import LaunchError, parse_quietly


def parse_trainer_flags(script_args: list[str]):
    """The trainer's flags through the trainer's parser and validation; its message becomes a LaunchError."""
    from open_instruct.args import parse_args

    return parse_quietly(lambda: parse_args(script_args), "The trainer's flags are invalid")


def _hub_problem(api, repo_id: str, repo_type: str, revision: str | None) -> tuple[str | None, str | None]:
    """(error, warning) for a hub repo: an error when the hub says it is not there; a warning when it can't be asked."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    what = f"{repo_type} {repo_id}" + (f"@{revision}" if revision else "")
    try:
        api.repo_info(repo_id, repo_type=repo_type, revision=revision, timeout=20)
    except GatedRepoError:
        return (f"The {what} is gated: accept its terms on huggingface.co with the account whose token the job "
                "uses (--secret HF_TOKEN).", None)
    except RepositoryNotFoundError:
        return (f"The {what} is not on the Hugging Face Hub (or it is private and this login cannot read it).", None)
    except RevisionNotFoundError:
        return f"The {what} has no revision {revision!r}.", None
    except Exception as exc:  # offline, proxy, timeout: the nodes may still reach it
        return None, f"could not check the {what} on the hub ({type(exc).__name__}); the job will find out."
    return None, None


def _model_problem(api, name: str, revision: str | None) -> tuple[str | None, str | None]:
    path = Path(name)
    if path.exists() or name.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            return f"Model directory {name} has no config.json (a Hugging Face model folder is needed).", None
        return None, None
    return _hub_problem(api, name, "model", revision) if api else (None, None)


def check_sources(args, api=None, ask_hub: bool = True) -> list[str]:
    """Raise LaunchError naming every missing source; return warnings for the ones that could not be checked.
    Local paths are always checked; hub repos only with `ask_hub`."""
    from huggingface_hub import HfApi

    api = (api or HfApi()) if ask_hub else None
    try:
        items = resolve_mixture(args)  # spec errors, synthetic task names, local files
        check_eval_spec(args)  # the eval set's spec and the multiple-choice files
        items += eval_mixer_items(args) if args.eval_dataset_mixer_list else []
    except DataError as exc:
        raise LaunchError(str(exc)) from None
    problems = [_model_problem(api, args.model_name_or_path, args.model_revision)]
    if args.tokenizer_name_or_path:
        problems.append(_model_problem(api, args.tokenizer_name_or_path, args.tokenizer_revision))
    for item in items:
        if item.kind == "hub" and api:
            repo, _, revision = item.name.partition("@")
            problems.append(_hub_problem(api, repo, "dataset", revision or None))
    errors = [error for error, _ in problems if error]
    if errors:
        raise LaunchError("\n".join(errors))
    return [warning for _, warning in problems if warning]


def check_qlora_layout(args, deepspeed: bool, gpus_per_node: int) -> None:
    """What the trainer would refuse at start-up after a queue wait: QLoRA needs GPUs and runs without DeepSpeed
    (open_instruct/lora.py check_lora_setup)."""
    if not args.use_qlora:
        return
    if gpus_per_node < 1:
        raise LaunchError("--use_qlora needs CUDA GPUs (bitsandbytes' 4-bit kernels): give --gpus_per_node, or use "
                          "--use_lora.")
    if deepspeed:
        raise LaunchError("--use_qlora runs on one process or under DDP, not DeepSpeed: drop --use_deepspeed and "
                          "--deepspeed_config_file from the accelerate command.")
