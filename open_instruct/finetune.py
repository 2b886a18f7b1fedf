"""Supervised fine-tuning of a causal LM on a chat mixture: accelerate + DeepSpeed ZeRO-3, one readable loop.

Single process (CPU or one GPU):
    python -m open_instruct.finetune --model_name_or_path output/tiny-llama \
        --dataset_mixer_list synthetic:spelling 1.0 --output_dir output/run

Several processes with DeepSpeed ZeRO-3 (CPU uses gloo; GPUs use NCCL):
    accelerate launch --num_processes 2 --use_deepspeed \
        --deepspeed_config_file configs/ds_configs/stage3_no_offloading_accelerate.conf \
        -m open_instruct.finetune config.yaml

Every flag is documented in open_instruct/args.py (or `--help`). The run directory receives the final model in
Hugging Face format, metrics.jsonl, run_config.yaml, environment.json, dataset_stats.json, summary.json, any
checkpoints and, with --push_to_hub, README.md (the model card). Run the same command again after a crash or
preemption and it continues from the newest complete checkpoint (--resume_from_checkpoint auto), exactly as if it
had not stopped.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, gather_object, set_seed
from tqdm.auto import tqdm

from open_instruct import hub
from open_instruct.args import FinetuneArgs, args_to_dict, describe_fine_tune, parse_args, uses_lora
from open_instruct.batching import BatchPlan, StepCounts, collate, pinned_for_cuda, split_global_batch
from open_instruct.checkpointing import (
    CheckpointError,
    Checkpointer,
    check_resumable,
    checkpoint_bytes_estimate,
    newest_intact_description,
    prune_checkpoints,
    remove_unfinished_saves,
    run_identity,
    verified_checkpoint_to_resume,
)
from open_instruct.compile import check_compile_support, compile_decoder_layers, gather_whole_layers_under_zero3
from open_instruct.data import DataError, TokenizedMixture
from open_instruct.elastic import (
    TO_DEEPSPEED,
    ElasticResumeError,
    Layout,
    how_to_resume,
    load_resumed,
    optimizer_state_order,
    request_universal_load,
)
from open_instruct.evaluation import eval_summary, prepare_evaluation
from open_instruct.flops import FlopsModel, parameter_numel, peak_flops
from open_instruct.final_model import check_room, save_final
from open_instruct.launch import LaunchError, read_deepspeed_config
from open_instruct.lora import check_lora_setup, load_with_adapters
from open_instruct.loss import chunks_per_micro_step, scale_for_backward, token_loss_sum
from open_instruct.metrics import MetricsLogger, RunCounters, peak_memory_gb
from open_instruct.model_utils import (
    ChunkedLossModel,
    ModelSetupError,
    attention_implementation,
    packed_examples_stay_apart,
    load_tokenizer,
    pad_token_id,
)
from open_instruct.optim import build_optimizer, build_scheduler
from open_instruct.parallel_dims import ParallelDims, ParallelLayoutError  # noqa: F401 (user errors)
from open_instruct.preemption import RunStopped, StopRequests, stop_requests_for, stop_run
from open_instruct.prepare_data import prepare
from open_instruct.ranks import end_run, exit_process, main_process_work
from open_instruct.report import write_run_report
from open_instruct.run_info import node_name, write_run_record
from open_instruct.run_lock import RunLock, RunLockError
from open_instruct.sequence_parallel import launched_dims, parallelism_config, shard_row
from open_instruct.source_checks import check_run_sources
from open_instruct.storage import StorageError, failed_write, write_text
from open_instruct.trackers import accelerator_tracking, init_tracking

logger = logging.getLogger("open_instruct.finetune")
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
USER_ERRORS = (DataError, hub.HubError, ModelSetupError, CheckpointError, LaunchError, StorageError, RunLockError,
               ElasticResumeError, ParallelLayoutError)


# ----------------------------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------------------------
def configure_cuda_allocator() -> None:
    """Expandable segments for PyTorch's CUDA caching allocator, unless the user set their own configuration.

    Packed rows change length every micro-step, and so do the logits and activations; expandable segments let the
    cache grow segments in place instead of fragmenting into blocks of past sizes (PyTorch's advice for varying
    shapes). The H100 benchmark ran with no allocation retries this way; it was not measured without. Must run before
    the first CUDA allocation.
    """
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def skip_deepspeed_cpu_inference_comm() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory all-reduce when it starts on CPU.

    DeepSpeed builds that C++ extension at start-up on every CPU run, but only its inference all-reduce uses it;
    training never does. The build costs ~25 s per new environment, and it waits on a lock file in the torch extensions
    cache: a run killed mid-build leaves the lock behind and every later CPU run hung there silently (this stalled CI
    for 30 minutes). Marking the op incompatible makes DeepSpeed skip it, as it does on machines without a compiler.
    """
    try:
        import deepspeed.ops
    except ImportError:
        return
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict) and "deepspeed_shm_comm" in compatible:
        compatible["deepspeed_shm_comm"] = False


def check_deepspeed_config_file() -> None:
    """`accelerate launch --use_deepspeed --deepspeed_config_file X` hands X to each worker, whose Accelerator() would
    fail on a missing or broken file with a traceback; check it first and name it."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")  # read as accelerate reads them
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and path != "none":
        read_deepspeed_config(path)


def build_accelerator(args: FinetuneArgs) -> Accelerator:
    check_deepspeed_config_file()
    dims = launched_dims(args)  # sequence parallelism's start-up errors come here, before the data or the model
    handlers = [InitProcessGroupKwargs(timeout=timedelta(hours=2))]
    if not torch.cuda.is_available():
        skip_deepspeed_cpu_inference_comm()
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Without this accelerate leaves a CPU DeepSpeed run thinking it has one process while DeepSpeed has many.
        handlers = [InitProcessGroupKwargs(backend="gloo", timeout=timedelta(hours=2))]
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        **accelerator_tracking(args),
        kwargs_handlers=handlers,
        parallelism_config=parallelism_config(dims, attention_implementation(args.attn_implementation)),
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise ModelSetupError(
            f"The launcher started {launched} processes but accelerate sees {accelerator.num_processes}; on a CPU-only "
            "machine launch several processes with --use_deepspeed, or with torchrun and ACCELERATE_USE_CPU=true."
        )
    configure_deepspeed(accelerator, args)
    return accelerator


def configure_deepspeed(accelerator: Accelerator, args: FinetuneArgs) -> None:
    """Fill the DeepSpeed config's batch and clipping entries from our flags; a conflicting explicit value is an error."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    wanted = {
        "train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        # DeepSpeed counts micro-batches per data-parallel replica: a sequence-parallel group shares each one
        "train_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps
        * accelerator.num_processes // args.sequence_parallel_size,
        "gradient_clipping": args.clip_grad_norm if args.clip_grad_norm > 0 else 0.0,
    }
    for key, value in wanted.items():
        current = plugin.deepspeed_config.get(key, "auto")
        if current != "auto" and current != value:
            raise ValueError(f"DeepSpeed config sets {key}={current} but the flags give {value}; set it to \"auto\".")
        plugin.deepspeed_config[key] = value
    zero = plugin.deepspeed_config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        # The final save gathers the full weights from the shards; without this accelerate refuses to.
        zero["stage3_gather_16bit_weights_on_model_save"] = True


def setup_logging(accelerator: Accelerator) -> None:
    level = logging.INFO if accelerator.is_main_process else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=level,
                        force=True)
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_warning() if accelerator.is_main_process else transformers.utils.logging.set_verbosity_error()
    if not accelerator.is_main_process:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def prepare_output_dir(args: FinetuneArgs, accelerator: Accelerator) -> tuple[Path, RunLock | None]:
    """Check that the output directory can be written (before anything expensive), take its lock (one run per
    directory; global rank 0 holds it) and clear unfinished checkpoint saves of a killed run. Returns the directory
    and, on the main process, the lock to release at the end."""
    output = Path(args.output_dir)

    def take() -> RunLock:
        try:
            output.mkdir(parents=True, exist_ok=True)
            probe = output / ".write_probe"
            probe.write_text("")
            probe.unlink()
        except OSError as error:
            raise CheckpointError(f"--output_dir {output} cannot be written ({error}); choose a writable directory.")
        lock = RunLock(output).acquire()
        for stale in remove_unfinished_saves(output):
            logger.warning("Removed %s: a checkpoint save that never finished.", stale)
        return lock

    lock = main_process_work(accelerator, take, (CheckpointError, RunLockError),
                             lambda: RunLockError(f"The main process could not take --output_dir {output}."))
    return output, lock


def record_run(args: FinetuneArgs, accelerator: Accelerator, output: Path, stats: list[dict]) -> None:
    """run_config.yaml, environment.json and dataset_stats.json, written once training is about to start (a resumed
    run rewrites them), so that a run that failed while setting up leaves nothing that looks like a run."""
    nodes = gather_object([node_name()])  # every rank takes part; the record shows which machines joined the run

    def write() -> None:
        intact = newest_intact_description(output)
        write_run_record(output, args, accelerator.num_processes, nodes, intact)
        write_text(output / "dataset_stats.json", json.dumps(stats, indent=2), "dataset_stats.json", intact)

    main_process_work(accelerator, write, (StorageError,),
                      lambda: StorageError(f"The main process could not write the run's records to {output}."))


def model_dtype(accelerator: Accelerator, args: FinetuneArgs) -> torch.dtype:
    # DeepSpeed keeps its own fp32 master copy, so its bf16 runs load bf16 weights; otherwise accelerate autocasts.
    # A LoRA base is frozen and needs no fp32 master either (peft keeps the adapters in fp32).
    if accelerator.mixed_precision == "bf16" and (accelerator.state.deepspeed_plugin is not None or uses_lora(args)):
        return torch.bfloat16
    return torch.float32


def zero_stage(accelerator: Accelerator) -> int | None:
    plugin = accelerator.state.deepspeed_plugin
    return None if plugin is None else int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def global_batch_description(plan: BatchPlan) -> str:
    return f"{plan.global_batch_size} examples" if plan.global_batch_size else f"{plan.global_batch_tokens} tokens"


def make_plan(args: FinetuneArgs, dims: ParallelDims, mixture: TokenizedMixture) -> tuple[BatchPlan, int]:
    if args.global_batch_tokens is not None:
        plan = BatchPlan(len(mixture), None, args.seed, global_batch_tokens=args.global_batch_tokens,
                         lengths=mixture.lengths)
        size = f"{args.global_batch_tokens} tokens"
    else:
        examples = args.global_batch_size or (
            args.per_device_train_batch_size * args.gradient_accumulation_steps * dims.data_parallel)
        plan, size = BatchPlan(len(mixture), examples, args.seed), f"{examples} examples"
    if plan.steps_per_epoch == 0:
        raise ValueError(
            f"The mixture has {len(mixture)} examples ({int(mixture.lengths.sum())} tokens), less than one global batch "
            f"({size}). Add data or shrink the global batch."
        )
    total_steps = args.max_train_steps or plan.total_steps(args.num_train_epochs)
    return plan, total_steps


# ----------------------------------------------------------------------------------------------------------------
# One optimizer step
# ----------------------------------------------------------------------------------------------------------------
def micro_batches(mixture: TokenizedMixture, plan: BatchPlan, step: int, args: FinetuneArgs, dims: ParallelDims,
                  pad_id: int) -> tuple[list[dict], StepCounts]:
    """This process's micro-batches of optimizer step `step`: its data-parallel replica's share of the global batch
    (see batching.split_global_batch) and, under sequence parallelism, its piece of each row (shard_row); and the
    step's token counts over every process, computed here on the host (batching.StepCounts)."""
    row_tokens = args.max_tokens_per_micro_batch if args.padding_free else None
    split = split_global_batch(plan.global_batch(step), mixture.lengths, dims.data_parallel,
                               args.gradient_accumulation_steps, trained=mixture.trained_lengths,
                               micro_batch_tokens=row_tokens, padded=not args.padding_free)
    counts = StepCounts.of(split, mixture.lengths, mixture.trained_lengths, args.padding_free, dims.dp_rank,
                           dims.sequence_parallel)
    batches = [collate(*mixture.examples(share), args.padding_free, pad_id) if share else collate([], [], True, pad_id)
               for share in split[dims.dp_rank]]
    collated = sum(batch["num_trained_tokens"] for batch in batches)
    if collated != counts.local_trained:  # the cache's per-example counts must be what collation trains
        raise DataError(f"Step {step + 1}: the tokenized cache counts {counts.local_trained} trained tokens for this "
                        f"process's examples but they hold {collated}; delete the cache and prepare the data again.")
    if dims.sp_enabled:
        batches = [shard_row(batch, dims.sequence_parallel, dims.sp_rank, pad_id) for batch in batches]
    return [pinned_for_cuda(batch) for batch in batches], counts


def train_step(accelerator: Accelerator, model, optimizer, batches: list[dict], counts: StepCounts,
               args: FinetuneArgs) -> dict:
    """Forward/backward every micro-batch of this process, then one optimizer step. Returns global step metrics.

    `counts` (from micro_batches) are the whole step's, so the loss is normalized without waiting for the GPU."""
    trained = counts.trained
    normalizer = trained if args.loss_reduction == "mean" else 1  # sum: the raw token sum, as Tulu-3 8B was trained
    chunks = (chunks_per_micro_step(accelerator, batches, counts.micro_step_trained, args.loss_chunk_size)
              if args.use_liger_kernel else [None] * len(batches))
    loss_sum_local = torch.zeros((), device=accelerator.device)
    grad_norm = None
    # The micro-steps of this optimizer step (fixed, or as many packed rows as the data needs): accelerate syncs and
    # steps after the last one.
    accelerator.gradient_accumulation_steps, accelerator.step = len(batches), 0
    divisor = backward_divisor(accelerator, len(batches))
    model.train()
    for batch, num_chunks in zip(batches, chunks):
        with accelerator.accumulate(model):
            inputs = {key: batch[key].to(accelerator.device, non_blocking=True) for key in MODEL_INPUTS if key in batch}
            targets = batch["target_ids"].to(accelerator.device, non_blocking=True)
            # use_cache=False is load-bearing: transformers derives packed-example boundaries only without a KV cache.
            if args.use_liger_kernel:  # the model is a ChunkedLossModel: no full logits tensor
                loss_sum = model(**inputs, target_ids=targets, num_chunks=num_chunks, use_cache=False)
            else:
                loss_sum = token_loss_sum(model(**inputs, use_cache=False).logits, targets)
            accelerator.backward(
                scale_for_backward(loss_sum, normalizer, accelerator.num_processes, divisor)
            )
            if accelerator.sync_gradients:
                # The norm before clipping (DeepSpeed clips inside its step and reports the same quantity); without
                # clipping, an infinite limit measures it and scales by exactly 1.
                limit = args.clip_grad_norm if args.clip_grad_norm > 0 else float("inf")
                grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), limit))
            optimizer.step()
            optimizer.zero_grad()
        loss_sum_local += loss_sum.detach().float()
    loss = accelerator.reduce(loss_sum_local, reduction="sum").item() / max(trained, 1)
    return {"train_loss": loss, "grad_norm": grad_norm, "trained_tokens": trained, "tokens": counts.tokens,
            "tokens_with_padding": counts.tokens_with_padding}


def backward_divisor(accelerator: Accelerator, micro_steps: int) -> int:
    """What `accelerator.backward` divides each micro-step's loss by: DeepSpeed's configured accumulation steps (it
    scales in its own backward), else accelerate's current accumulation steps (this step's micro-step count)."""
    if accelerator.state.deepspeed_plugin is not None:
        return int(accelerator.state.deepspeed_plugin.deepspeed_config["gradient_accumulation_steps"])
    return micro_steps


def step_record(step: int, plan: BatchPlan, learning_rate: float, result: dict, counters: RunCounters,
                telemetry: dict) -> dict:
    """One metrics.jsonl line (definitions in docs/metrics.md)."""
    record = {
        "step": step + 1,
        "epoch": plan.epochs_done(step),
        "learning_rate": learning_rate,
        "train_loss": result["train_loss"],
        "total_tokens": counters.total_tokens,
        "total_tokens_including_padding": counters.total_tokens_including_padding,
        "trained_tokens": counters.trained_tokens,
        **counters.throughput(),
        **telemetry,
    }
    if result["grad_norm"] is not None:
        record["grad_norm"] = result["grad_norm"]
    return record


def parameter_count(model, trainable_only: bool = False) -> int:
    """Parameters of the model (whole, also when ZeRO-3 has partitioned them or bitsandbytes packed them)."""
    return sum(parameter_numel(p) for p in model.parameters() if p.requires_grad or not trainable_only)


def should_checkpoint(args: FinetuneArgs, step: int, plan: BatchPlan) -> bool:
    done = step + 1
    if args.checkpoint_every_epoch:
        return plan.ends_epoch(step)
    every = args.checkpoint_every_n_steps
    return every is not None and done % every == 0


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    stops = stop_requests_for(args).install()  # first: a signal during the set-up is kept for the first step boundary
    lock = None
    try:
        configure_cuda_allocator()
        check_run_sources(args)  # fail fast on the data, the model and hub repos: nothing downloaded or loaded yet
        # Every process checks the login, so a bad token stops them all before any collective could hang.
        repo_id = hub.resolve_repo_id(args) if args.push_to_hub else None
        accelerator = build_accelerator(args)
        check_lora_setup(args, deepspeed=accelerator.state.deepspeed_plugin is not None)
        if args.torch_compile:
            check_compile_support(accelerator.device)  # a missing compiler: one line now, not a traceback at step 1
        setup_logging(accelerator)
        output, lock = prepare_output_dir(args, accelerator)
        return train(args, accelerator, output, repo_id, stops)
    finally:
        if lock is not None:
            lock.release()
        stops.uninstall()


def train(args: FinetuneArgs, accelerator: Accelerator, output: Path, repo_id: str | None,
          stops: StopRequests) -> dict:
    # Uploads run in the background on the main process only (see hub.HubUploader); other ranks do nothing hub-related.
    uploader = hub.HubUploader(repo_id, hub.repo_revision(args)) if repo_id and accelerator.is_main_process else None

    tokenizer = load_tokenizer(args)
    # Rank 0 tokenizes into the cache first; then each node's local main process (which finds rank 0's cache on a
    # shared filesystem, or tokenizes once per node on local disks); then everyone else loads. Every rank meets the
    # same two barriers. The processes that go first check the cache's checksums (see data_cache.get_mixture).
    with accelerator.main_process_first(), accelerator.local_main_process_first():
        mixture, _ = prepare(args, tokenizer, log=logger.info if accelerator.is_main_process else lambda _: None,
                             verify_cache=accelerator.is_local_main_process)
    mixture, evaluator = prepare_evaluation(args, tokenizer, accelerator, mixture)  # less --eval_fraction's share
    dims = ParallelDims(accelerator.num_processes, args.sequence_parallel_size, accelerator.process_index)
    plan, total_steps = make_plan(args, dims, mixture)
    logger.info("%d examples, global batch %s, %d steps in the first epoch (%d examples left out of it), %d steps.",
                len(mixture), global_batch_description(plan), plan.steps_per_epoch, plan.dropped_per_epoch(),
                total_steps)
    # Checked before the model loads: a damaged checkpoint (see checkpointing.verified_checkpoint_to_resume) or one
    # of a different run is refused without costing a model load.
    layout = Layout(accelerator.num_processes, zero_stage(accelerator))
    identity = run_identity(args, mixture.fingerprint, global_batch_description(plan), layout.num_processes,
                            layout.zero_stage)
    resume_from = verified_checkpoint_to_resume(accelerator, args.resume_from_checkpoint, output)
    resumed = check_resumable(resume_from, identity, args.force_resume) if resume_from else None
    saved_layout = Layout.of(resumed["identity"]) if resumed else layout  # another layout is resharded (elastic.py)
    if how_to_resume(saved_layout, layout) == TO_DEEPSPEED:
        request_universal_load(accelerator)
    stats = [vars(s) for s in mixture.stats]

    set_seed(args.seed)
    attn = attention_implementation(args.attn_implementation)
    model = load_with_adapters(args, model_dtype(accelerator, args), attn)
    if args.use_liger_kernel:
        model = ChunkedLossModel(model, args.loss_chunk_size)
    logger.info("Model %s: %.1fM parameters, attention %s, padding-free %s.", args.model_name_or_path,
                parameter_count(model) / 1e6, attn, args.padding_free)
    flops_model = FlopsModel.of(model)  # sizes read before ZeRO-3 partitions the weights
    peak, peak_source = peak_flops(accelerator.device, args.peak_tflops, model_dtype(accelerator, args))
    logger.info("Peak for MFU: %s (%s).", f"{peak / 1e12:.1f} TFLOP/s per device" if peak else "none", peak_source)
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, args.lora_learning_rate)
    scheduler = build_scheduler(optimizer, total_steps, args)
    state_order = optimizer_state_order(model, optimizer)  # read before DeepSpeed takes the parameters over
    if args.torch_compile and zero_stage(accelerator) == 3:
        gather_whole_layers_under_zero3(model)  # before prepare, where DeepSpeed hooks the modules (compile.py)
    model, optimizer = accelerator.prepare(model, optimizer)
    if args.torch_compile:  # after prepare: sequence parallelism replaces the attention function there (compile.py)
        logger.info("--torch_compile: %d decoder layers compiled (traced at the first training step).",
                    compile_decoder_layers(accelerator.unwrap_model(model)))
    accelerator.register_for_checkpointing(scheduler)
    vocab_size = accelerator.unwrap_model(model).config.vocab_size
    if args.padding_free and not packed_examples_stay_apart(model, accelerator.device, vocab_size):
        raise ModelSetupError(f"With attention {attn}, packed examples attend to each other in this model. Use "
                              "--attn_implementation sdpa or flash_attention_2, or --no_padding_free.")
    check_room(accelerator, args, model, output)  # before training: the final model must fit on the disk
    init_tracking(accelerator, args, output, args_to_dict(args), resuming=resumed is not None)

    counters = RunCounters(accelerator.num_processes)
    start_step, first_loss, last_loss = 0, None, None
    if resumed:
        load_resumed(accelerator, model, optimizer, scheduler, resume_from, saved_layout, layout, state_order)
        start_step, first_loss = resumed["step"], resumed["first_loss"]
        counters.restore(resumed["counters"])
        logger.info("Resumed %s: continuing at step %d of %d.", resume_from, start_step + 1, total_steps)
    checkpointer = Checkpointer(args, accelerator, output, plan, identity, stops, uploader,
                                estimate=checkpoint_bytes_estimate(model), last_saved_step=start_step,
                                last_saved=resume_from, total_steps=total_steps)
    stops.expect_checkpoint_bytes(checkpointer.estimate)
    record_run(args, accelerator, output, stats)
    metrics_log = MetricsLogger(accelerator, output, args.with_tracking, resumed_step=start_step,
                                intact=newest_intact_description(output))
    pad_id = pad_token_id(tokenizer)
    if evaluator and start_step == 0:  # before training (a resumed run logged it already)
        metrics_log.log(evaluator.run(model, 0, counters), step=0)
    progress = tqdm(total=total_steps, initial=start_step, desc="train", disable=not accelerator.is_main_process,
                    dynamic_ncols=True)
    for step in range(start_step, total_steps):
        if reason := stops.agreed_reason(accelerator):  # all ranks decide together, before the step
            progress.close()
            stop_run(reason, step, total_steps, checkpointer, first_loss, counters)
        learning_rate = scheduler.get_last_lr()[0]
        started = time.perf_counter()
        batches, counts = micro_batches(mixture, plan, step, args, dims, pad_id)
        counters.data_seconds += time.perf_counter() - started
        result = train_step(accelerator, model, optimizer, batches, counts, args)
        scheduler.step()
        counters.add(result["tokens"], result["tokens_with_padding"], result["trained_tokens"])
        counters.model_flops += flops_model.step_flops(mixture.lengths[plan.global_batch(step)], result["trained_tokens"])
        first_loss = result["train_loss"] if first_loss is None else first_loss
        last_loss = result["train_loss"]
        progress.update(1)
        efficiency = counters.efficiency(peak)
        progress.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{counters.throughput()['per_device_tps']:.0f}",
                             mfu=f"{efficiency['mfu']:.1%}" if peak else "n/a")
        if (step + 1) % args.logging_steps == 0 or step + 1 == total_steps:
            telemetry = {**efficiency, "peak_memory_gb": peak_memory_gb(accelerator)}  # every rank: it gathers
            metrics_log.log(step_record(step, plan, learning_rate, result, counters, telemetry), step=step + 1)
        if evaluator and evaluator.due(step + 1, total_steps):  # before the checkpoint, so a resume keeps it
            metrics_log.log(evaluator.run(model, step + 1, counters), step=step + 1)
        stops.note_step(time.perf_counter() - started)
        if metrics_log.failure:
            stops.request(metrics_log.failure)
        if should_checkpoint(args, step, plan):
            checkpointer.save(step + 1, first_loss, counters)
    progress.close()

    train_seconds, final_throughput, efficiency = counters.elapsed, counters.throughput(), counters.efficiency(peak)
    peak_memory = peak_memory_gb(accelerator)
    check_room(accelerator, args, model, output)  # again: checkpoints and logs may have filled the disk since
    save_final(args, accelerator, model, tokenizer, output)
    summary = {
        "steps": total_steps,
        "fine_tune": describe_fine_tune(args),
        "trainable_parameters": parameter_count(model, trainable_only=True),
        "resumed_from": str(resume_from) if resume_from else None,
        "train_seconds": round(train_seconds, 2),
        "first_train_loss": first_loss,
        "last_train_loss": last_loss,
        "total_tokens": counters.total_tokens,
        "trained_tokens": counters.trained_tokens,
        **{key: round(value, 1) for key, value in final_throughput.items()},
        "trained_tokens_per_sec": round(efficiency["trained_tokens_per_sec"], 1),
        "tflops_per_device": round(efficiency["tflops"], 4),
        "mfu": round(efficiency["mfu"], 4) if "mfu" in efficiency else None,
        "padding_fraction": round(efficiency["padding_fraction"], 4),
        "peak_memory_gb": round(peak_memory, 2),
        "model_dir": str(output.resolve()),
    }
    main_process_work(accelerator, lambda: finish_on_main_process(args, accelerator.num_processes, output, summary,
                                                                  stats, metrics_log, uploader),
                      (StorageError,), lambda: StorageError(f"The main process could not finish the run in {output}."))
    end_run(accelerator)
    return summary


def finish_on_main_process(args: FinetuneArgs, num_processes: int, output: Path, summary: dict, stats: list[dict],
                           metrics_log: MetricsLogger, uploader: hub.HubUploader | None) -> None:
    """After the final save: eval metrics in the summary, the model card and the last uploads, summary.json, the
    run report and the printed summary."""
    summary.update(eval_summary(metrics_log.path))  # initial_* and final_* eval metrics
    if uploader:
        with failed_write("the model card", output / "README.md", f"the final model in {output} is complete"):
            hub.write_model_card(output, args, summary, stats, repo_id=uploader.repo_id, revision=uploader.revision,
                                 num_processes=num_processes)
        uploader.upload_final(output)
        summary.update(hub.summary_fields(uploader.finish()))  # waits; failures are reported, not raised
        prune_checkpoints(output, args.keep_last_n_checkpoints)  # those kept while they were uploading
    write_text(output / "summary.json", json.dumps(summary, indent=2), "summary.json",
               f"the final model in {output} is complete")
    summary["report"] = str(write_run_report(output))  # plots + report.md; a failure is a warning, never fatal
    print_summary(summary)


def print_summary(summary: dict) -> None:
    width = max(len(key) for key in summary)
    lines = [f"  {key:<{width}}  {value}" for key, value in summary.items()]
    print("\n".join(["", "Run finished:", *lines, ""]), flush=True)


def cli(argv: list[str] | None = None) -> None:
    """Entry point: a user error (bad data, missing login, unusable tokenizer, a full disk) prints one clear line, no
    traceback, exit status 2; a run stopped by a signal or its time budget says how it stopped, exit status 75."""
    code = 0
    try:
        main(argv)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        code = 2
    except RunStopped as stop:
        if os.environ.get("RANK", "0") == "0":  # every rank stops; one says so
            print(str(stop), file=sys.stderr, flush=True)
        code = stop.exit_code
    exit_process(code)


if __name__ == "__main__":
    cli()
