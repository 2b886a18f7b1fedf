"""Whether what a run reads can be found, checked before anything loads: the data sources (mixture spec, local files,
eval files), the model and tokenizer (a local model folder or a hub repo) and the hub datasets.

`check_run_sources` is the trainer's and prepare_data's check. A hub repo must be answerable: the hub knows it, or,
where the hub cannot be asked (HF_HUB_OFFLINE=1, no network), the local cache holds it. So a typo, a missing
download or a dead network is one line within seconds, not a traceback after the hub client's retries (about 25 s
per file). mason's pre-submit checks (launch_checks.py) use the same pieces but only warn where the hub cannot be
asked: the nodes may reach it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from open_instruct import hub
from open_instruct.data import DataError, MixerItem, resolve_mixture
from open_instruct.evaluation import check_eval_spec, eval_mixer_items
from open_instruct.model_utils import ModelSetupError

logger = logging.getLogger(__name__)
MODEL_FILES = ("config.json",)
TOKENIZER_FILES = ("tokenizer_config.json", "config.json")


@dataclass(frozen=True)
class HubRepo:
    """A hub repo the run reads, and how messages name it."""

    subject: str  # what names it: "--model_name_or_path org/name", "dataset org/name@v1"
    repo_id: str
    revision: str | None
    repo_type: str  # "model" or "dataset"
    files: tuple[str, ...]  # a usable copy holds one of them; the first is the one asked for

    @property
    def what(self) -> str:
        return f"{self.repo_type} {self.repo_id}" + (f"@{self.revision}" if self.revision else "")

    @property
    def local_kind(self) -> str:
        """What the name would be if it were a local path."""
        if self.repo_type == "dataset":
            return "a local file or folder"
        return f"a local directory with {' or '.join(self.files)}"


def run_sources(args) -> list[MixerItem]:
    """Every data source of the run, training and eval, after the checks that need no download."""
    items = resolve_mixture(args)
    check_eval_spec(args)  # the eval set's spec and the multiple-choice files
    return items + (eval_mixer_items(args) if args.eval_dataset_mixer_list else [])


def model_refs(args) -> list[tuple[str, str, str | None, tuple[str, ...]]]:
    """(flag, name, revision, files a usable copy holds) of the model and, when given, the tokenizer."""
    refs = [("--model_name_or_path", args.model_name_or_path, args.model_revision, MODEL_FILES)]
    if args.tokenizer_name_or_path:
        refs.append(("--tokenizer_name_or_path", args.tokenizer_name_or_path, args.tokenizer_revision,
                     TOKENIZER_FILES))
    return refs


def local_model_problems(args) -> list[str]:
    """What is wrong with a model or tokenizer named by a local path (hub ids are asked about separately)."""
    problems = []
    for flag, name, _, files in model_refs(args):
        path = Path(name).expanduser()
        wanted = " or ".join(files)
        if path.is_dir() and not any((path / file).is_file() for file in files):
            problems.append(f"{flag} {name}: the directory has no {wanted}; give a Hugging Face model folder.")
        elif path.exists() and not path.is_dir():
            problems.append(f"{flag} {name} is a file; give a Hugging Face model folder (with {wanted}) or a hub id.")
        elif not path.exists() and not hub.looks_like_hub_id(name):
            problems.append(f"{flag} {name}: no such directory (relative paths start from {Path.cwd()}), and not a "
                            "hub id (org/name) either.")
    return problems


def hub_repos(args, items: list[MixerItem]) -> list[HubRepo]:
    """The hub repos the run reads: the model and tokenizer when they are hub ids, and the hub datasets."""
    repos = [HubRepo(f"{flag} {name}", name, revision, "model", files)
             for flag, name, revision, files in model_refs(args) if hub.looks_like_hub_id(name)]
    for item in items:
        if item.kind == "hub":
            repo_id, _, revision = item.name.partition("@")
            repos.append(HubRepo(f"dataset {item.name}", repo_id, revision or None, "dataset", ("README.md",)))
    return repos


def hub_answer(repo: HubRepo, ask: Callable[[], object]) -> tuple[str | None, Exception | None]:
    """Ask the hub about a repo with `ask()`: (error, None) when the hub says it cannot be used, (None, the
    exception) when the hub could not be asked (offline, network, server error), (None, None) when it is there."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        ask()
    except GatedRepoError:
        return (f"{repo.subject}: the {repo.repo_type} is gated: accept its terms on huggingface.co with the account "
                "whose token the run uses (HF_TOKEN; with mason, --secret HF_TOKEN).", None)
    except RepositoryNotFoundError:
        return (f"{repo.subject}: neither {repo.local_kind} (relative paths start from {Path.cwd()}) nor a "
                f"{repo.repo_type} on the Hugging Face Hub (or it is private and this login cannot read it). Fix the "
                "path or the repo id.", None)
    except RevisionNotFoundError:
        return f"{repo.subject}: the {repo.repo_type} has no revision {repo.revision!r} on the Hugging Face Hub.", None
    except EntryNotFoundError:
        return None, None  # the repo is there; the file asked for is not needed by every repo
    except Exception as exc:  # offline, proxy, timeout, server error: the hub did not answer
        return None, exc
    return None, None


def check_run_sources(args) -> None:
    """Before anything loads: the data sources, the model and tokenizer, and every hub repo (on the hub, or in the
    local cache where the hub cannot be asked). Raises DataError or ModelSetupError, one line each."""
    items = run_sources(args)
    problems = local_model_problems(args)
    if problems:
        raise ModelSetupError(problems[0])
    for repo in hub_repos(args, items):
        problem = _hub_problem(repo)
        if problem:
            raise (ModelSetupError if repo.repo_type == "model" else DataError)(problem)


def ask_for_file(repo: HubRepo) -> None:
    """One metadata request (no download, no retries) for the repo's first file: what the loaders ask first."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    get_hf_file_metadata(hf_hub_url(repo.repo_id, repo.files[0], repo_type=repo.repo_type, revision=repo.revision))


def _hub_problem(repo: HubRepo) -> str | None:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        if in_local_cache(repo):
            return None
        return (f"{repo.subject}: not {repo.local_kind} (relative paths start from {Path.cwd()}), and with "
                f"HF_HUB_OFFLINE=1 only the local cache ({_cache_dir(repo)}) is read, which does not hold it. Fix the "
                f"path, or {_fetch_advice(repo)}, or unset HF_HUB_OFFLINE.")
    error, unreachable = hub_answer(repo, lambda: ask_for_file(repo))
    if error or unreachable is None:
        return error
    if in_local_cache(repo):
        logger.warning("%s: the Hugging Face Hub did not answer (%s); using the local cache.", repo.subject,
                       hub.error_reason(unreachable))
        return None
    # "output/tiny-llama" is also a valid repo id: a mistyped local path lands here, so say both.
    return (f"{repo.subject}: not {repo.local_kind} (relative paths start from {Path.cwd()}), and as a hub repo: "
            f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({hub.error_reason(unreachable)}), and the "
            f"local cache ({_cache_dir(repo)}) does not hold it. Fix the path, or check the network, the proxy or "
            "HF_ENDPOINT.")


def in_local_cache(repo: HubRepo) -> bool:
    """Whether the loaders would find the repo without the hub: a model file in the hub cache, or for a dataset
    what `datasets` itself falls back to offline (its own cache of a dataset loaded before)."""
    if repo.repo_type == "dataset":
        from datasets.load import CachedDatasetModuleFactory

        try:
            CachedDatasetModuleFactory(repo.repo_id).get_module()
        except FileNotFoundError:
            return False
        return True
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo.repo_id, file, revision=repo.revision), str)
               for file in repo.files)


def _cache_dir(repo: HubRepo) -> str:
    if repo.repo_type == "dataset":
        from datasets import config

        return str(config.HF_DATASETS_CACHE)
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _fetch_advice(repo: HubRepo) -> str:
    if repo.repo_type == "dataset":
        return "load it once with the hub reachable (datasets then caches it)"
    revision = f" --revision {repo.revision}" if repo.revision else ""
    return f"download it first (hf download {repo.repo_id}{revision})"
