"""mason: turn one single-node training command into a multi-node job on Slurm, run it here, or print it.

    open-instruct-sft mason --backend slurm --num_nodes 8 --gpus_per_node 8 --partition gpu --time 48:00:00 \
        --secret HF_TOKEN -- accelerate launch --use_deepspeed \
        --deepspeed_config_file configs/ds_configs/stage3_no_offloading_accelerate.conf --mixed_precision bf16 \
        -m open_instruct.finetune --model_name_or_path meta-llama/Llama-3.1-8B ...

Everything before `--` is about the cluster; after it comes the command you would run on one machine. mason parses
it with accelerate's launch parser and the trainer's own flags parser, checks that the data and the model exist,
prints the global batch, a per-GPU memory plan (refusing a job that clearly can't fit unless --force) and a time plan
(step time, tokens/s per GPU, wall time: an estimate), then:

  --backend slurm   writes an sbatch script into the run's logs folder and submits it (--dry_run prints it instead)
  --backend local   runs the node commands on this machine (several "nodes" on 127.0.0.1 when --num_nodes > 1)
  --backend print   prints each node's command, for any other scheduler

The recipes in scripts/train/ call mason; see docs/cluster.md. `python mason.py ...` (the repository's shim) and
`python -m open_instruct.mason ...` are the same command.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from open_instruct.launch import (
    Layout, LaunchError, LaunchSpec, ShellVar, node_command, parse_env_assignments, parse_launch_command,
    read_deepspeed_config, shell_join,
)


@dataclass
class MasonArgs:
    """The cluster side of a job. Each field's help is its documentation."""

    backend: Literal["slurm", "local", "print"] = field(
        default="slurm", metadata={"help": "slurm: submit with sbatch; local: run here; print: print node commands."})
    num_nodes: int = field(default=1, metadata={"help": "Machines in the job."})
    gpus_per_node: int = field(
        default=8, metadata={"help": "GPUs requested per node (0: CPU nodes, no GPU request)."})
    processes_per_node: int | None = field(
        default=None, metadata={"help": "Training processes per node. Default: --gpus_per_node (1 on CPU nodes)."})
    cpus_per_node: int | None = field(default=None, metadata={"help": "CPUs requested per node (Slurm cpus-per-task)."})
    partition: str | None = field(default=None, metadata={"help": "Slurm partition. Default: the cluster's."})
    account: str | None = field(default=None, metadata={"help": "Slurm account to charge. Default: yours."})
    qos: str | None = field(default=None, metadata={"help": "Slurm quality of service."})
    time: str | None = field(default=None, metadata={"help": "Slurm time limit, e.g. 48:00:00 or 2-00:00:00."})
    job_name: str | None = field(default=None, metadata={"help": "Job name. Default: the trainer's --exp_name."})
    env: list[str] = field(default_factory=list, metadata={
        "help": "NAME=VALUE set on every node (repeatable). Written into the job script, so never a secret."})
    secret: list[str] = field(default_factory=list, metadata={
        "help": "NAME of an environment variable (e.g. HF_TOKEN, WANDB_API_KEY) passed from this shell to the job "
                "by name (repeatable); its value is never written or printed. Must be set when submitting."})
    output_dir: str | None = field(default=None, metadata={
        "help": "Where the job script and logs go (its logs/ folder). Default: the trainer's --output_dir."})
    main_process_port: int = field(default=29500, metadata={"help": "Rendezvous port on the first node."})
    grace_seconds: int = field(default=300, metadata={
        "help": "Slurm: seconds before the time limit at which the job is told to save a checkpoint and stop "
                "(sbatch --signal=B:USR1@N); the training processes' time to save after a SIGTERM too. Must cover "
                "one optimizer step and one checkpoint save."})
    no_requeue: bool = field(default=False, metadata={
        "help": "Slurm: do not requeue a job that stopped with a checkpoint before its time limit (it then just "
                "ends; rerun the same command to continue)."})
    gpu_memory_gb: float = field(default=80.0, metadata={"help": "Memory of one GPU, for the memory plan."})
    gpu_kind: str = field(default="H100", metadata={
        "help": "GPU model, for the time plan's peak FLOP/s and in-node bandwidth: H100 (SXM), H100 PCIe, H100 NVL, "
                "H200, A100 (SXM) or L40S."})
    assumed_mfu: float = field(default=0.35, metadata={
        "help": "Model FLOPs utilization the time plan assumes where open_instruct/assets/gpu_throughput.json has no "
                "measured row for this GPU, configuration and model size."})
    network_gbps: float = field(default=400.0, metadata={
        "help": "Network bandwidth of each GPU between nodes in Gb/s, for the time plan (400: an NDR InfiniBand "
                "port per GPU)."})
    assumed_examples: int | None = field(default=None, metadata={
        "help": "Examples per epoch the time plan assumes where no tokenized cache exists yet (e.g. the dataset "
                "card's row count). Default: --max_train_steps x the global batch, else no time plan."})
    assumed_tokens_per_example: float | None = field(default=None, metadata={
        "help": "Mean tokens per example the time plan assumes without a tokenized cache. Default: --max_seq_length "
                "(an upper bound)."})
    force: bool = field(default=False, metadata={"help": "Launch even if the memory plan says it will not fit."})
    prepare_data: bool = field(default=False, metadata={
        "help": "Tokenize the mixture into the cache here first (python -m open_instruct.prepare_data), so the "
                "nodes read it instead of each tokenizing; the cache must be on a filesystem the nodes share."})
    skip_hub_checks: bool = field(default=False, metadata={
        "help": "Do not ask the Hugging Face Hub whether the model and datasets exist (local paths are still "
                "checked)."})
    dry_run: bool = field(default=False, metadata={
        "help": "Check everything and print what would run (the sbatch script for slurm), without running it."})


def build_parser() -> argparse.ArgumentParser:
    """argparse from MasonArgs: list fields repeat (--env A=1 --env B=2), bools are switches, Literals are choices."""
    parser = argparse.ArgumentParser(prog="python mason.py", allow_abbrev=False,
                                     usage="python mason.py [cluster options] -- accelerate launch ... "
                                           "-m open_instruct.finetune [trainer flags]")
    hints = typing.get_type_hints(MasonArgs)
    for f in dataclasses.fields(MasonArgs):
        kind, options = hints[f.name], {"help": f.metadata["help"]}
        if kind is bool:
            options["action"] = "store_true"
        elif typing.get_origin(kind) is list:
            options.update(action="append", default=[])
        elif typing.get_origin(kind) is Literal:
            options.update(choices=typing.get_args(kind), default=f.default)
        else:
            base = [t for t in typing.get_args(kind) if t is not type(None)] or [kind]
            options.update(type=base[0], default=f.default)
        parser.add_argument(f"--{f.name}", **options)
    return parser


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" not in argv and ("-h" in argv or "--help" in argv):
        build_parser().parse_args(["--help"])  # prints the cluster options and exits
    if "--" not in argv:
        raise LaunchError("Put the training command after `--`: python mason.py [cluster options] -- accelerate "
                          "launch ... -m open_instruct.finetune ...")
    at = argv.index("--")
    return argv[:at], argv[at + 1:]


def parse_mason_args(tokens: list[str]) -> MasonArgs:
    args = MasonArgs(**vars(build_parser().parse_args(tokens)))
    errors = [f"--{name} must be at least 1, got {getattr(args, name)}."
              for name in ("num_nodes", "processes_per_node", "cpus_per_node")
              if getattr(args, name) is not None and getattr(args, name) < 1]
    if args.gpus_per_node < 0:
        errors.append(f"--gpus_per_node must be 0 or more, got {args.gpus_per_node}.")
    if args.backend == "print" and args.dry_run:
        errors.append("--dry_run has no effect with --backend print (it only prints).")
    if args.grace_seconds < 1:
        errors.append(f"--grace_seconds must be at least 1, got {args.grace_seconds}.")
    errors += time_plan_errors(args)
    if args.backend != "slurm":
        errors += [f"--{name} only applies to --backend slurm." for name in
                   ("partition", "account", "qos", "time", "cpus_per_node") if getattr(args, name) is not None]
        errors += [f"--{name} only applies to --backend slurm." for name in ("grace_seconds", "no_requeue")
                   if getattr(args, name) != MasonArgs.__dataclass_fields__[name].default]
    if errors:
        raise LaunchError("\n".join(errors))
    return args


def time_plan_errors(args: MasonArgs) -> list[str]:
    from open_instruct.time_plan import INTRA_NODE

    errors = [] if args.gpu_kind in INTRA_NODE else [f"--gpu_kind {args.gpu_kind!r}: one of {', '.join(INTRA_NODE)}."]
    if not 0 < args.assumed_mfu <= 1:
        errors.append(f"--assumed_mfu must be in (0, 1], got {args.assumed_mfu}.")
    errors += [f"--{name} must be positive, got {getattr(args, name)}." for name in
               ("network_gbps", "assumed_examples", "assumed_tokens_per_example")
               if getattr(args, name) is not None and getattr(args, name) <= 0]
    return errors


def layout_of(args: MasonArgs) -> Layout:
    per_node = args.processes_per_node or args.gpus_per_node or 1
    return Layout(num_nodes=args.num_nodes, processes_per_node=per_node, main_process_port=args.main_process_port)


def check_secrets(names: list[str], launching: bool) -> list[str]:
    """A secret the job needs must be set where mason submits it; for a dry run or print, a warning is enough."""
    missing = [name for name in names if not os.environ.get(name)]
    if not missing:
        return []
    message = f"--secret {', '.join(missing)}: not set in this environment"
    if launching:
        raise LaunchError(f"{message}. Export it (`export {missing[0]}=...`) and run mason again.")
    return [f"{message}; the job would stop at its start."]


def run_prepare_data(spec: LaunchSpec) -> None:
    print("Preparing the tokenized mixture here (python -m open_instruct.prepare_data) ...", flush=True)
    result = subprocess.run([sys.executable, "-m", "open_instruct.prepare_data", *spec.script_args])
    if result.returncode != 0:
        raise LaunchError("Preparing the data failed (see above); nothing was submitted.")


def print_plan(spec: LaunchSpec, layout: Layout, trainer_args, warnings: list[str]) -> None:
    from open_instruct.args import describe_global_batch

    print(f"job: {layout.num_nodes} node(s) x {layout.processes_per_node} process(es) = {layout.world_size} "
          f"processes ({'DeepSpeed ' + str(spec.deepspeed_config_file) if spec.use_deepspeed else 'DDP'})")
    print(f"global batch: {describe_global_batch(trainer_args, layout.world_size)}")
    if spec.replaced:
        print(f"note: replaced {' '.join(spec.replaced)} from the command with the cluster layout")
    for warning in warnings:
        print(f"warning: {warning}")


def print_resume_plan(args: MasonArgs, spec: LaunchSpec, layout: Layout, trainer_args, ds_config: dict | None) -> None:
    """Which checkpoint the job will continue, and on which layout (open_instruct/elastic.py reshards it): a job
    resubmitted with another --num_nodes resumes the run."""
    from open_instruct.args import global_batch_examples
    from open_instruct.elastic import Layout as ProcessLayout
    from open_instruct.elastic import resume_plan

    unit = "GPU" if args.gpus_per_node else "process"
    if trainer_args.global_batch_tokens is not None:
        global_batch = f"{trainer_args.global_batch_tokens} tokens"
    else:  # as the trainer resolves it (finetune.make_plan)
        global_batch = f"{global_batch_examples(trainer_args, layout.world_size)} examples"
    line = resume_plan(trainer_args.output_dir, trainer_args.resume_from_checkpoint,
                       ProcessLayout(layout.world_size, zero_stage(spec, ds_config)), global_batch, unit)
    if line:
        print(f"resume: {line}")


def zero_stage(spec: LaunchSpec, ds_config: dict | None) -> int | None:
    """The DeepSpeed config's ZeRO stage; None without DeepSpeed."""
    return int((ds_config or {}).get("zero_optimization", {}).get("stage", 0)) if spec.use_deepspeed else None


def read_model(trainer_args) -> tuple[object, int] | str:
    """(config, parameter count) for the memory and time plans, or the one-line reason they are skipped."""
    from open_instruct.memory_plan import count_parameters, load_model_config

    config, reason = load_model_config(trainer_args.model_name_or_path, trainer_args.model_revision)
    if config is None:
        return f"cannot read the model's config: {reason}"
    try:
        return config, count_parameters(config)
    except Exception as exc:  # e.g. an architecture that needs remote code: the plans are advice, not a gate
        return f"cannot build {config.model_type} on the meta device: {type(exc).__name__}"


def check_memory(args: MasonArgs, spec: LaunchSpec, layout: Layout, trainer_args, ds_config: dict | None,
                 model: tuple[object, int] | str) -> None:
    """Print the per-GPU memory plan; refuse a job that clearly can't fit unless --force."""
    from open_instruct.memory_plan import plan_memory

    if args.gpus_per_node == 0:
        print("memory plan: CPU nodes, no GPU memory to plan")
        return
    if isinstance(model, str):
        print(f"memory plan: skipped ({model})")
        return
    config, num_params = model
    plan = plan_memory(trainer_args, config, num_params, layout.world_size, ds_config if spec.use_deepspeed else None,
                       mixed_precision=spec.mixed_precision or "no", gpus_per_node=layout.processes_per_node)
    print("memory plan per GPU (an estimate):\n" + plan.format(args.gpu_memory_gb))
    print_row_budget_advice(args, spec, layout, trainer_args, ds_config, model)
    if not plan.fits(args.gpu_memory_gb):
        advice = ("more nodes, ZeRO-3 (configs/ds_configs/), CPU offload, --gradient_checkpointing, "
                  "--use_liger_kernel or a smaller --max_seq_length")
        if not args.force:
            raise LaunchError(f"The job would need about {plan.total_bytes / 2**30:.1f} GiB per GPU, more than "
                              f"--gpu_memory_gb {args.gpu_memory_gb:g} allows. Try {advice}; or --force to launch "
                              "anyway.")
        print("warning: the memory plan says this will not fit; launching anyway (--force)")


def print_row_budget_advice(args: MasonArgs, spec: LaunchSpec, layout: Layout, trainer_args, ds_config: dict | None,
                            model: tuple[object, int]) -> None:
    """The largest packed-row budget the memory plan fits, next to the one the command asks for."""
    from open_instruct.memory_plan import largest_row_budget

    largest = largest_row_budget(trainer_args, *model, layout.world_size, ds_config if spec.use_deepspeed else None,
                                 args.gpu_memory_gb, mixed_precision=spec.mixed_precision or "no")
    if largest is None:
        return
    asked = trainer_args.max_tokens_per_micro_batch
    print(f"  row budget: --max_tokens_per_micro_batch {largest} is the largest multiple of --max_seq_length that the "
          f"plan fits (an estimate; {'the command asks ' + str(asked) if asked else 'the command packs none'}); "
          "fewer, fuller micro-steps cost less per step")


def tokenized_cache(trainer_args):
    """(the tokenized mixture the run will read, its folder), or (None, why there is none): from the cache alone,
    without tokenizing."""
    from open_instruct.data_cache import cached_mixture
    from open_instruct.model_utils import load_tokenizer

    step = "load the tokenizer"  # the cache key covers it
    try:
        tokenizer = load_tokenizer(trainer_args)
        step = "compute the cache key"
        mixture, path = cached_mixture(trainer_args, tokenizer)
    except Exception as exc:  # noqa: BLE001 - no tokenizer offline, a bad spec...: the plan is advice
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        return None, f"no tokenized cache found: cannot {step} ({type(exc).__name__}: {first_line})"
    return (mixture, path) if mixture is not None else (None, f"no tokenized cache at {path} yet")


def data_counts(args: MasonArgs, trainer_args, world_size: int):
    """The time plan's data: the tokenized cache's counts, else the assumed ones (--assumed_examples, or
    --max_train_steps x the global batch, at --assumed_tokens_per_example or --max_seq_length tokens each), else
    the reason there is no time plan."""
    from open_instruct.args import global_batch_examples
    from open_instruct.time_plan import DataCounts

    mixture, where = tokenized_cache(trainer_args)
    if mixture is not None:
        return DataCounts.of_lengths(mixture.lengths, mixture.trained_lengths,
                                     f"counted in the tokenized cache {where}")
    per_example = args.assumed_tokens_per_example or trainer_args.max_seq_length
    examples, whence = args.assumed_examples, "--assumed_examples"
    if examples is None and trainer_args.max_train_steps:
        batch = global_batch_examples(trainer_args, world_size) or trainer_args.global_batch_tokens / per_example
        examples, whence = round(trainer_args.max_train_steps * batch), "--max_train_steps x the global batch"
    if examples is None:
        return f"{where}; --prepare_data fills it, or state --assumed_examples"
    length = ("--assumed_tokens_per_example" if args.assumed_tokens_per_example
              else "--max_seq_length, an upper bound")
    return DataCounts.assumed(examples, per_example, f"assumed: {whence}, {length}; {where}")


def print_time_plan(args: MasonArgs, spec: LaunchSpec, layout: Layout, trainer_args, ds_config: dict | None,
                    model: tuple[object, int] | str) -> None:
    """Print the run's time plan (open_instruct/time_plan.py), or one line saying why there is none."""
    from open_instruct.args import uses_lora

    if args.gpus_per_node == 0:
        print("time plan: CPU nodes, no GPU time to plan")
        return
    counts = (model if isinstance(model, str) else "LoRA runs are not modelled" if uses_lora(trainer_args)
              else data_counts(args, trainer_args, layout.world_size))
    if not isinstance(counts, str):
        try:
            print(time_plan(args, spec, layout, trainer_args, ds_config, model, counts).format())
            return
        except ValueError as exc:  # less than one global batch: the trainer refuses it with its own message
            counts = str(exc)
    print(f"time plan: skipped ({counts})")


def time_plan(args: MasonArgs, spec: LaunchSpec, layout: Layout, trainer_args, ds_config: dict | None,
              model: tuple[object, int], counts):
    from open_instruct.memory_plan import flops_model, half_precision
    from open_instruct.time_plan import (
        compute_rate, configuration, link_bandwidth, load_table, plan_time, published_run, workload,
    )

    config, num_params = model
    half = spec.use_deepspeed and half_precision(ds_config, spec.mixed_precision or "no")
    stage = zero_stage(spec, ds_config)
    rate = compute_rate(args.gpu_kind, configuration(trainer_args, stage), num_params, args.assumed_mfu, load_table())
    plan = plan_time(flops_model(config), num_params, workload(trainer_args, counts, layout.world_size),
                     world_size=layout.world_size, stage=stage, rate=rate,
                     link=link_bandwidth(args.gpu_kind, layout.num_nodes, args.network_gbps),
                     value_bytes=2 if half else 4)
    plan.reference = published_run(trainer_args, layout.world_size, args.gpu_kind)
    return plan


def launch_print(spec: LaunchSpec, layout: Layout, env: dict, secrets: list[str]) -> None:
    """The per-node commands for any scheduler: set the environment, fill in node 0's address, run one per node."""
    print("# On every node, from this directory, in this Python environment:")
    for name, value in env.items():
        print(f"export {name}={shlex.quote(value)}")
    for name in secrets:
        print(f"# {name}: pass it from your environment (its value is not printed)")
    if layout.num_nodes > 1:
        print("export MAIN_PROCESS_IP=<address of node 0>")
    for rank in range(layout.num_nodes):
        command = node_command(spec, layout, rank, ShellVar("MAIN_PROCESS_IP"))
        print(f"# node {rank}:\n{shell_join(command, wrap=True)}")


def launch_local(spec: LaunchSpec, layout: Layout, env: dict, dry_run: bool) -> int:
    """Every node's command on this machine (rendezvous on 127.0.0.1); the first failure stops the others."""
    commands = [[str(t) for t in node_command(spec, layout, rank, "127.0.0.1")] for rank in range(layout.num_nodes)]
    if dry_run:
        for command in commands:
            print(shell_join(command, wrap=True))
        return 0
    processes = [subprocess.Popen(command, env={**os.environ, **env}) for command in commands]
    while any(p.poll() is None for p in processes):
        if any(p.returncode not in (None, 0) for p in processes):
            for p in processes:
                if p.poll() is None:
                    p.terminate()
        time.sleep(0.5)
    return next((p.returncode for p in processes if p.returncode != 0), 0)


def launch_slurm(args: MasonArgs, spec: LaunchSpec, layout: Layout, env: dict, trainer_args) -> str | None:
    from open_instruct.slurm import SlurmJob, sbatch_script, submit

    run_dir = Path(args.output_dir or trainer_args.output_dir).resolve()
    job = SlurmJob(job_name=args.job_name or trainer_args.exp_name, log_dir=run_dir / "logs", workdir=Path.cwd(),
                   gpus_per_node=args.gpus_per_node, cpus_per_node=args.cpus_per_node, time=args.time,
                   partition=args.partition, account=args.account, qos=args.qos, env=env, secrets=args.secret,
                   grace_seconds=args.grace_seconds, requeue=not args.no_requeue)
    script = sbatch_script(spec, layout, job)
    if args.dry_run:
        print(script, end="")
        return None
    job.log_dir.mkdir(parents=True, exist_ok=True)
    path = job.log_dir / f"{job.job_name}.sbatch"
    path.write_text(script)
    job_id = submit(path)
    out, err = (str(p).replace("%j", job_id) for p in (job.stdout_log, job.stderr_log))
    print(f"Submitted job {job_id} ({path}).\n  logs:   {out}\n          {err}\n  follow: tail -f {out} {err}\n"
          f"  status: squeue -j {job_id}    cancel: scancel {job_id}")
    return job_id


def main(argv: list[str] | None = None) -> int:
    from open_instruct.launch_checks import check_qlora_layout, check_sources, parse_trainer_flags

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        mason_tokens, command = split_command(argv)
        args = parse_mason_args(mason_tokens)
        spec = parse_launch_command(command)
        # Checked for every layout (the memory plan reads it only for GPUs): each worker would fail on it.
        ds_config = read_deepspeed_config(spec.deepspeed_config_file) if spec.deepspeed_config_file else None
        trainer_args = parse_trainer_flags(spec.script_args)
        env = parse_env_assignments(args.env)
        warnings = check_secrets(args.secret, launching=args.backend != "print" and not args.dry_run)
        layout = layout_of(args)
        check_qlora_layout(trainer_args, spec.use_deepspeed, args.gpus_per_node)
        warnings += check_sources(trainer_args, ask_hub=not args.skip_hub_checks)
        print_plan(spec, layout, trainer_args, warnings)
        print_resume_plan(args, spec, layout, trainer_args, ds_config)
        model = read_model(trainer_args) if args.gpus_per_node else "CPU nodes"
        check_memory(args, spec, layout, trainer_args, ds_config, model)
        print_time_plan(args, spec, layout, trainer_args, ds_config, model)
        if args.prepare_data and not args.dry_run:
            run_prepare_data(spec)
        if args.backend == "print":
            launch_print(spec, layout, env, args.secret)
            return 0
        if args.backend == "local":
            return launch_local(spec, layout, env, args.dry_run)
        launch_slurm(args, spec, layout, env, trainer_args)
        return 0
    except LaunchError as error:
        print(f"mason: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
