"""Checkpoints that resume the exact same run, and saves that cannot be half-written (the final model: final_model.py).

A checkpoint is `OUTPUT_DIR/checkpoints/step_N/`: accelerate's `save_state` (model and optimizer, as ZeRO-3 shards
under DeepSpeed; the LR scheduler; every rank's RNG states) plus `trainer_state.json` (the next optimizer step, which
with the seed decides every later global batch; token counters; what the run must keep to be the same run) and
`run_config.yaml`. Every rank writes into `step_N.tmp/`; once all ranks finished, they hash the files into
`manifest.json` (each rank a share, see open_instruct/manifest.py), then global rank 0 adds the COMPLETED marker and
renames the folder, so a crash at any point leaves the previous checkpoints untouched and no `step_N` that looks
complete. Resuming checks the manifest: a damaged newest checkpoint is set aside (`step_N.damaged`) and the newest
intact one resumes. Checkpoints live on a filesystem every node sees (as accelerate and DeepSpeed assume).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from open_instruct.elastic import remove_stale_conversions, universal_dir
from open_instruct.flops import parameter_numel
from open_instruct.manifest import (
    COMPLETED_MARKER,
    describe,
    folder_problems,
    from_main_process,
    mark_complete,
    record_manifest,
)
from open_instruct.ranks import any_rank
from open_instruct.storage import (
    StorageError,
    cause_of,
    free_space_problem,
    is_write_failure,
    write_failure_message,
)

if TYPE_CHECKING:  # annotations only: the trainer's objects, without importing what sits above this module
    from accelerate import Accelerator

    from open_instruct.args import FinetuneArgs
    from open_instruct.batching import BatchPlan
    from open_instruct.hub import HubUploader
    from open_instruct.preemption import StopRequests

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
RUN_CONFIG = "run_config.yaml"
_STEP_DIR = re.compile(r"^step_(\d+)$")

# Settings that decide which examples form each global batch or which model is trained. A checkpoint written with
# other values belongs to a different run: resuming it is an error unless --force_resume.
SAME_RUN_SETTINGS = (
    "model_name_or_path", "model_revision", "tokenizer_name_or_path", "tokenizer_revision", "chat_template_name",
    "dataset_mixer_list", "dataset_mixer_list_splits", "dataset_mixer_file", "max_seq_length", "truncation",
    "train_on", "train_reasoning", "add_bos", "skip_bad_rows", "max_unmaskable_fraction", "seed", "use_liger_kernel",
    "eval_fraction",  # the held-out share is taken out of training: another fraction trains on other examples
    # which weights train, and the adapters' shape and scale: another value is another model
    "use_lora", "use_qlora", "lora_rank", "lora_alpha", "lora_target_modules", "lora_modules_to_save",
)
# Settings that change the rest of the run but not its data or model: a change is reported, then honoured.
OPTIMIZATION_SETTINGS = (
    "learning_rate", "lr_scheduler_type", "warmup_ratio", "final_lr_ratio", "warmdown_ratio", "weight_decay",
    "clip_grad_norm", "loss_reduction", "num_train_epochs", "max_train_steps", "lora_dropout", "lora_learning_rate",
    "sequence_parallel_size",  # how rows are cut over ranks: the same examples and the same sums (test_sequence_parallel)
)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, found or resumed; the message says which and what to do."""


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoints_root(output_dir) / f"step_{step}"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The run's complete checkpoints, oldest first (by step number, not by name: step_10 comes after step_9)."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))
             and (p / COMPLETED_MARKER).is_file()]
    return [path for _, path in sorted(found)]


def remove_unfinished_saves(output_dir: str | Path) -> list[Path]:
    """Delete `step_N.tmp` folders a killed save left behind (global rank 0, before anything else is written)."""
    root = checkpoints_root(output_dir)
    stale = sorted(root.glob("step_*.tmp")) if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


# ----------------------------------------------------------------------------------------------------------------
# Which checkpoint to resume, and whether it belongs to this run
# ----------------------------------------------------------------------------------------------------------------
def checkpoint_to_resume(resume_from_checkpoint: str, output_dir: str | Path) -> Path | None:
    """`auto`: the newest complete checkpoint of this output directory, if any. `none`: start from scratch, which
    refuses an output directory that already holds checkpoints (they would mix with the new run's). A path: that
    checkpoint, which must exist and be complete."""
    existing = complete_checkpoints(output_dir)
    if resume_from_checkpoint == "auto":
        return existing[-1] if existing else None
    if resume_from_checkpoint == "none":
        if existing:
            raise CheckpointError(
                f"{checkpoints_root(output_dir)} holds checkpoints of an earlier run (newest: {existing[-1].name}). "
                "Resume it (--resume_from_checkpoint auto), or start the new run in another --output_dir."
            )
        return None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise CheckpointError(f"--resume_from_checkpoint {path}: no such directory.")
    if not (path / COMPLETED_MARKER).is_file() or not (path / TRAINER_STATE).is_file():
        raise CheckpointError(
            f"--resume_from_checkpoint {path} is not a complete checkpoint (no {COMPLETED_MARKER} marker or "
            f"{TRAINER_STATE}); a save was probably interrupted. Use an earlier checkpoint or 'auto'."
        )
    return path


def verified_checkpoint_to_resume(accelerator, resume_from_checkpoint: str, output_dir: str | Path) -> Path | None:
    """`checkpoint_to_resume`, checked against the checkpoint's manifest (every rank calls it; all get one answer).

    `auto` falls back from damaged checkpoints to the newest intact one, setting the damaged ones aside; with none
    intact it is an error (starting over silently would throw the run away). A damaged explicit path is an error. A
    checkpoint saved before manifests existed resumes unverified, with a warning.
    """
    if resume_from_checkpoint == "auto":
        return _newest_intact(accelerator, output_dir)
    path = checkpoint_to_resume(resume_from_checkpoint, output_dir)
    if path is not None and (problems := _problems_or_warn(accelerator, path)):
        raise CheckpointError(
            f"--resume_from_checkpoint {path} is damaged ({describe(problems)}). Restore its files, or resume "
            "another checkpoint ('auto' takes the newest intact one of --output_dir)."
        )
    return path


def _problems_or_warn(accelerator, checkpoint: Path) -> list[str]:
    """The checkpoint's problems ([] when intact); one without a manifest counts as intact, with a warning."""
    problems = folder_problems(checkpoint, accelerator)
    if problems is None and accelerator.is_main_process:
        logger.warning("%s has no manifest (saved before checkpoints were verified): resuming it unverified.",
                       checkpoint)
    return problems or []


def _newest_intact(accelerator, output_dir: str | Path) -> Path | None:
    damaged = {}
    for checkpoint in reversed(from_main_process(accelerator, lambda: complete_checkpoints(output_dir))):
        problems = _problems_or_warn(accelerator, checkpoint)
        if not problems:
            if accelerator.is_main_process:
                set_aside(damaged, checkpoint)
            return checkpoint
        damaged[checkpoint] = problems
    if damaged:
        found = ", ".join(f"{path.name} ({describe(problems)})" for path, problems in damaged.items())
        raise CheckpointError(
            f"No intact checkpoint in {checkpoints_root(output_dir)}: {found}. Nothing was moved or deleted. Restore "
            "the damaged files, or start the run over in another --output_dir."
        )
    return None


def set_aside(damaged: dict[Path, list[str]], intact: Path) -> None:
    """Rename each damaged checkpoint to `step_N.damaged` (global rank 0): kept for inspection, never deleted, and out
    of the way of pruning and of the run's next save of step N."""
    for checkpoint, problems in damaged.items():
        aside = checkpoint.with_name(f"{checkpoint.name}.damaged")
        number = 1
        while aside.exists():
            aside, number = checkpoint.with_name(f"{checkpoint.name}.damaged-{number}"), number + 1
        checkpoint.rename(aside)
        logger.warning("Checkpoint %s is damaged (%s): moved it to %s. Resuming %s, the newest intact checkpoint.",
                       checkpoint, describe(problems), aside.name, intact.name)


def run_identity(args, data_fingerprint: str, global_batch: str, num_processes: int, zero_stage: int | None) -> dict:
    """What a checkpoint records to recognise its run on resume."""
    return {
        "settings": {name: getattr(args, name) for name in SAME_RUN_SETTINGS},
        "optimization": {name: getattr(args, name) for name in OPTIMIZATION_SETTINGS},
        "data_fingerprint": data_fingerprint,
        "global_batch": global_batch,
        "num_processes": num_processes,
        "zero_stage": zero_stage,
    }


def read_trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / TRAINER_STATE).read_text())


def resume_problems(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(differences that make this a different run, differences that only change the rest of the optimization)."""
    from open_instruct.args import default_values

    # A setting added after the checkpoint was written had its default value then.
    saved_settings = {**default_values(), **saved["settings"]}
    different_run = [f"--{name}: checkpoint {saved_settings.get(name)!r}, now {value!r}"
                     for name, value in current["settings"].items() if saved_settings.get(name) != value]
    if saved["global_batch"] != current["global_batch"]:
        different_run.append(f"global batch: checkpoint {saved['global_batch']}, now {current['global_batch']} "
                             "(give --global_batch_size to keep it when the number of processes changes)")
    if not different_run and saved["data_fingerprint"] != current["data_fingerprint"]:
        different_run.append("the tokenized data: a source's contents or the tokenizer changed since the checkpoint")
    saved_optimization = {**default_values(), **saved["optimization"]}
    optimization = [f"--{name}: checkpoint {saved_optimization.get(name)!r}, now {value!r}"
                    for name, value in current["optimization"].items() if saved_optimization.get(name) != value]
    return different_run, optimization


def check_resumable(checkpoint: Path, current: dict, force: bool) -> dict:
    """The checkpoint's trainer state, after checking that it continues this run (see SAME_RUN_SETTINGS). The process
    layout (number of processes, ZeRO stage) may differ: open_instruct/elastic.py carries the state over."""
    state = read_trainer_state(checkpoint)
    saved = state["identity"]
    different_run, optimization = resume_problems(saved, current)
    if different_run and not force:
        raise CheckpointError(
            f"{checkpoint} was written by a different run:\n  " + "\n  ".join(different_run)
            + "\nUse the checkpoint's settings (its run_config.yaml), another --output_dir, or --force_resume to "
              "continue from it anyway."
        )
    for line in (different_run if force else []) + optimization:
        logger.warning("Resuming %s with a changed setting: %s", checkpoint, line)
    return state


# ----------------------------------------------------------------------------------------------------------------
# Save, prune, load
# ----------------------------------------------------------------------------------------------------------------
def checkpoint_bytes_estimate(model) -> int:
    """About the size of a checkpoint before the first one exists: the weights as held, plus Adam's two fp32 moments
    and, for 16-bit weights, DeepSpeed's fp32 master copy of every trainable weight."""
    total = 0
    for parameter in model.parameters():
        count = parameter_numel(parameter)
        total += count * parameter.element_size()
        if parameter.requires_grad:
            total += count * (8 + (4 if parameter.element_size() < 4 else 0))
    return total


def _space_problem(output_dir: Path, previous: Path | None, estimate: int | None) -> str | None:
    """A checkpoint is about the size of the previous one (or of the estimate before the first): refuse before
    writing when the disk cannot hold it."""
    needed = sum(f.stat().st_size for f in previous.rglob("*") if f.is_file()) if previous else estimate
    return free_space_problem(output_dir, needed, "a checkpoint") if needed else None


def newest_intact_description(output_dir: str | Path) -> str:
    """What a user still has after a failed write: the checkpoint the same command would resume, or none."""
    previous = complete_checkpoints(output_dir)
    if previous:
        return f"the newest checkpoint {previous[-1]} is intact and the same command resumes from it"
    return "no checkpoint of this run exists (--checkpointing_steps N saves them)"


def save_checkpoint(accelerator, output_dir: str | Path, step: int, trainer_state: dict, run_config: dict,
                    estimate: int | None = None) -> Path:
    """Write checkpoint `step` crash-safely (see the module docstring); every rank calls it.

    Not enough disk space (measured against the previous checkpoint, or `estimate` bytes for the first) or a failed
    write on any rank raises StorageError on every rank; the unfinished folder is removed and earlier checkpoints stay
    as they were.
    """
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    problem = None
    if accelerator.is_main_process:
        previous = complete_checkpoints(output_dir)
        problem = _space_problem(Path(output_dir), previous[-1] if previous else None, estimate)
        if problem is None:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            except OSError as error:
                problem = cause_of(error)
    if any_rank(accelerator, problem is not None):
        raise StorageError(_save_failed(final, problem or "the main process could not start it"))
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
            (tmp / RUN_CONFIG).write_text(yaml.safe_dump(run_config, sort_keys=False))
    except Exception as error:
        if not is_write_failure(error):
            raise
        problem = cause_of(error)
    if any_rank(accelerator, problem is not None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise StorageError(_save_failed(final, problem or "another process failed to write its part"))
    try:
        record_manifest(tmp, accelerator)  # every rank hashes its share of the files; the main process writes it
        if accelerator.is_main_process:
            mark_complete(tmp, step=step)  # written once, after every rank's part and the manifest
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    except Exception as error:
        if not is_write_failure(error):
            raise
        problem = cause_of(error)
    if any_rank(accelerator, problem is not None):  # also the barrier: no rank goes on before the rename
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise StorageError(_save_failed(final, problem or "the main process could not finish it"))
    return final


@dataclass
class Checkpointer:
    """Saves this run's training state (every --checkpointing_steps, and when the run is asked to stop), times the
    saves for the wall-clock budget, uploads and prunes."""

    args: FinetuneArgs
    accelerator: Accelerator
    output: Path
    plan: BatchPlan  # which epoch a step ends
    identity: dict  # run_identity: what the checkpoint must match to be resumed
    stops: StopRequests  # told how long saves take
    uploader: HubUploader | None
    estimate: int  # bytes of a checkpoint before the first one exists
    last_saved_step: int = 0  # the same on every rank: whether a stop needs a save must not differ between ranks
    last_saved: Path | None = None  # that step's checkpoint (the resumed one may live in another directory)
    total_steps: int | None = None  # recorded for mason's plan of a resubmitted job ("resuming step N of M")

    def save(self, steps_done: int, first_loss: float | None, counters) -> Path:
        trainer_state = {"step": steps_done, "total_steps": self.total_steps,
                         "epoch": self.plan.epochs_done(steps_done - 1), "first_loss": first_loss,
                         "counters": counters.state(), "identity": self.identity}
        started = time.perf_counter()
        saved = save_checkpoint(self.accelerator, self.output, steps_done, trainer_state, dataclasses.asdict(self.args),
                                estimate=self.estimate)
        self.stops.note_save(time.perf_counter() - started)
        self.last_saved_step, self.last_saved = steps_done, saved
        if self.uploader and self.args.push_checkpoints:
            self.uploader.upload_checkpoint(saved, steps_done)
        if self.accelerator.is_main_process:  # a checkpoint still uploading is kept until a later prune
            for stale in remove_stale_conversions(self.output, steps_done):
                logger.info("Removed %s: %s is newer.", stale, saved.name)
            prune_checkpoints(self.output, self.args.keep_last_n_checkpoints,
                              in_use=self.uploader.busy if self.uploader else None)
        return saved


def _save_failed(final: Path, reason: str) -> str:
    output = final.parent.parent
    return write_failure_message(f"checkpoint {final.name}", final, reason, newest_intact_description(output))


def prune_checkpoints(output_dir: str | Path, keep_last: int | None, in_use=None) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (global rank 0 only); `None` keeps all. A
    checkpoint for which `in_use(path)` is true (still uploading) stays until a later prune."""
    if keep_last is None:
        return []
    removed = []
    for path in complete_checkpoints(output_dir)[:-keep_last]:
        if in_use is None or not in_use(path):
            shutil.rmtree(path)
            shutil.rmtree(universal_dir(path), ignore_errors=True)  # its conversion, if it was ever resumed elsewhere
            removed.append(path)
    return removed
