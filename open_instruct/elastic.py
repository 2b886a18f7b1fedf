"""Resume a checkpoint on another process layout: more or fewer processes or nodes, another ZeRO stage, or from
DeepSpeed ZeRO to plain processes (one debug GPU, DDP) and back.

A ZeRO checkpoint holds each rank's partition of the fp32 master weights and of Adam's two moments, cut for the number
of processes that wrote it, and DeepSpeed loads it only on that layout. To resume on another one, the checkpoint is
converted once into DeepSpeed's universal checkpoint format: a folder per parameter holding its whole fp32 weight and
both moments, written by DeepSpeed's own `ds_to_universal`. DeepSpeed loads that format on any layout, cutting each
rank's partitions itself (its `checkpoint.load_universal` setting).

    checkpoints/step_N/             the checkpoint as written; never modified
    checkpoints/step_N.universal/   its conversion: pytorch_model/ (the universal format), manifest.json and a
                                    COMPLETED marker naming the source's manifest. Written into `.tmp` and renamed,
                                    reused by a later resume of the same checkpoint, removed once a newer checkpoint
                                    exists.

How each change is resumed (`how_to_resume`):
    same layout, or whole tensors on both sides     as saved (accelerate's load_state)
    to DeepSpeed ZeRO on another layout             DeepSpeed loads the universal conversion. From ZeRO it is made by
                                                    ds_to_universal; from whole tensors (model.safetensors and
                                                    optimizer.bin of one process or DDP) each parameter's weight and
                                                    moments are written into the same per-parameter files.
    from ZeRO to whole tensors                      the universal conversion's weights and moments are copied into
                                                    the model and into torch's AdamW state

In every case the scheduler and each rank's RNG state come from the checkpoint itself (a rank the checkpoint had no
RNG state for keeps its seeded state: the data order never depends on it), and the global batches do not depend on
the layout (batching.split_global_batch), so the resumed run continues the same optimization.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from open_instruct.manifest import COMPLETED_MARKER, MANIFEST, describe, folder_problems, from_main_process, mark_complete, \
    record_manifest, sha256_file
from open_instruct.ranks import main_process_work
from open_instruct.storage import StorageError, cause_of, free_space_problem, is_write_failure, size_text, \
    write_failure_message

logger = logging.getLogger(__name__)

TAG = "pytorch_model"  # the folder accelerate's save_state gives DeepSpeed for the first model (accelerate's MODEL_NAME)
UNIVERSAL_SUFFIX = ".universal"
# The model-states file DeepSpeed's universal load reads global counters from: ZeRO-3 names it per partition rank,
# ZeRO-1/2 per model-parallel rank. A conversion carries both, so that either stage can load it.
MODEL_STATES = ("zero_pp_rank_0_mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt")
AS_SAVED, TO_DEEPSPEED, TO_WHOLE_TENSORS = "as saved", "to DeepSpeed", "to whole tensors"


class ElasticResumeError(RuntimeError):
    """A checkpoint cannot be carried to this layout; the message says why and what to do."""


@dataclass(frozen=True)
class Layout:
    """How a run's processes hold the training state: ZeRO stage None means whole tensors (one process, or DDP)."""

    num_processes: int
    zero_stage: int | None

    @classmethod
    def of(cls, identity: dict) -> Layout:
        return cls(int(identity["num_processes"]), identity["zero_stage"])

    @property
    def sharded(self) -> bool:
        return self.zero_stage is not None

    def __str__(self) -> str:
        processes = f"{self.num_processes} process{'es' if self.num_processes != 1 else ''}"
        return f"{processes} with ZeRO-{self.zero_stage}" if self.sharded else f"{processes} without DeepSpeed"


def how_to_resume(saved: Layout, current: Layout) -> str:
    """AS_SAVED, TO_DEEPSPEED or TO_WHOLE_TENSORS (see the module docstring)."""
    if saved == current or not (saved.sharded or current.sharded):
        return AS_SAVED
    if 0 in (saved.zero_stage, current.zero_stage):
        raise ElasticResumeError(
            f"The checkpoint was written by {saved}; this run has {current}. DeepSpeed without ZeRO (stage 0) keeps its "
            "optimizer state in its own format, which cannot be carried to another layout: resume with the "
            "checkpoint's layout, or use ZeRO stage 2 or 3 on both sides."
        )
    return TO_DEEPSPEED if current.sharded else TO_WHOLE_TENSORS


def universal_dir(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + UNIVERSAL_SUFFIX)


def optimizer_state_order(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter names in the order of the optimizer's state (torch numbers a state dict's entries by position
    over its parameter groups). Call before accelerate.prepare: DeepSpeed replaces the groups' parameters."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return [names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]


def request_universal_load(accelerator) -> None:
    """Make DeepSpeed load universal checkpoints (before accelerate.prepare builds the engine from the config)."""
    plugin = accelerator.state.deepspeed_plugin
    plugin.deepspeed_config.setdefault("checkpoint", {})["load_universal"] = True


# ----------------------------------------------------------------------------------------------------------------
# Resuming
# ----------------------------------------------------------------------------------------------------------------
def load_resumed(accelerator, model, optimizer, scheduler, checkpoint: Path, saved: Layout, current: Layout,
                 state_order: list[str]) -> None:
    """Model, optimizer, scheduler and RNG states of `checkpoint` into the prepared objects, on this run's layout
    (every rank calls it). For TO_DEEPSPEED, `request_universal_load` must have been called before prepare."""
    how = how_to_resume(saved, current)
    if how == AS_SAVED:
        accelerator.load_state(str(checkpoint))
        if saved != current and accelerator.is_main_process:
            logger.info("Resuming %s, written by %s, on %s: whole tensors load on any layout.", checkpoint.name, saved,
                        current)
        return
    universal = universal_checkpoint(accelerator, checkpoint, saved, state_order, shaped=current.zero_stage in (1, 2))
    started = time.perf_counter()
    if how == TO_DEEPSPEED:
        load_into_deepspeed(model, optimizer, universal)
    else:
        load_into_whole_tensors(accelerator, model, optimizer, universal, state_order)
    load_scheduler_and_rng(accelerator, scheduler, checkpoint)
    if accelerator.is_main_process:
        logger.info("Resumed %s, written by %s, on %s: loaded its universal conversion in %.1f s.", checkpoint.name,
                    saved, current, time.perf_counter() - started)


def load_scheduler_and_rng(accelerator, scheduler, checkpoint: Path) -> None:
    """The parts of accelerate's load_state besides model and optimizer, from the checkpoint itself."""
    from accelerate.checkpointing import load_accelerator_state, load_custom_state

    load_custom_state(scheduler, str(checkpoint), 0)  # our scheduler is accelerate's first registered object
    load_accelerator_state(str(checkpoint), [], [], [], [], accelerator.process_index)  # this rank's RNG states


def load_into_deepspeed(engine, optimizer, universal: Path) -> None:
    """DeepSpeed's universal load, which partitions every weight and moment for this layout."""
    load_path, _ = engine.load_checkpoint(str(universal), tag=TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if load_path is None:
        raise ElasticResumeError(f"DeepSpeed found nothing to load in {universal / TAG}; delete {universal} and run "
                                 "the same command again to convert the checkpoint anew.")
    repair_universal_load(engine, optimizer, universal)


def repair_universal_load(engine, optimizer, universal: Path) -> None:
    """Undo two faults of DeepSpeed's ZeRO-3 universal load (0.19.8), so that the resumed run matches one that never
    stopped (tests/test_elastic.py catches both)."""
    separate_step_counters(engine)
    restore_group_settings(optimizer, universal)


def separate_step_counters(engine) -> None:
    """DeepSpeed gives every parameter group one shared step tensor. AdamW adds 1 to it in place once per group, so
    from the second group on, every step after the resume used the bias correction of a later step."""
    base_optimizer = getattr(engine.optimizer, "optimizer", None)  # torch's AdamW under the ZeRO optimizer
    for state in (base_optimizer.state.values() if base_optimizer is not None else []):
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def restore_group_settings(optimizer, universal: Path) -> None:
    """DeepSpeed gives every parameter group the first group's settings, which would decay biases and norms like
    weights and give LoRA adapters the base learning rate. A same-layout load restores each group's own (learning
    rate, weight decay, betas), and so does this."""
    saved_groups = read_optimizer_globals(universal)["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ElasticResumeError(f"{universal} has {len(saved_groups)} optimizer parameter groups, this run "
                                 f"{len(optimizer.param_groups)}: it was written for another model or LoRA setting.")
    for group, saved in zip(optimizer.param_groups, saved_groups):
        group.update({key: value for key, value in saved.items() if key != "params"})


def read_optimizer_globals(universal: Path) -> dict:
    return torch.load(universal / TAG / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)


def load_into_whole_tensors(accelerator, model, optimizer, universal: Path, state_order: list[str]) -> None:
    """Weights and both Adam moments from the universal conversion into the model and torch's AdamW, in the state
    order torch's optimizer state dict uses (by position over the parameter groups)."""
    zero = universal / TAG / "zero"
    parameters = dict(accelerator.unwrap_model(model).named_parameters())
    saved = read_optimizer_globals(universal)
    state = {}
    with torch.no_grad():
        for index, name in enumerate(state_order):
            parameter, folder = parameters[name], zero / name
            if not folder.is_dir():
                raise ElasticResumeError(f"{universal} has no state for parameter {name}: it was converted from "
                                         "another model. Delete it and run the same command again.")
            parameter.copy_(_universal_tensor(folder / "fp32.pt").view(parameter.shape))
            step = torch.load(folder / "step.pt", weights_only=False)  # every parameter has one (loadable_by_any_stage)
            state[index] = {"step": torch.as_tensor(float(step), dtype=torch.float32),
                            **{key: _universal_tensor(folder / f"{key}.pt").view(parameter.shape).to(parameter.device)
                               for key in ("exp_avg", "exp_avg_sq")}}
    groups, start = [], 0
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
        count = len(group["params"])
        groups.append({**{k: v for k, v in saved_group.items() if k != "params"}, "params": list(range(start, start + count))})
        start += count
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _universal_tensor(path: Path) -> torch.Tensor:
    """A universal checkpoint stores each state either as a tensor or as {"param": tensor, ...}."""
    stored = torch.load(path, map_location="cpu", weights_only=False)
    return (stored["param"] if isinstance(stored, dict) else stored).float()


# ----------------------------------------------------------------------------------------------------------------
# Converting (once per checkpoint; reused while it is the newest)
# ----------------------------------------------------------------------------------------------------------------
def source_stamp(checkpoint: Path) -> str:
    """What identifies the checkpoint a conversion was made from: its manifest's hash (or its marker's, for a
    checkpoint older than manifests). A checkpoint saved again at the same step gets a new stamp."""
    for name in (MANIFEST, COMPLETED_MARKER):
        if (checkpoint / name).is_file():
            return f"{name}:{sha256_file(checkpoint / name)}"
    return "unverified"


def universal_checkpoint(accelerator, checkpoint: Path, saved: Layout, state_order: list[str], shaped: bool) -> Path:
    """The checkpoint's universal conversion: reused when one of this checkpoint is intact, else written crash-safely
    (global rank 0 converts; the ranks hash the result into its manifest). Every rank calls it. `shaped`: every
    tensor in its parameter's shape, which ZeRO-1/2 need (ZeRO-3's converter writes them flat)."""
    target = universal_dir(checkpoint)
    stamp = source_stamp(checkpoint) + (" shaped" if shaped else "")
    if from_main_process(accelerator, lambda: _marker_stamp(target) == stamp):
        problems = folder_problems(target, accelerator)
        if not problems:
            if accelerator.is_main_process:
                logger.info("Reusing %s, the universal conversion of %s.", target, checkpoint.name)
            return target
        if accelerator.is_main_process:
            logger.warning("The universal conversion %s is damaged (%s): converting %s again.", target,
                           describe(problems), checkpoint.name)
    tmp = target.with_name(target.name + ".tmp")
    seconds = main_process_work(accelerator, lambda: _convert(checkpoint, tmp, saved, state_order, shaped),
                                (ElasticResumeError, StorageError),
                                lambda: ElasticResumeError(f"The main process could not convert {checkpoint}."))
    try:
        record_manifest(tmp, accelerator)
    except Exception as error:
        if not is_write_failure(error):
            raise
        raise StorageError(write_failure_message("a universal conversion", tmp, error, _intact(checkpoint)))

    def finish() -> None:
        mark_complete(tmp, source=stamp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        logger.info("Converted %s (%s, %s) to a universal checkpoint in %.1f s: %s (%s).", checkpoint.name, saved,
                    size_text(_folder_bytes(checkpoint)), seconds, target, size_text(_folder_bytes(target)))

    main_process_work(accelerator, finish, (OSError,),
                      lambda: ElasticResumeError(f"The main process could not finish converting {checkpoint}."))
    return target


def _marker_stamp(folder: Path) -> str | None:
    import json

    try:
        return json.loads((folder / COMPLETED_MARKER).read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _intact(checkpoint: Path) -> str:
    return f"{checkpoint} itself is untouched and the same command converts it again"


def _convert(checkpoint: Path, tmp: Path, saved: Layout, state_order: list[str], shaped: bool) -> float:
    """Write the conversion into `tmp` (global rank 0). Returns the seconds it took."""
    started = time.perf_counter()
    problem = free_space_problem(checkpoint.parent, _folder_bytes(checkpoint), "a universal conversion")
    if problem:
        raise StorageError(write_failure_message("a universal conversion", tmp, problem, _intact(checkpoint)))
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if saved.sharded:
            run_ds_to_universal(checkpoint / TAG, tmp / TAG)
        else:
            write_universal_from_whole_tensors(checkpoint, tmp / TAG, state_order)
        loadable_by_any_stage(tmp / TAG)
        if shaped:
            shape_flat_tensors(tmp / TAG)
    except Exception as error:  # every failure becomes one the other ranks hear of (main_process_work)
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_failure(error):
            raise StorageError(write_failure_message("a universal conversion", tmp, error, _intact(checkpoint)))
        if isinstance(error, ElasticResumeError):
            raise
        raise ElasticResumeError(f"Could not convert {checkpoint} to a universal checkpoint: "
                                 f"{type(error).__name__}: {error}") from error
    return time.perf_counter() - started


def loadable_by_any_stage(folder: Path) -> None:
    """Fill in what the other ZeRO stage's universal loader reads, so that a ZeRO-2 checkpoint resumes under ZeRO-3
    and back. ZeRO-3 reads the model-states file of partition rank 0, one step for all parameters and
    `optimizer_state_dict`'s parameter groups; ZeRO-1/2 read the model-parallel rank's model-states file, a step per
    parameter, top-level parameter groups and the DeepSpeed version. ds_to_universal writes one stage's set. The
    ZeRO-3 converter also copies rank 0's whole optimizer partition into optimizer_state.pt, which no loader reads:
    it is dropped (for N processes it is 1/N of the checkpoint)."""
    import deepspeed

    for name in MODEL_STATES:
        if not (folder / name).is_file():
            shutil.copy2(next(folder / other for other in MODEL_STATES if (folder / other).is_file()), folder / name)
    zero = folder / "zero"
    globals_path = zero / "optimizer_state.pt"
    saved = torch.load(globals_path, map_location="cpu", weights_only=False)
    parameters = sorted(path for path in zero.iterdir() if path.is_dir())
    step = saved.get("optimizer_state_dict", {}).get("state", {}).get(0, {}).get("step")
    if step is None:
        step = torch.load(parameters[0] / "step.pt", weights_only=False)
    for parameter in parameters:
        if not (parameter / "step.pt").is_file():
            torch.save(torch.as_tensor(step), parameter / "step.pt")
    groups = saved.get("param_groups") or saved["optimizer_state_dict"]["param_groups"]
    saved.pop("fp32_flat_groups", None)
    saved.update({"optimizer_state_dict": {"state": {0: {"step": step}}, "param_groups": groups},
                  "param_groups": groups})
    saved.setdefault("ds_version", deepspeed.__version__)
    torch.save(saved, globals_path)


def shape_flat_tensors(folder: Path) -> None:
    """Give ZeRO-3's flat universal tensors their parameters' shapes (from the model-states file) in the
    {"param": tensor} form of ZeRO-1/2's loader, which compares each tensor's shape with its parameter's."""
    states = torch.load(folder / MODEL_STATES[0], map_location="cpu", weights_only=False)
    shapes = {name: shape for group in states.get("param_shapes") or [] for name, shape in group.items()}
    for name, shape in shapes.items():
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            path = folder / "zero" / name / f"{key}.pt"
            stored = torch.load(path, map_location="cpu", weights_only=False)
            if not isinstance(stored, dict) or stored["param"].shape != shape:
                tensor = stored["param"] if isinstance(stored, dict) else stored
                torch.save({"param": tensor.view(shape)}, path)


def run_ds_to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's converter, in a process of its own: it forks workers, which a process holding communication
    threads should not do, and its memory is returned when it ends. `--inject_missing_state` supplies (in memory) the
    universal-checkpoint version record that Megatron-DeepSpeed writes and other clients, accelerate among them, do
    not: without it a ZeRO-1/2 checkpoint is refused (DeepSpeed#5405)."""
    workers = max(1, min(8, (os.cpu_count() or 2) // 2))
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
               "--output_folder", str(target), "--num_extract_workers", str(workers),
               "--num_merge_workers", str(max(1, workers // 2)), "--inject_missing_state"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip().splitlines()
        last = output[-1] if output else f"exit status {result.returncode}"
        if "No space left on device" in result.stderr:
            raise OSError(28, f"No space left on device ({last})")
        raise ElasticResumeError(f"DeepSpeed's ds_to_universal could not convert {source}: {last}")


def write_universal_from_whole_tensors(checkpoint: Path, target: Path, state_order: list[str]) -> None:
    """The universal format from a checkpoint of whole tensors (accelerate's model.safetensors and optimizer.bin, as
    one process or DDP saves them): per parameter its fp32 weight, both moments and step; the optimizer's parameter
    groups; and the counters DeepSpeed reads from a model-states file."""
    import deepspeed

    weights = _whole_weights(checkpoint)
    optimizer = torch.load(checkpoint / "optimizer.bin", map_location="cpu", weights_only=False)
    if len(state_order) != sum(len(group["params"]) for group in optimizer["param_groups"]):
        raise ElasticResumeError(f"{checkpoint / 'optimizer.bin'} holds state for another set of trainable "
                                 "parameters than this run's model (another model or LoRA setting).")
    zero = target / "zero"
    for index, name in enumerate(state_order):
        if name not in weights or index not in optimizer["state"]:
            raise ElasticResumeError(f"{checkpoint} has no {'weight' if name not in weights else 'optimizer state'} "
                                     f"for parameter {name}.")
        folder = zero / name
        folder.mkdir(parents=True)
        entry = optimizer["state"][index]
        torch.save({"param": weights[name].float()}, folder / "fp32.pt")
        for key in ("exp_avg", "exp_avg_sq"):
            torch.save({"param": entry[key].float()}, folder / f"{key}.pt")
        torch.save(entry["step"], folder / "step.pt")
    torch.save({"param_groups": optimizer["param_groups"], "ds_version": deepspeed.__version__},
               zero / "optimizer_state.pt")
    step = int(optimizer["state"][0]["step"])
    counters = {"module": None, "dp_world_size": 1, "mp_world_size": 1, "global_steps": step, "global_samples": 0,
                "skipped_steps": 0, "lr_scheduler": None, "ds_version": deepspeed.__version__}
    torch.save(counters, target / MODEL_STATES[0])


def _whole_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    if (checkpoint / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(checkpoint / "model.safetensors"))
    if (checkpoint / "pytorch_model.bin").is_file():
        return torch.load(checkpoint / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ElasticResumeError(f"{checkpoint} has neither model.safetensors nor pytorch_model.bin: it is not a "
                             "checkpoint of whole tensors.")


def remove_stale_conversions(output_dir: Path, newest_step: int) -> list[Path]:
    """Delete the conversions of checkpoints up to `newest_step`, the checkpoint just saved (global rank 0): a resume
    takes the newest checkpoint, so they are no longer needed (each is about the size of its checkpoint)."""
    root = Path(output_dir) / "checkpoints"
    stale = []
    for path in sorted(root.glob(f"step_*{UNIVERSAL_SUFFIX}")) if root.is_dir() else []:
        step = path.name[len("step_"):-len(UNIVERSAL_SUFFIX)]
        if step.isdigit() and int(step) <= newest_step:
            shutil.rmtree(path, ignore_errors=True)
            stale.append(path)
    return stale


# ----------------------------------------------------------------------------------------------------------------
# Before a job starts (mason's plan)
# ----------------------------------------------------------------------------------------------------------------
def resume_plan(output_dir: str | Path, resume_from_checkpoint: str, current: Layout, global_batch: str,
                unit: str = "process") -> str | None:
    """What a job submitted with this layout will resume, as mason's plan shows it: `resuming step 4 of 6 from a
    64-GPU checkpoint (step_3) on 48 GPUs (...)`. `global_batch` is the job's ("128 examples", "65536 tokens"): when
    it differs from the checkpoint's, the line says the resume will be refused and how to keep it. None when the job
    starts from scratch or nothing can be read from here (the trainer decides again when it starts, after checking
    the checkpoint's files)."""
    import json

    if resume_from_checkpoint == "none":
        return None
    checkpoint = Path(resume_from_checkpoint) if resume_from_checkpoint != "auto" else _newest_complete(output_dir)
    if checkpoint is None:
        return None
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        saved = Layout.of(state["identity"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    of_total = f" of {state['total_steps']}" if state.get("total_steps") else ""
    count = f"{current.num_processes} {unit}" + ("" if current.num_processes == 1 else "es" if unit.endswith("s") else "s")
    line = (f"resuming step {state['step'] + 1}{of_total} from a {saved.num_processes}-{unit} checkpoint "
            f"({checkpoint.name}) on {count}")
    saved_batch = state["identity"].get("global_batch")
    if saved_batch and saved_batch != global_batch:
        count, kind = saved_batch.split(" ", 1)
        flag = "--global_batch_tokens" if kind == "tokens" else "--global_batch_size"
        return (f"{line}: refused when the job starts, its global batch is {global_batch}, the checkpoint's "
                f"{saved_batch}. Add `-- {flag} {count}` to keep the run's.")
    try:
        how = how_to_resume(saved, current)
    except ElasticResumeError as error:
        return f"{line}: refused when the job starts. {error}"
    if how == AS_SAVED:
        return line
    stage = lambda layout: f"ZeRO-{layout.zero_stage}" if layout.sharded else "no DeepSpeed"  # noqa: E731
    return (f"{line} ({stage(saved)} -> {stage(current)}: converted to a universal checkpoint when the job starts, "
            "then resharded)")


def _newest_complete(output_dir: str | Path) -> Path | None:
    steps = [int(path.name[len("step_"):]) for path in (Path(output_dir) / "checkpoints").glob("step_*")
             if path.name[len("step_"):].isdigit() and (path / COMPLETED_MARKER).is_file()]
    return Path(output_dir) / "checkpoints" / f"step_{max(steps)}" if steps else None
