"""A single-node training command as a structured launch spec, and the per-node commands of a multi-node job.

mason.py hands this module the command a user would run on one machine,

    accelerate launch --use_deepspeed --deepspeed_config_file configs/ds_configs/stage3_no_offloading_accelerate.conf \
        --mixed_precision bf16 -m open_instruct.finetune --model_name_or_path ... --dataset_mixer_list ...

parses it with accelerate's own `launch` parser (so an option accelerate does not know is an error here, not on the
cluster), keeps the options the user gave, and renders, per node,

    accelerate launch --num_machines N --machine_rank R --main_process_ip HOST0 --main_process_port P \
        --num_processes N*P_node --deepspeed_multinode_launcher standard <the user's other options> \
        -m open_instruct.finetune ...

The options that decide the layout (processes, machines, rank, rendezvous) always come from the cluster options; a
value the user gave for one of them is replaced, and said so, rather than kept by a regex that might miss a spelling.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

TRAINER_MODULE = "open_instruct.finetune"
TRAINER_SCRIPT = "open_instruct/finetune.py"
# accelerate options that the cluster layout decides; mason sets them on every node.
LAYOUT_OPTIONS = ("num_processes", "num_machines", "machine_rank", "main_process_ip", "main_process_port",
                  "deepspeed_multinode_launcher", "same_network", "rdzv_backend")


class LaunchError(ValueError):
    """The training command can't be launched as given; the message says what to change."""


@dataclass(frozen=True)
class ShellVar:
    """A value that the node's shell fills in (e.g. SLURM_NODEID), rendered as "$NAME"."""

    name: str


@dataclass
class LaunchSpec:
    """What a single-node `accelerate launch` command asks for, minus the layout."""

    options: list[str]  # the user's accelerate options, as tokens, without LAYOUT_OPTIONS
    replaced: list[str]  # layout options the user gave, which the cluster options replace
    module: bool  # -m open_instruct.finetune (else a script path)
    script: str
    script_args: list[str]  # the trainer's flags
    use_deepspeed: bool
    deepspeed_config_file: str | None
    mixed_precision: str | None = None
    multi_gpu: bool = False


@dataclass
class Layout:
    """Where the job runs: nodes, processes per node and the rendezvous port."""

    num_nodes: int = 1
    processes_per_node: int = 1
    main_process_port: int = 29500
    # The accelerate executable of this Python environment, so nodes run the same installation as the submitter.
    accelerate: str = field(default_factory=lambda: accelerate_executable())

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.processes_per_node


def parse_quietly(parse, what: str):
    """Call an argparse-based `parse()`; argparse exits on an error after printing usage and the error to stderr,
    so turn that into a LaunchError: `what`, then the error's own words."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse()
    except SystemExit:
        text = err.getvalue().strip()
        detail = text.split("error:", 1)[1].strip() if "error:" in text else (text or "invalid options")
        raise LaunchError(f"{what}: {detail}") from None


def _option_tokens(parser: argparse.ArgumentParser, namespace: argparse.Namespace, names: set[str]) -> list[str]:
    """The given options back as command-line tokens, in the parser's order, each under its first spelling."""
    tokens = []
    for action in parser._actions:
        if action.dest not in names or not action.option_strings:
            continue
        flag = action.option_strings[0]
        value = getattr(namespace, action.dest)
        if action.nargs == 0:
            if value:
                tokens.append(flag)
        elif isinstance(value, (list, tuple)):
            tokens += [flag, *(str(v) for v in value)]
        else:
            tokens += [flag, str(value)]
    return tokens


def parse_launch_command(argv: list[str]) -> LaunchSpec:
    """`accelerate launch [options] (-m open_instruct.finetune | open_instruct/finetune.py) [trainer flags]`."""
    from accelerate.commands.launch import launch_command_parser

    if argv[:2] != ["accelerate", "launch"]:
        shown = " ".join(argv[:2]) or "nothing"
        raise LaunchError(f"The training command must start with 'accelerate launch' (got {shown!r}), e.g. "
                          f"-- accelerate launch -m {TRAINER_MODULE} --model_name_or_path ...")
    parser = launch_command_parser()
    namespace = parse_quietly(lambda: parser.parse_args(argv[2:]), "accelerate launch")
    script = namespace.training_script
    if not (namespace.module and script == TRAINER_MODULE) and not str(script).endswith(TRAINER_SCRIPT):
        raise LaunchError(f"mason launches the trainer ({'-m ' + TRAINER_MODULE} or {TRAINER_SCRIPT}), got {script!r}: "
                          "it checks the trainer's flags before submitting, so it only knows that program.")
    given = set(namespace.nondefault) - {"training_script", "training_script_args", "module"}
    replaced = _option_tokens(parser, namespace, given & set(LAYOUT_OPTIONS))
    options = _option_tokens(parser, namespace, given - set(LAYOUT_OPTIONS) - {"multi_gpu"})
    return LaunchSpec(options=options, replaced=replaced, module=bool(namespace.module), script=script,
                      script_args=list(namespace.training_script_args), use_deepspeed=bool(namespace.use_deepspeed),
                      deepspeed_config_file=namespace.deepspeed_config_file,
                      mixed_precision=namespace.mixed_precision, multi_gpu=bool(namespace.multi_gpu))


def read_deepspeed_config(path: str) -> dict:
    """The DeepSpeed config file as a dict; a missing file or one that is not a JSON object is a LaunchError naming
    it (accelerate would fail inside every worker, with a traceback)."""
    file = Path(path)
    if not file.is_file():
        raise LaunchError(f"--deepspeed_config_file {path}: no such file (relative paths start from {Path.cwd()}). "
                          "configs/ds_configs/ has working ones.")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LaunchError(f"--deepspeed_config_file {path}:{exc.lineno}: not valid JSON ({exc.msg}). Fix the file; "
                          "configs/ds_configs/ has working ones.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LaunchError(f"--deepspeed_config_file {path} cannot be read ({exc}).") from None
    if not isinstance(config, dict):
        raise LaunchError(f"--deepspeed_config_file {path} must hold a JSON object (a mapping of DeepSpeed settings), "
                          f"not a {type(config).__name__}.")
    return config


def node_command(spec: LaunchSpec, layout: Layout, machine_rank: int | ShellVar,
                 main_process_ip: str | ShellVar) -> list:
    """The `accelerate launch` command one node runs. Tokens are strings or ShellVars (see shell_join)."""
    command: list = [layout.accelerate, "launch", "--num_processes", str(layout.world_size)]
    if layout.num_nodes > 1:
        command += ["--num_machines", str(layout.num_nodes), "--machine_rank", machine_rank,
                    "--main_process_ip", main_process_ip, "--main_process_port", str(layout.main_process_port),
                    "--rdzv_backend", "static", "--same_network"]
        if spec.use_deepspeed:
            # "standard": every node starts its own processes (torch's launcher) instead of DeepSpeed's pdsh fan-out.
            command += ["--deepspeed_multinode_launcher", "standard"]
    if not spec.use_deepspeed and (layout.world_size > 1 or spec.multi_gpu):
        command.append("--multi_gpu")  # without it accelerate starts one process, whatever --num_processes says
    command += spec.options
    command += ["-m", spec.script] if spec.module else [spec.script]
    return command + spec.script_args


def accelerate_executable() -> str:
    """The `accelerate` next to this interpreter (a venv's bin/), else the one on PATH."""
    beside = Path(sys.executable).parent / "accelerate"
    return str(beside) if beside.is_file() else (shutil.which("accelerate") or "accelerate")


def shell_join(tokens: list, wrap: bool = False) -> str:
    """Quote every token for bash, except ShellVars, which become "$NAME" (expanded where the command runs). With
    `wrap`, each --option starts a continued line, so a long launch command stays readable."""
    words = [f'"${token.name}"' if isinstance(token, ShellVar) else shlex.quote(str(token)) for token in tokens]
    if not wrap:
        return " ".join(words)
    text = words[0]
    for word in words[1:]:
        text += f" \\\n    {word}" if word.startswith("-") else f" {word}"
    return text


def parse_env_assignments(assignments: list[str]) -> dict[str, str]:
    """--env NAME=VALUE pairs; a name that looks like a secret must go through --secret instead."""
    env = {}
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        if not sep or not name.isidentifier():
            raise LaunchError(f"--env {assignment!r}: expected NAME=VALUE.")
        if looks_secret(name):
            raise LaunchError(f"--env {name}=...: {name} looks like a secret, and --env values are written into the "
                              f"job script. Use --secret {name}: it is passed from your environment by name only.")
        env[name] = value
    return env


def looks_secret(name: str) -> bool:
    return any(word in name.upper() for word in ("TOKEN", "SECRET", "PASSWORD", "API_KEY", "ACCESS_KEY"))
