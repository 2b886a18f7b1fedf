"""Uploading the run to the Hugging Face Hub: a private repo, one branch per run, uploads in the background.

The token comes from HF_TOKEN or the `hf auth login` / `huggingface-cli login` token file, read by huggingface_hub
itself: it is never a flag, never an argument of our calls, and never printed or written anywhere.

`HubUploader` (one per run, main process only) queues uploads on a single background thread, so training never waits
and uploads land in the order they were queued: checkpoints to `checkpoints/step_N` and the final model to the root
of the run's branch. Transient failures (connection errors, timeouts, HTTP 5xx and 429) are retried with exponential
backoff; `finish()` waits for the queue and reports what failed instead of raising, since the model is on local disk
by then. `write_model_card` writes README.md (base model, mixture, hyperparameters, final metrics) into the run folder.
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import HFValidationError, validate_repo_id

from open_instruct.args import describe_fine_tune, describe_global_batch, uses_lora
from open_instruct.data import DataError, MixerItem, resolve_mixture

logger = logging.getLogger("open_instruct.hub")

UPLOAD_IGNORE = ["checkpoints/**", ".final_model.tmp/**", ".adapter.tmp/**", ".merged.tmp/**", "*.tmp", "run.lock",
                 "logs/**", "wandb/**", "tensorboard/**", "mlruns/**"]  # the trackers' folders (trackers.py)
TRANSIENT_STATUSES = {408, 429}  # and every 5xx
FINAL = "final model"


class HubError(RuntimeError):
    pass


class UploadFailed(Exception):
    """An upload failed for good; the message is the one-line reason."""


def resolve_repo_id(args, api: HfApi | None = None) -> str:
    """The full repo id (entity/name). Checks the login first, so a missing or bad token fails before training."""
    api = api or HfApi()
    try:
        user = api.whoami()["name"]
    except Exception as exc:  # the hub client raises several types for a missing or bad token
        raise HubError(
            "--push_to_hub needs a Hugging Face login: set HF_TOKEN or run `hf auth login` "
            f"({type(exc).__name__})."
        ) from None
    name = args.hf_repo_id or args.exp_name
    if "/" in name:
        return name
    return f"{args.hf_entity or user}/{name}"


def repo_revision(args) -> str:
    """The branch the run uploads to: --hf_repo_revision, else the run name."""
    return args.hf_repo_revision or args.exp_name


# ----------------------------------------------------------------------------------------------------------------
# Errors: which ones are worth another attempt
# ----------------------------------------------------------------------------------------------------------------
def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection and timeout errors of whichever HTTP client this huggingface_hub version uses."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        try:
            found += [getattr(importlib.import_module(module), name) for name in names]
        except (ImportError, AttributeError):
            continue
    return tuple(found)


TRANSPORT_ERRORS = _transport_errors()


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None) if isinstance(exc, HfHubHTTPError) else None
    return getattr(response, "status_code", None)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the connection or the server failed, not the request (401, 403, 404, bad input...)."""
    if isinstance(exc, HfHubHTTPError):
        status = _status(exc)
        return status is not None and (status >= 500 or status in TRANSIENT_STATUSES)
    if isinstance(exc, OfflineModeIsEnabled):  # HF_HUB_OFFLINE=1 will not change between attempts
        return False
    return isinstance(exc, TRANSPORT_ERRORS)


def error_reason(exc: BaseException) -> str:
    """One line naming the error (and the HTTP status); the token is masked should a message ever contain it."""
    status = _status(exc)
    lines = str(exc).strip().splitlines()
    text = f"{'HTTP %d ' % status if status else ''}{type(exc).__name__}" + (f": {lines[0][:200]}" if lines else "")
    token = get_token()
    return text.replace(token, "***") if token else text


# ----------------------------------------------------------------------------------------------------------------
# Background uploads
# ----------------------------------------------------------------------------------------------------------------
class HubUploader:
    """Uploads one run's folders to `repo_id` on branch `revision` in the background, in the order they are queued.

    The private repo and the branch are created (if missing) before the first upload. A transient error is retried
    up to `attempts` times in all, waiting base_delay, 2 x base_delay, 4 x base_delay... in between; any other error
    fails that upload at once. Failures are logged when they happen and returned by `finish()`, never raised.
    """

    def __init__(self, repo_id: str, revision: str, api: HfApi | None = None, *, attempts: int = 5,
                 base_delay: float = 2.0):
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        self.repo_id, self.revision = repo_id, revision
        self.url = f"https://huggingface.co/{repo_id}/tree/{revision}"
        self._api = api or HfApi()
        self._attempts, self._base_delay = attempts, base_delay
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-upload")
        self._lock = threading.Lock()
        self._pending: Counter[Path] = Counter()  # local folders queued or uploading (a folder may be queued twice)
        self._repo_ready = False  # touched only by the worker thread
        self._uploaded: list[str] = []
        self._failed: dict[str, str] = {}
        self._report: dict | None = None

    def upload_final(self, folder: str | Path) -> None:
        """Queue the final model folder for the branch root (without checkpoints, wandb and temporary files)."""
        self._queue(FINAL, folder, None)

    def upload_checkpoint(self, folder: str | Path, step: int) -> None:
        """Queue a saved checkpoint folder for `checkpoints/step_{step}` on the branch."""
        self._queue(f"checkpoints/step_{step}", folder, f"checkpoints/step_{step}")

    def busy(self, path: str | Path) -> bool:
        """Whether an upload of this local folder is queued or running (so it must not be deleted yet)."""
        with self._lock:
            return self._pending[Path(path).resolve()] > 0

    def finish(self) -> dict:
        """Wait for every queued upload; return {"url", "repo_id", "revision", "uploaded": [...], "failed": {what:
        one-line reason}}. Upload failures are reported here, not raised: the run is done and its files stay local."""
        if self._report is None:
            self._executor.shutdown(wait=True)
            self._report = {"url": self.url, "repo_id": self.repo_id, "revision": self.revision,
                            "uploaded": list(self._uploaded), "failed": dict(self._failed)}
            if self._failed:
                logger.error("%d of %d hub uploads failed (their files stay on local disk): %s", len(self._failed),
                             len(self._failed) + len(self._uploaded), summary_fields(self._report)["hub_upload_failed"])
        return self._report

    def drop_queued(self) -> int:
        """Cancel the uploads that have not started (a run stopping before a deadline cannot wait for them); one in
        progress still finishes. Returns how many were cancelled; their files stay on local disk."""
        with self._lock:
            queued = sum(self._pending.values())
        self._executor.shutdown(wait=False, cancel_futures=True)
        return max(0, queued - 1)

    def _queue(self, what: str, folder: str | Path, path_in_repo: str | None) -> None:
        if self._report is not None:
            raise RuntimeError("HubUploader.finish() was called; no more uploads can be queued.")
        local = Path(folder).resolve()
        with self._lock:
            self._pending[local] += 1
        self._executor.submit(self._run, what, local, path_in_repo)

    def _run(self, what: str, local: Path, path_in_repo: str | None) -> None:
        try:
            self._retrying(f"{what} (repository)", self._ensure_repo)
            self._retrying(what, lambda: self._api.upload_folder(
                repo_id=self.repo_id, folder_path=str(local), path_in_repo=path_in_repo, revision=self.revision,
                ignore_patterns=UPLOAD_IGNORE, commit_message=f"Upload {what}"))
            self._uploaded.append(what)
            logger.info("Uploaded %s to %s", what, self.url)
        except Exception as exc:  # reported by finish(); a failed upload must not stop training
            self._failed[what] = str(exc) if isinstance(exc, UploadFailed) else error_reason(exc)
            logger.error("Hub upload of %s failed: %s. The files stay in %s.", what, exc, local)
        finally:
            with self._lock:
                self._pending[local] -= 1
                if not self._pending[local]:
                    del self._pending[local]

    def _ensure_repo(self) -> None:
        if self._repo_ready:
            return
        self._api.create_repo(self.repo_id, private=True, exist_ok=True)
        self._api.create_branch(self.repo_id, branch=self.revision, exist_ok=True)
        self._repo_ready = True

    def _retrying(self, what: str, call) -> None:
        for attempt in range(1, self._attempts + 1):
            try:
                call()
                return
            except Exception as exc:
                if not is_transient(exc):
                    raise UploadFailed(error_reason(exc)) from None
                if attempt == self._attempts:
                    raise UploadFailed(f"{error_reason(exc)} (gave up after {attempt} attempts)") from None
                delay = self._base_delay * 2 ** (attempt - 1)
                logger.warning("Hub upload of %s: %s; attempt %d of %d in %.3g s.", what, error_reason(exc),
                               attempt + 1, self._attempts, delay)
                time.sleep(delay)


def summary_fields(report: dict) -> dict:
    """What the run summary shows of an upload report."""
    fields = {"hub_url": report["url"]}
    if report["failed"]:
        fields["hub_upload_failed"] = "; ".join(f"{what}: {why}" for what, why in report["failed"].items())
    return fields


# ----------------------------------------------------------------------------------------------------------------
# The model card
# ----------------------------------------------------------------------------------------------------------------
def looks_like_hub_id(name: str) -> bool:
    """A name that is no local path and has the shape of a hub repo id (name or org/name)."""
    if Path(name).exists() or name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _mixture_items(args) -> list[MixerItem]:
    try:
        return resolve_mixture(args)
    except DataError:  # a local source went away during training: the stats still name every source
        return []


def _mixture_rows(items: list[MixerItem], stats: list[dict]) -> list[str]:
    """A table row per source: the spec (name, split, amount) next to its dataset_stats.json entry (same order)."""
    rows = ["| source | split | amount | examples kept | tokens | trained tokens |",
            "| --- | --- | --- | --- | --- | --- |"]
    for index in range(max(len(items), len(stats))):
        item = items[index] if index < len(items) else None
        stat = stats[index] if index < len(stats) else {}
        name = item.name if item else stat.get("name", "?")
        split = item.split if item else stat.get("split", "")
        amount = "" if item is None else (f"{item.amount:g} x the split" if item.is_fraction
                                          else f"{int(item.amount)} rows")
        rows.append(f"| `{name}` | {split} | {amount} | {stat.get('kept_rows', '')} | {stat.get('tokens', '')} "
                    f"| {stat.get('trained_tokens', '')} |")
    return rows


def _schedule(args) -> str:
    parts = [args.lr_scheduler_type]
    if args.lr_scheduler_type != "constant":
        parts.append(f"warmup ratio {args.warmup_ratio}")
    if args.lr_scheduler_type in ("linear", "cosine", "wsd"):
        parts.append(f"final LR ratio {args.final_lr_ratio}")
    if args.lr_scheduler_type == "wsd":
        parts.append(f"warmdown ratio {args.warmdown_ratio}")
    return ", ".join(parts)


def _evaluation_section(summary: dict) -> list[str]:
    """The in-loop evaluation (open_instruct/evaluation.py eval_summary's fields): before training, at the end, and
    the best with its step. Nothing when the run did not evaluate."""
    names = [key[len("final_"):] for key in summary if key.startswith("final_eval")]
    if not names:
        return []

    def cell(key: str) -> str:
        return f"{summary[key]:.4g}" if isinstance(summary.get(key), float) else str(summary.get(key, ""))

    rows = [f"| {name} | {cell('initial_' + name)} | {cell('final_' + name)} | {cell('best_' + name)} "
            f"(step {cell('best_' + name + '_step')}) |" for name in names]
    return ["## Evaluation", "", "| metric | before training | final | best |", "| --- | --- | --- | --- |",
            *rows, ""]


def _learning_rates(args) -> str:
    if args.lora_learning_rate is None:
        return str(args.learning_rate)
    saved = f", {' '.join(args.lora_modules_to_save)} {args.learning_rate}" if args.lora_modules_to_save else ""
    return f"adapters {args.lora_learning_rate}{saved}"


def _usage_section(args, target: str, load_revision: str) -> list[str]:
    """How to load what the run saved: the model, or the LoRA adapter on its base (and the merged model)."""
    lines = ["## Usage", "", "```python"]
    if not uses_lora(args):
        return lines + ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                        f'tokenizer = AutoTokenizer.from_pretrained("{target}"{load_revision})',
                        f'model = AutoModelForCausalLM.from_pretrained("{target}"{load_revision})', "```", ""]
    lines += ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
              "# the adapter, loaded onto its base model (adapter_config.json names the base)",
              f'tokenizer = AutoTokenizer.from_pretrained("{target}"{load_revision})',
              f'model = AutoPeftModelForCausalLM.from_pretrained("{target}"{load_revision})']
    if args.merge_lora_on_save:
        lines += ["", "# or the merged model, a plain transformers model (no peft needed)",
                  "from transformers import AutoModelForCausalLM",
                  f'model = AutoModelForCausalLM.from_pretrained("{target}"{load_revision}, subfolder="merged")']
    return lines + ["```", ""]


def write_model_card(output_dir: str | Path, args, summary: dict, stats: list[dict] | None = None, *,
                     repo_id: str | None = None, revision: str | None = None,
                     num_processes: int | None = None) -> Path:
    """README.md in the run folder: hub metadata, base model, data mixture, hyperparameters, final metrics, usage.

    `stats` is the per-source list of dataset_stats.json (read from the folder when not given). Only flags and
    metrics go in: no environment, so no token.
    """
    output = Path(output_dir)
    if stats is None:
        stats_file = output / "dataset_stats.json"
        stats = json.loads(stats_file.read_text()) if stats_file.is_file() else []
    base, items = args.model_name_or_path, _mixture_items(args)
    hub_datasets = list(dict.fromkeys(item.name.split("@", 1)[0] for item in items if item.kind == "hub"))
    lora = uses_lora(args)
    data = ModelCardData(
        base_model=base if looks_like_hub_id(base) else None,
        library_name="peft" if lora else "transformers",
        tags=["open-instruct", "sft", *(["lora"] if lora else []), *(["qlora"] if args.use_qlora else [])],
        datasets=hub_datasets or None,
        pipeline_tag="text-generation",
    )
    steps = summary.get("steps", "?")
    length = (f"{steps} optimizer steps (--max_train_steps)" if args.max_train_steps
              else f"{args.num_train_epochs} epochs = {steps} optimizer steps")
    hyper = {
        "fine-tune": describe_fine_tune(args),
        "learning rate": _learning_rates(args),
        "scheduler": _schedule(args),
        "weight decay": args.weight_decay,
        "gradient clipping": args.clip_grad_norm if args.clip_grad_norm > 0 else "off",
        "training length": length,
        "global batch": describe_global_batch(args, num_processes),
        "max_seq_length": f"{args.max_seq_length} (truncation: {args.truncation})",
        "train_on": args.train_on,
        "loss_reduction": args.loss_reduction,
        "padding_free": args.padding_free,
        "seed": args.seed,
    }
    if args.max_tokens_per_micro_batch is not None:
        hyper["max_tokens_per_micro_batch"] = args.max_tokens_per_micro_batch
    metric_names = ("first_train_loss", "last_train_loss", "steps", "total_tokens", "trained_tokens", "train_seconds",
                    "per_device_tps", "per_device_tps_including_padding", "trained_tokens_per_sec", "mfu",
                    "peak_memory_gb", "trainable_parameters")
    target = repo_id or "<repo id>"
    load_revision = f', revision="{revision}"' if revision else ""
    body = [
        f"# {args.exp_name}",
        "",
        f"Supervised fine-tune of `{base}`" + (f" (revision `{args.model_revision}`)" if args.model_revision else "")
        + " with open-instruct's `finetune.py`. Every flag of the run is in `run_config.yaml`; per-step metrics are "
        "in `metrics.jsonl`.",
        "",
        "## Base model",
        "",
        f"`{base}`",
        "",
        "## Data mixture",
        "",
        *_mixture_rows(items, stats),
        "",
        "## Hyperparameters",
        "",
        "| setting | value |",
        "| --- | --- |",
        *(f"| {key} | {value} |" for key, value in hyper.items()),
        "",
        "## Final metrics",
        "",
        "| metric | value |",
        "| --- | --- |",
        *(f"| {name} | {summary[name]} |" for name in metric_names if name in summary),
        "",
        *_evaluation_section(summary),
        *_usage_section(args, target, load_revision),
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
    path = output / "README.md"
    card.save(path)
    return path
