"""What mason checks before it submits a job, so a typo or a missing dataset fails in seconds on the login node
instead of after a queue wait on 64 GPUs: the trainer's flags (with the trainer's own parser), the data sources and
the model (local paths exist; hub repos exist and are readable), the eval sources and multiple-choice files too."""

from __future__ import annotations

from open_instruct.data import DataError
from open_instruct.launch import LaunchError, parse_quietly
from open_instruct.source_checks import hub_answer, hub_repos, local_model_problems, run_sources


def parse_trainer_flags(script_args: list[str]):
    """The trainer's flags through the trainer's parser and validation; its message becomes a LaunchError."""
    from open_instruct.args import parse_args

    return parse_quietly(lambda: parse_args(script_args), "The trainer's flags are invalid")


def check_sources(args, api=None, ask_hub: bool = True) -> list[str]:
    """Raise LaunchError naming every missing source; return warnings for the ones that could not be checked.
    Local paths are always checked; hub repos only with `ask_hub` (the hub not answering is only a warning: the
    nodes may reach it)."""
    from huggingface_hub import HfApi

    try:
        items = run_sources(args)  # spec errors, synthetic task names, local files, eval files
    except DataError as exc:
        raise LaunchError(str(exc)) from None
    errors, warnings = local_model_problems(args), []
    api = api or HfApi()
    for repo in hub_repos(args, items) if ask_hub else []:
        error, unreachable = hub_answer(repo, lambda: api.repo_info(repo.repo_id, repo_type=repo.repo_type,
                                                                     revision=repo.revision, timeout=20))
        errors += [error] if error else []
        if unreachable:
            warnings.append(f"could not check the {repo.what} on the hub ({type(unreachable).__name__}); the job "
                            "will find out.")
    if errors:
        raise LaunchError("\n".join(errors))
    return warnings


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
