"""`open-instruct-sft`: one command for the project's entry points, as `trl sft` or `axolotl train` are for theirs.

    open-instruct-sft finetune config.yaml --learning_rate 1e-5      # = python -m open_instruct.finetune ...
    open-instruct-sft prepare config.yaml --audit_file audit.jsonl   # = python -m open_instruct.prepare_data ...
    open-instruct-sft report output/run                              # = python -m open_instruct.report ...
    open-instruct-sft chat output/run                                # = python -m open_instruct.chat ...
    open-instruct-sft mason --backend print -- accelerate launch ... # = python mason.py ...
    open-instruct-sft tiny-model output/tiny-llama                   # = python -m open_instruct.tiny_model ...

The name is not `open-instruct`: allenai's own package may be installed beside this one. Each subcommand's module is
imported only when it runs, so `--help` stays instant. Multi-process runs still go through `accelerate launch -m
open_instruct.finetune` (accelerate starts the processes).
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> ("module:function", one line for --help). The function is the one `python -m module` runs: for
# finetune that is cli(), which turns a user error into one line and exit status 2 (main() raises it).
COMMANDS = {
    "finetune": ("open_instruct.finetune:cli", "train: the SFT trainer (one process; use accelerate launch for more)"),
    "prepare": ("open_instruct.prepare_data:main", "tokenize and cache the mixture ahead of training, with an audit"),
    "report": ("open_instruct.report:main", "(re)draw a run directory's report: report.md and PNG plots"),
    "chat": ("open_instruct.chat:main", "chat in the terminal with a trained model, adapter or merged model"),
    "mason": ("open_instruct.mason:main", "run a training command as a Slurm job, a local multi-node run or a script"),
    "tiny-model": ("open_instruct.tiny_model:main", "build the embedded tiny Llama model and its tokenizer"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    return ("usage: open-instruct-sft COMMAND [flags...]   (open-instruct-sft COMMAND --help for its flags)\n\n"
            "commands:\n" + "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"open-instruct-sft: error: unknown command {name!r}; use one of {', '.join(COMMANDS)}.",
              file=sys.stderr)
        return 2
    module_name, function = COMMANDS[name][0].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise  # a missing dependency inside the module: its own traceback says which
        print(f"open-instruct-sft: error: {name}: {module_name} is not in this installation; reinstall the package.",
              file=sys.stderr)
        return 2
    sys.argv = [f"open-instruct-sft {name}", *rest]  # argparse's usage lines name the subcommand
    code = getattr(module, function)(rest)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
