"""The trainer's arguments: one typed dataclass, parsed with transformers' HfArgumentParser.

Flag names follow allenai/open-instruct's ``finetune.py`` where one exists. Arguments come from the command line,
from a YAML file (``python -m open_instruct.finetune config.yaml`` or ``--config config.yaml``), or both: command-line
flags override the file. Unknown flags, unknown YAML keys and prefix abbreviations (``--learning`` for
``--learning_rate``) are errors, and so is a flag that the chosen settings would silently ignore.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from transformers import HfArgumentParser

from open_instruct.chat_templates import unknown_template_error
from open_instruct.trackers import report_to_errors

LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "wsd")


def _field(default, help: str, **kwargs):
    """A dataclass field whose help text doubles as its documentation (``--help`` shows it)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class FinetuneArgs:
    """Every setting of one fine-tuning run. Each field's help is its documentation."""

    # --- model and tokenizer ---
    model_name_or_path: str | None = _field(
        None, "Base model: a Hugging Face hub id (org/name) or a local HF model directory. Required."
    )
    model_revision: str | None = _field(None, "Hub revision (branch, tag or commit) of the model.")
    tokenizer_name_or_path: str | None = _field(
        None, "Tokenizer hub id or local directory. Default: the same as --model_name_or_path."
    )
    tokenizer_revision: str | None = _field(None, "Hub revision of the tokenizer.")
    chat_template_name: str | None = _field(
        None,
        "Chat template by name (see open_instruct/chat_templates.py: tulu, simple_chat, chatml). "
        "Default: the tokenizer's own template; a tokenizer without one is an error.",
    )
    # --- data ---
    dataset_mixer_list: list[str] = _field(
        [],
        "Training mixture as pairs 'name amount ...'. name: hub id (org/name[@revision]), local .jsonl/.json/.parquet "
        "file or folder, or synthetic:<task>. amount: with a '.', a fraction of the source (above 1.0 repeats it); "
        "an integer, a row count. Example: --dataset_mixer_list synthetic:spelling 1.0 data/chat.jsonl 500",
    )
    dataset_mixer_list_splits: list[str] = _field(
        ["train"], "Split to read: one for every source, or one per source in mixer order."
    )
    dataset_mixer_file: str | None = _field(
        None,
        "Mixture as a YAML/JSON file instead of --dataset_mixer_list: a list of sources, each with name and amount "
        "and optionally split, format (messages, alpaca, dolly, openorca, sharegpt, prompt_completion) and columns "
        "(field -> the source's column name). See docs/data.md.",
    )
    max_seq_length: int = _field(2048, "Token budget of one example; longer ones follow --truncation.")
    truncation: Literal["whole_turns", "drop", "cut"] = _field(
        "whole_turns",
        "Examples longer than max_seq_length: whole_turns drops trailing messages so the example ends with a complete "
        "assistant turn (rows whose first answer does not fit are dropped); drop drops the row; cut cuts at the "
        "limit (a final answer cut before its end marker is counted in the stats).",
    )
    train_on: Literal["assistant", "last_assistant", "all"] = _field(
        "assistant",
        "Which tokens have a loss: every assistant turn's content and end marker (assistant), only the last "
        "assistant turn (last_assistant), or every token (all).",
    )
    train_reasoning: Literal["all_turns", "last_turn"] = _field(
        "all_turns",
        "Which assistant turns' reasoning (reasoning_content or <think> blocks) has a loss, where the chat template "
        "renders it: every turn (all_turns), or only the last assistant turn's, leaving earlier turns' reasoning as "
        "context (last_turn). Templates that drop earlier reasoning (qwen3) render it only in the last turns anyway.",
    )
    add_bos: bool = _field(False, "Prepend the tokenizer's bos token to each example (when the template does not).")
    skip_bad_rows: bool = _field(
        False, "Skip malformed rows, and JSONL lines that are not UTF-8 or not JSON (counted and reported per "
        "source), instead of stopping at the first one."
    )
    max_unmaskable_fraction: float = _field(
        0.01, "Stop if more than this fraction of a source's rows have assistant spans that cannot be derived."
    )
    dataset_local_cache_dir: str = _field("local_dataset_cache", "Where tokenized mixtures are cached.")
    dataset_skip_cache: bool = _field(False, "Tokenize again instead of reading or writing the cache.")
    dataset_cache_on_damage: Literal["rebuild", "stop"] = _field(
        "rebuild",
        "A cached tokenized mixture whose files no longer match the checksums recorded when it was written: rebuild "
        "warns, naming the cache and the file, and tokenizes again; stop ends the run with that error instead.",
    )
    dataset_num_proc: int | None = _field(
        None, "Most processes tokenizing a source. Default: one per usable core. Either way a source gets no more "
        "than one per 4,000 of its rows (a pool costs more than it saves below that; docs/benchmarks.md).")
    audit_file: str | None = _field(
        None, "Write examples as JSONL with their text split into trained / untrained segments (see docs/data.md)."
    )
    audit_num_examples: int = _field(100, "How many examples --audit_file gets, spread over the sources.")
    # --- batch and optimisation ---
    per_device_train_batch_size: int = _field(1, "Examples per micro-batch on each device.")
    gradient_accumulation_steps: int = _field(
        1, "Micro-batches per optimizer step. Global batch = per-device batch x accumulation x processes."
    )
    global_batch_size: int | None = _field(
        None,
        "Examples per optimizer step, whatever the number of processes; they are split over processes and "
        "--gradient_accumulation_steps micro-steps balancing trained tokens. Replaces --per_device_train_batch_size.",
    )
    global_batch_tokens: int | None = _field(
        None,
        "A token budget per optimizer step instead of a count of examples: each step takes examples of the shuffled "
        "epoch while their tokens fit. Replaces --per_device_train_batch_size.",
    )
    max_tokens_per_micro_batch: int | None = _field(
        None,
        "Padding-free only: each micro-batch is one packed row of at most this many tokens (at least "
        "--max_seq_length), filled by best-fit-decreasing, so the number of micro-steps per optimizer step follows "
        "from the data. Needs --global_batch_size or --global_batch_tokens; replaces --gradient_accumulation_steps.",
    )
    sequence_parallel_size: int = _field(
        1,
        "Processes that share every packed row (DeepSpeed Ulysses sequence parallelism, for rows too long for one "
        "GPU's activations): each holds 1/N of the row, and attention exchanges heads for sequence. The data-parallel "
        "degree is processes / N; the global batch stays the same. Needs DeepSpeed, padding-free rows and an attention "
        "kernel that finds packed examples from position_ids. 1: off. See docs/finetune.md, Sequence parallelism.",
    )
    loss_reduction: Literal["mean", "sum"] = _field(
        "mean",
        "mean: the sum of token losses divided by the trained tokens of the whole global batch (every token weighs "
        "the same whatever the layout). sum: the raw token sum, as the released Tulu-3 8B recipe used (open-instruct's "
        "old reduce_loss sum); its gradient grows with the batch's token count. train_loss is logged per token either way.",
    )
    learning_rate: float = _field(2e-5, "Peak learning rate (AdamW).")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup", "wsd"] = _field(
        "linear",
        "LR schedule after warmup: linear or cosine decay to final_lr_ratio x peak; constant (no warmup); "
        "constant_with_warmup; wsd (warmup, stable, then linear decay over the last warmdown_ratio of steps).",
    )
    warmup_ratio: float = _field(0.03, "Fraction of the optimizer steps spent warming the LR up linearly from 0.")
    final_lr_ratio: float = _field(
        0.0, "LR at the end of a linear, cosine or wsd schedule, as a fraction of the peak."
    )
    warmdown_ratio: float = _field(0.2, "wsd only: fraction of the optimizer steps spent decaying at the end.")
    weight_decay: float = _field(0.0, "AdamW weight decay (not applied to biases and norm weights).")
    clip_grad_norm: float = _field(-1.0, "Clip the global gradient norm to this value; -1 disables clipping.")
    num_train_epochs: int = _field(2, "Passes over the training mixture (ignored where --max_train_steps is set).")
    max_train_steps: int | None = _field(
        None, "Stop after this many optimizer steps; overrides --num_train_epochs when set."
    )
    seed: int = _field(42, "Seeds the mixture sampling, the data order and the model's random state.")
    # --- model features ---
    use_liger_kernel: bool = _field(
        False,
        "Fused kernels: Liger's RMSNorm, RoPE and SwiGLU on CUDA (PyTorch's, the same math, elsewhere), and on every "
        "device a chunked linear cross-entropy that never holds the full [tokens x vocab] logits (open_instruct/loss.py).",
    )
    loss_chunk_size: int = _field(
        1024, "With --use_liger_kernel: trained positions per output-layer call of the chunked loss (memory vs speed; "
        "one chunk holds chunk x vocab fp32 logits, 0.5 GB at 1024 x 128k)."
    )
    padding_free: bool = _field(
        True,
        "Pack each micro-batch into one row without padding; position_ids restart per example so no example "
        "attends to another. --no_padding_free pads each micro-batch to its longest example instead.",
    )
    gradient_checkpointing: bool = _field(False, "Recompute activations in the backward pass to save memory.")
    torch_compile: bool = _field(
        False,
        "Compile each decoder layer's training forward with torch.compile (inductor; regional: parameter names and "
        "checkpoints unchanged, one shared graph for all layers). Dynamic sequence length, so packed rows of new "
        "lengths do not recompile. Costs compile time at the first step (tens of seconds; inductor caches it on disk); "
        "needs a C++ compiler on CPU, triton on CUDA (checked at start-up). See docs/finetune.md, Compilation.",
    )
    attn_implementation: Literal["auto", "packed_sdpa", "sdpa", "eager", "flash_attention_2", "flash_attention_3",
                                 "flex_attention"] = _field(
        "auto",
        "Attention kernel. auto: flash_attention_3, then flash_attention_2 on CUDA when installed, else packed_sdpa "
        "(causal SDPA per packed example: flash-attention's varlen semantics on any device). With "
        "padding-free packing the trainer checks at start-up that packed examples do not attend to each other and "
        "refuses to train otherwise.",
    )
    # --- parameter-efficient fine-tuning (open_instruct/lora.py; see docs/finetune.md, LoRA and QLoRA) ---
    use_lora: bool = _field(
        False, "Train LoRA adapters (peft) on a frozen base instead of every weight. The run directory then holds the "
        "adapter (adapter_config.json, adapter_model.safetensors) and the tokenizer; see --merge_lora_on_save.",
    )
    use_qlora: bool = _field(
        False, "QLoRA: LoRA on a base quantized to 4-bit NF4 by bitsandbytes (double quantization, bf16 compute). "
        "Implies --use_lora. Needs CUDA and the bitsandbytes package; one process or DDP (not DeepSpeed).",
    )
    lora_rank: int = _field(64, "LoRA rank r (open-instruct's default; 16 is the common QLoRA recipe).")
    lora_alpha: float = _field(16.0, "LoRA alpha: the adapter's update is scaled by alpha / rank.")
    lora_dropout: float = _field(0.1, "Dropout on the adapters' input (0 <= p < 1).")
    lora_target_modules: list[str] = _field(
        [], "Module names that get adapters (e.g. q_proj v_proj). Default: every linear projection of the "
        "transformer blocks (peft's all-linear: every nn.Linear but the output layer).",
    )
    lora_modules_to_save: list[str] = _field(
        [], "Modules trained in full next to the adapters and saved with them, e.g. embed_tokens lm_head (when the "
        "chat template's tokens are new to the base model).",
    )
    lora_learning_rate: float | None = _field(
        None, "Peak LR of the adapter weights. Default: --learning_rate, which then also applies to "
        "--lora_modules_to_save.",
    )
    merge_lora_on_save: bool = _field(
        False, "Also write the base model with the adapters merged in (a plain Hugging Face model, in the base's "
        "dtype) to OUTPUT_DIR/merged at the end. The base is loaded again on the CPU of the main process for it.",
    )
    # --- output, checkpoints, hub ---
    output_dir: str = _field("output/", "Where the final model, metrics.jsonl, the config and checkpoints go.")
    exp_name: str = _field("finetune", "Run name: used for tracking and as the default hub revision.")
    checkpointing_steps: str | None = _field(
        None, "Save the full training state every N optimizer steps, or 'epoch' at each epoch end. Default: never."
    )
    keep_last_n_checkpoints: int | None = _field(
        None, "Keep only the newest K checkpoints (older ones are deleted after each save). Default: keep them all."
    )
    resume_from_checkpoint: str = _field(
        "auto",
        "auto: continue from the newest complete checkpoint in --output_dir, if there is one. none: start from "
        "scratch (an output dir that holds checkpoints is then an error). A path: that checkpoint, or an error.",
    )
    force_resume: bool = _field(
        False, "Resume a checkpoint even though its run used other data, model or global batch settings (normally "
        "an error: it would continue a different run)."
    )
    stop_signals: list[str] = _field(
        ["SIGTERM", "SIGINT", "SIGUSR1"],
        "Signals that stop the run cleanly: every process finishes the optimizer step it is in, a checkpoint is saved "
        "(also without --checkpointing_steps) and the trainer exits with status 75; rerunning the same command "
        "continues. A second SIGINT aborts at once. 'none': signals act as without the trainer (SIGKILL-like). See "
        "docs/finetune.md, Failures and recovery.",
    )
    max_wall_time: str | None = _field(
        None,
        "Wall-clock budget of this process (90s, 45m, 4h, 2d, HH:MM:SS or D-HH:MM:SS): the run saves a checkpoint and "
        "stops (exit 75) early enough to finish within it. Inside a Slurm job the job's time limit applies as well, "
        "without this flag. Default: no budget.",
    )
    push_to_hub: bool = _field(
        False,
        "Upload the final model (and its model card) to the Hugging Face Hub, in the background, to a private repo. "
        "The token comes from HF_TOKEN or `hf auth login`, never from a flag.",
    )
    hf_entity: str | None = _field(
        None, "User or organization that owns the hub repo (with --push_to_hub). Default: the logged-in user."
    )
    hf_repo_id: str | None = _field(
        None, "Hub repo for --push_to_hub: name, or org/name. Default: <--hf_entity or your user>/<exp_name>."
    )
    hf_repo_revision: str | None = _field(
        None, "Branch of the hub repo the run uploads to (with --push_to_hub). Default: --exp_name."
    )
    push_checkpoints: bool = _field(
        False, "Also upload each saved checkpoint, to checkpoints/step_N on the run's branch. Needs --push_to_hub and "
        "--checkpointing_steps.",
    )
    # --- evaluation (open_instruct/evaluation.py; see docs/finetune.md) ---
    eval_dataset_mixer_list: list[str] = _field(
        [],
        "Eval loss set as pairs 'name amount ...', the same spec as --dataset_mixer_list; its rows are tokenized "
        "and masked like training rows. Split: see --eval_dataset_mixer_list_splits. Logs eval_loss and "
        "eval_bits_per_byte.",
    )
    eval_dataset_mixer_list_splits: list[str] = _field(
        [],
        "Split of each eval source: one for all, or one per source. Default: 'test' for synthetic and hub sources "
        "(synthetic tasks' held-out split); a local file is read whole.",
    )
    eval_fraction: float | None = _field(
        None,
        "Hold out this fraction (0 < f < 1) of the training mixture's distinct examples as the eval loss set; they are "
        "removed from training. Chosen by a seeded hash of each example's tokens: a pure function of the mixture and "
        "--seed (copies of a repeated row all fall on the same side). Instead of --eval_dataset_mixer_list.",
    )
    eval_tasks: list[str] = _field(
        [],
        "Accuracy tasks: synthetic task names (spelling, reverse, letter_count, arithmetic: greedy generation, exact "
        "match on their held-out test split; tool_calc: logged as tool_calc_call, the generated call parses as JSON "
        "with the right tool and arguments, and tool_calc_answer, the answer after the tool's result; reasoning: the "
        "answer after </think>) and mc:<file.jsonl> (multiple choice, fields question, choices, answer "
        "as index or letter: the option with the highest log-likelihood as the assistant reply wins).",
    )
    eval_every: int | None = _field(
        None,
        "Evaluate every N optimizer steps. With any eval set the run is always evaluated before training (step 0, "
        "not repeated on resume) and after the last step.",
    )
    eval_max_examples: int | None = _field(
        None, "At most this many examples per task and in the eval loss set (a seeded sample of it). Default: all."
    )
    eval_batch_size: int | None = _field(
        None,
        "Examples per eval forward pass (and prompts per generate call) on each device. Default: "
        "--per_device_train_batch_size. Without --use_liger_kernel a forward holds the batch's full logits.",
    )
    # --- logging ---
    logging_steps: int = _field(1, "Log metrics every N optimizer steps (console and metrics.jsonl).")
    peak_tflops: float | None = _field(
        None, "Peak dense TFLOP/s of one device, for MFU. Default: NVIDIA's datasheet bf16 figure for H100, H200, "
        "A100 and L40S; a matrix-multiply measurement on CPU; no MFU on other devices."
    )
    with_tracking: bool = _field(False, "Also send metrics and the resolved config to an experiment tracker.")
    report_to: list[str] = _field(
        ["wandb"], "Trackers for --with_tracking, one or more of wandb, tensorboard, mlflow, trackio (e.g. --report_to "
        "wandb tensorboard); each gets the same metrics and config. tensorboard writes OUTPUT_DIR/tensorboard; mlflow "
        "MLFLOW_TRACKING_URI or file:OUTPUT_DIR/mlruns; trackio TRACKIO_DIR or OUTPUT_DIR/trackio. Install them with "
        "pip install 'open-instruct-sft[trackers]'."
    )
    wandb_project_name: str = _field("open_instruct_internal", "wandb project (with --with_tracking); also the "
                                     "tensorboard folder, the mlflow experiment and the trackio project.")
    wandb_entity: str | None = _field(None, "wandb entity (team or user) (with --with_tracking).")

    def __post_init__(self):
        validate(self)

    @property
    def checkpoint_every_epoch(self) -> bool:
        return self.checkpointing_steps == "epoch"

    @property
    def checkpoint_every_n_steps(self) -> int | None:
        if self.checkpointing_steps is None or self.checkpointing_steps == "epoch":
            return None
        return int(self.checkpointing_steps)


class ArgumentError(ValueError):
    """A setting is wrong; the message names the flag and how to fix it."""


def default_values() -> dict:
    """Every flag's default."""
    values = {}
    for f in dataclasses.fields(FinetuneArgs):
        values[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return values


def _changed(args: FinetuneArgs, name: str) -> bool:
    return getattr(args, name) != default_values()[name]


def validate(args: FinetuneArgs) -> None:
    """Reject values that are out of range and flags that the other settings would ignore."""
    errors = []
    if not args.model_name_or_path:
        errors.append("--model_name_or_path is required (a hub id or a local model directory).")
    if not args.dataset_mixer_list and not args.dataset_mixer_file:
        errors.append("--dataset_mixer_list (or --dataset_mixer_file) is required, e.g. "
                      "--dataset_mixer_list synthetic:spelling 1.0")
    for name in ("max_seq_length", "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps",
                 "num_train_epochs", "max_train_steps", "global_batch_size", "global_batch_tokens",
                 "max_tokens_per_micro_batch", "sequence_parallel_size"):
        value = getattr(args, name)  # the optional ones are None when not given
        if value is not None and value < 1:
            errors.append(f"--{name} must be at least 1, got {value}.")
    errors += _batch_layout_errors(args)
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        errors.append(f"--peak_tflops must be positive, got {args.peak_tflops}.")
    if args.learning_rate <= 0:
        errors.append(f"--learning_rate must be positive, got {args.learning_rate}.")
    if args.loss_chunk_size < 1:
        errors.append(f"--loss_chunk_size must be at least 1, got {args.loss_chunk_size}.")
    if not args.use_liger_kernel and _changed(args, "loss_chunk_size"):
        errors.append("--loss_chunk_size has no effect without --use_liger_kernel.")
    if args.dataset_num_proc is not None and args.dataset_num_proc < 1:
        errors.append(f"--dataset_num_proc must be at least 1, got {args.dataset_num_proc}.")
    if args.audit_num_examples < 1:
        errors.append(f"--audit_num_examples must be at least 1, got {args.audit_num_examples}.")
    if args.dataset_skip_cache and _changed(args, "dataset_cache_on_damage"):
        errors.append("--dataset_cache_on_damage has no effect with --dataset_skip_cache (no cache is read).")
    if not args.audit_file and _changed(args, "audit_num_examples"):
        errors.append("--audit_num_examples has no effect without --audit_file.")
    for name in ("warmup_ratio", "final_lr_ratio", "warmdown_ratio", "max_unmaskable_fraction"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            errors.append(f"--{name} must be between 0 and 1, got {getattr(args, name)}.")
    if args.clip_grad_norm != -1 and args.clip_grad_norm <= 0:
        errors.append(f"--clip_grad_norm must be positive, or -1 to disable clipping; got {args.clip_grad_norm}.")
    if args.weight_decay < 0:
        errors.append(f"--weight_decay must be non-negative, got {args.weight_decay}.")
    if args.checkpointing_steps is not None and args.checkpointing_steps != "epoch":
        if not args.checkpointing_steps.isdigit() or int(args.checkpointing_steps) < 1:
            errors.append(f"--checkpointing_steps must be a positive integer or 'epoch', got {args.checkpointing_steps!r}.")
    if args.keep_last_n_checkpoints is not None:
        if args.keep_last_n_checkpoints < 1:
            errors.append(f"--keep_last_n_checkpoints must be at least 1, got {args.keep_last_n_checkpoints}.")
        if args.checkpointing_steps is None:
            errors.append("--keep_last_n_checkpoints has no effect without --checkpointing_steps.")
    errors += _stop_errors(args)
    if args.force_resume and args.resume_from_checkpoint == "none":
        errors.append("--force_resume has no effect with --resume_from_checkpoint none.")
    template_error = unknown_template_error(args.chat_template_name) if args.chat_template_name else None
    if template_error:  # checked here, not when the tokenizer loads
        errors.append(template_error)
    if args.with_tracking:  # a missing package fails here, before the data or the model
        errors += report_to_errors(args.report_to)
    # Flags that would be accepted and then ignored are errors: say which setting makes them do nothing.
    # A value that says what the schedule already does (no warmup, no warmdown, ending at the peak) is not refused.
    if args.lr_scheduler_type != "wsd" and _changed(args, "warmdown_ratio") and args.warmdown_ratio > 0:
        errors.append("--warmdown_ratio only applies to --lr_scheduler_type wsd.")
    if (args.lr_scheduler_type in ("constant", "constant_with_warmup") and _changed(args, "final_lr_ratio")
            and args.final_lr_ratio != 1.0):
        errors.append(f"--final_lr_ratio has no effect with --lr_scheduler_type {args.lr_scheduler_type} (the LR "
                      "ends at its peak).")
    if args.lr_scheduler_type == "constant" and _changed(args, "warmup_ratio") and args.warmup_ratio > 0:
        errors.append("--warmup_ratio has no effect with --lr_scheduler_type constant; use constant_with_warmup.")
    if not args.with_tracking:
        for name in ("wandb_project_name", "wandb_entity", "report_to"):
            if _changed(args, name):
                errors.append(f"--{name} has no effect without --with_tracking.")
    errors += _hub_errors(args)
    errors += _eval_errors(args)
    errors += _lora_errors(args)
    if errors:
        raise ArgumentError("Invalid arguments:\n  " + "\n  ".join(errors))


def _stop_errors(args: FinetuneArgs) -> list[str]:
    import signal

    from open_instruct.preemption import parse_duration

    errors = []
    if args.max_wall_time is not None:
        try:
            if parse_duration(args.max_wall_time) <= 0:
                errors.append(f"--max_wall_time must be positive, got {args.max_wall_time}.")
        except ValueError as exc:
            errors.append(f"--max_wall_time: {exc}.")
    names = [] if args.stop_signals == ["none"] else args.stop_signals
    for name in names:
        if name not in signal.Signals.__members__ or name in ("SIGKILL", "SIGSTOP"):
            errors.append(f"--stop_signals {name}: not a signal the trainer can catch; use names like SIGTERM SIGUSR1, "
                          "or none.")
    return errors


def _hub_errors(args: FinetuneArgs) -> list[str]:
    if not args.push_to_hub:
        return [f"--{name} has no effect without --push_to_hub."
                for name in ("hf_entity", "hf_repo_id", "hf_repo_revision", "push_checkpoints") if _changed(args, name)]
    errors = []
    if args.hf_repo_id is not None and (args.hf_repo_id.count("/") > 1 or not all(args.hf_repo_id.split("/"))):
        errors.append(f"--hf_repo_id must be a name or org/name, got {args.hf_repo_id!r}.")
    if args.hf_entity and args.hf_repo_id and "/" in args.hf_repo_id:
        errors.append(f"--hf_entity {args.hf_entity} and --hf_repo_id {args.hf_repo_id} both name the owner; give "
                      "the owner once (--hf_repo_id name with --hf_entity, or --hf_repo_id org/name alone).")
    if args.push_checkpoints and args.checkpointing_steps is None:
        errors.append("--push_checkpoints needs --checkpointing_steps (no checkpoints are saved without it).")
    return errors


def has_eval(args: FinetuneArgs) -> bool:
    return bool(args.eval_dataset_mixer_list or args.eval_fraction is not None or args.eval_tasks)


def _eval_errors(args: FinetuneArgs) -> list[str]:
    from open_instruct.synthetic import TASKS  # light: the task generators only

    errors = []
    for name in ("eval_every", "eval_max_examples", "eval_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            errors.append(f"--{name} must be at least 1, got {value}.")
        if value is not None and not has_eval(args):
            errors.append(f"--{name} has no effect without an eval set (--eval_dataset_mixer_list, --eval_fraction "
                          "or --eval_tasks).")
    if args.eval_fraction is not None and not 0.0 < args.eval_fraction < 1.0:
        errors.append(f"--eval_fraction must be between 0 and 1 (exclusive), got {args.eval_fraction}.")
    if args.eval_fraction is not None and args.eval_dataset_mixer_list:
        errors.append("--eval_fraction and --eval_dataset_mixer_list are two eval loss sets; give one.")
    if args.eval_dataset_mixer_list_splits and not args.eval_dataset_mixer_list:
        errors.append("--eval_dataset_mixer_list_splits has no effect without --eval_dataset_mixer_list.")
    for task in args.eval_tasks:
        if task not in TASKS and not (task.startswith("mc:") and task.endswith(".jsonl")):
            errors.append(f"--eval_tasks {task!r}: use a synthetic task ({', '.join(sorted(TASKS))}) or "
                          "mc:<file.jsonl>.")
    if len(set(args.eval_tasks)) != len(args.eval_tasks):
        errors.append(f"--eval_tasks names a task twice: {' '.join(args.eval_tasks)}.")
    return errors


def uses_lora(args) -> bool:
    return bool(args.use_lora or args.use_qlora)


def describe_fine_tune(args) -> str:
    """One line for the summary and the model card: which weights train."""
    if not uses_lora(args):
        return "full (every weight)"
    kind = "QLoRA (4-bit NF4 base)" if args.use_qlora else "LoRA"
    targets = " ".join(args.lora_target_modules) or "all linear projections"
    saved = f", plus {' '.join(args.lora_modules_to_save)} in full" if args.lora_modules_to_save else ""
    return f"{kind}, rank {args.lora_rank}, alpha {args.lora_alpha:g}, dropout {args.lora_dropout:g}, on {targets}{saved}"


def _lora_errors(args: FinetuneArgs) -> list[str]:
    lora_flags = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save",
                  "lora_learning_rate", "merge_lora_on_save")
    if not uses_lora(args):
        return [f"--{name} has no effect without --use_lora (or --use_qlora)." for name in lora_flags
                if _changed(args, name)]
    errors = []
    if args.lora_rank < 1:
        errors.append(f"--lora_rank must be at least 1, got {args.lora_rank}.")
    if args.lora_alpha <= 0:
        errors.append(f"--lora_alpha must be positive, got {args.lora_alpha}.")
    if not 0.0 <= args.lora_dropout < 1.0:
        errors.append(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}.")
    if args.lora_learning_rate is not None:
        if args.lora_learning_rate <= 0:
            errors.append(f"--lora_learning_rate must be positive, got {args.lora_learning_rate}.")
        if not args.lora_modules_to_save and _changed(args, "learning_rate"):
            errors.append("--learning_rate has no effect with --lora_learning_rate and no --lora_modules_to_save "
                          "(the adapters are all that trains); give one of the two.")
    return errors


def _batch_layout_errors(args: FinetuneArgs) -> list[str]:
    """The global batch is given one way, and the micro-batch flags that a layout would ignore are errors."""
    errors = []
    by_total = args.global_batch_size is not None or args.global_batch_tokens is not None
    if args.global_batch_size is not None and args.global_batch_tokens is not None:
        errors.append("--global_batch_size and --global_batch_tokens are two definitions of the global batch; give one.")
    if by_total and _changed(args, "per_device_train_batch_size"):
        errors.append("--per_device_train_batch_size has no effect with --global_batch_size/--global_batch_tokens "
                      "(the global batch is split over processes and micro-steps by tokens).")
    if args.sequence_parallel_size > 1 and not args.padding_free:
        errors.append(f"--sequence_parallel_size {args.sequence_parallel_size} splits packed rows, so it needs "
                      "--padding_free.")
    if args.max_tokens_per_micro_batch is not None:
        if not args.padding_free:
            errors.append("--max_tokens_per_micro_batch packs rows, so it needs --padding_free.")
        if not by_total:
            errors.append("--max_tokens_per_micro_batch needs --global_batch_size or --global_batch_tokens.")
        if _changed(args, "gradient_accumulation_steps"):
            errors.append("--gradient_accumulation_steps has no effect with --max_tokens_per_micro_batch (the number "
                          "of packed rows sets the micro-steps).")
        if args.max_tokens_per_micro_batch < args.max_seq_length:
            errors.append(f"--max_tokens_per_micro_batch ({args.max_tokens_per_micro_batch}) must be at least "
                          f"--max_seq_length ({args.max_seq_length}) so every example fits in a row.")
    return errors


def _load_yaml(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ArgumentError(f"Config file {path} does not exist.")
    from open_instruct.data import DataError, read_utf8

    try:
        values = yaml.safe_load(read_utf8(file)) or {}
    except DataError as exc:
        raise ArgumentError(f"Config file {exc}") from None
    except yaml.YAMLError as exc:
        raise ArgumentError(f"Config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(values, dict):
        raise ArgumentError(f"Config file {path} must be a mapping of flag names to values.")
    known = {f.name for f in dataclasses.fields(FinetuneArgs)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ArgumentError(f"Config file {path} has unknown keys: {', '.join(unknown)}. See --help for the names.")
    return values


def _split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """Find the YAML config: a leading positional '*.yaml' / '*.yml', or --config PATH / --config=PATH."""
    if argv and not argv[0].startswith("-") and argv[0].endswith((".yaml", ".yml")):
        return argv[0], argv[1:]
    for i, token in enumerate(argv):
        if token == "--config":
            if i + 1 >= len(argv):
                raise ArgumentError("--config needs a path to a YAML file.")
            return argv[i + 1], argv[:i] + argv[i + 2:]
        if token.startswith("--config="):
            return token.split("=", 1)[1], argv[:i] + argv[i + 1:]
    return None, argv


def build_parser(exit_on_error: bool = True) -> HfArgumentParser:
    parser = HfArgumentParser(FinetuneArgs, allow_abbrev=False, exit_on_error=exit_on_error)
    parser.prog = "python -m open_instruct.finetune"
    return parser


def _yaml_to_argv(values: dict) -> list[str]:
    """YAML values as command-line tokens, so they are typed and checked exactly like flags."""
    tokens = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, list):
            tokens += [f"--{key}", *(str(v) for v in value)]
        elif isinstance(value, bool):
            tokens += [f"--{key}", str(value).lower()]
        else:
            tokens += [f"--{key}", str(value)]
    return tokens


def _check_yaml_types(path: str, values: dict) -> None:
    """Parse each YAML value on its own, so that a wrong type names the file and the key (once merged with the
    command line, argparse could only name the flag)."""
    parser = build_parser(exit_on_error=False)
    hints = typing.get_type_hints(FinetuneArgs)
    for key, value in values.items():
        takes_list = typing.get_origin(hints[key]) is list
        if isinstance(value, dict) or (isinstance(value, list) and not takes_list):
            raise ArgumentError(f"Config file {path}: {key}: expected a single value, got {value!r}.")
        try:
            parser.parse_known_args(_yaml_to_argv({key: value}))
        except argparse.ArgumentError as exc:
            raise ArgumentError(f"Config file {path}: {key}: {exc.message}") from None


def parse_args(argv: list[str] | None = None) -> FinetuneArgs:
    """Parse the command line (and an optional YAML file) into FinetuneArgs; exits with a message on a bad flag."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path, argv = _split_config(argv)
    parser = build_parser()
    if config_path:
        try:
            values = _load_yaml(config_path)
            _check_yaml_types(config_path, values)
        except ArgumentError as exc:  # one line: the usage lists the flags, which says nothing about the file
            parser.exit(2, f"{parser.prog}: error: {exc}\n")
        argv = _yaml_to_argv(values) + argv  # later (command-line) flags win
    try:
        args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ArgumentError as exc:
        parser.error(str(exc))
    if unknown:
        parser.error(_unknown_flags_message(unknown))
    return args


def _unknown_flags_message(unknown: list[str]) -> str:
    known = [f"--{f.name}" for f in dataclasses.fields(FinetuneArgs)]
    lines = [f"unrecognized arguments: {' '.join(unknown)}"]
    for token in unknown:
        if token.startswith("--"):
            close = difflib.get_close_matches(token.split("=", 1)[0], known, n=1)
            if close:
                lines.append(f"{token}: did you mean {close[0]}?")
    return "\n".join(lines)


def args_to_dict(args: FinetuneArgs) -> dict:
    return dataclasses.asdict(args)


def describe_global_batch(args: FinetuneArgs, num_processes: int | None) -> str:
    """How big one optimizer step is, in the user's terms (model card, mason's launch plan); None: processes unknown."""
    if args.global_batch_tokens is not None:
        return f"{args.global_batch_tokens} tokens per optimizer step (--global_batch_tokens)"
    if args.global_batch_size is not None:
        return f"{args.global_batch_size} examples per optimizer step (--global_batch_size)"
    per_device = (f"{args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} accumulation "
                  "steps")
    if num_processes is None:
        return f"{per_device} x the number of processes, in examples per optimizer step"
    replicas = num_processes // args.sequence_parallel_size
    total = global_batch_examples(args, num_processes)
    who = (f"{replicas} data-parallel replica{'s' if replicas != 1 else ''} ({num_processes} processes / sequence "
           f"parallel {args.sequence_parallel_size})" if args.sequence_parallel_size > 1
           else f"{num_processes} process{'es' if num_processes != 1 else ''}")
    return f"{per_device} x {who} = {total} examples per optimizer step"


def global_batch_examples(args: FinetuneArgs, num_processes: int) -> int | None:
    """Examples per optimizer step as the trainer resolves them (finetune.make_plan); None for a token budget."""
    if args.global_batch_tokens is not None:
        return None
    replicas = num_processes // args.sequence_parallel_size  # a sequence-parallel group trains one share together
    return args.global_batch_size or args.per_device_train_batch_size * args.gradient_accumulation_steps * replicas
