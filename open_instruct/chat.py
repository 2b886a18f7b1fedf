"""Chat with a model the trainer saved: a multi-turn conversation in the terminal, the reply streamed as it is made.

    python -m open_instruct.chat output/run                      # the full model (or output/run/merged)
    python -m open_instruct.chat output/lora_run                 # a LoRA adapter over the base it names
    python -m open_instruct.chat output/run --temperature 0 --max_new_tokens 512 --system "You are terse."

Each turn renders the kept history with the tokenizer's chat template (add_generation_prompt=True) and generates
until the end-of-turn / eos ids of the model's generation config (the chat template's end of turn for an adapter
too). Commands at the prompt: /reset (clear the history, keep the system prompt), /system TEXT (set the system
prompt and reset), /help, /exit (or Ctrl-D; Ctrl-C at the prompt exits, during a reply it stops the reply). Control
characters in a reply other than newline and tab are not printed (the history keeps them).
"""

from __future__ import annotations

import argparse
import sys
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path

PROMPT = "you> "
REPLY_PREFIX = "model> "
HELP = """/reset        clear the conversation (the system prompt stays)
/system TEXT  set the system prompt and clear the conversation
/help         this list
/exit         leave (also Ctrl-D, or Ctrl-C at the prompt)"""
COMMANDS = ("reset", "system", "help", "exit")


# ----------------------------------------------------------------------------------------------------------------
# Commands (pure)
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    """What a line typed at the prompt asks for: kind is "message", "empty", one of COMMANDS, or "unknown"."""

    kind: str
    text: str = ""


def parse_command(line: str) -> Command:
    """A user message, or a /command with its argument ("/system be brief" -> Command("system", "be brief"))."""
    stripped = line.strip()
    if not stripped:
        return Command("empty")
    if not stripped.startswith("/"):
        return Command("message", stripped)
    name, _, rest = stripped[1:].partition(" ")
    name = name.lower()
    if name == "quit":
        name = "exit"
    if name in COMMANDS:
        return Command(name, rest.strip())
    return Command("unknown", "/" + name)


def unknown_hint(name: str) -> str:
    return f"unknown command {name}: try /help (commands: {' '.join('/' + c for c in COMMANDS)})"


# ----------------------------------------------------------------------------------------------------------------
# Flags and checks before any weights load
# ----------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("model_dir", help="The trainer's OUTPUT_DIR (a full model, a merged model or a LoRA adapter).")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="Longest reply in tokens.")
    parser.add_argument("--temperature", type=float, default=0.7, help="Sampling temperature; 0 = greedy.")
    parser.add_argument("--top_p", type=float, default=None, help="Nucleus sampling: keep this much probability.")
    parser.add_argument("--top_k", type=int, default=None, help="Sample from the k likeliest tokens only.")
    parser.add_argument("--seed", type=int, default=None, help="Seed of the sampling (same seed, same replies).")
    parser.add_argument("--system", default=None, help="System prompt at the start of the conversation.")
    parser.add_argument("--device", default=None, help="cuda if available, else cpu.")
    return parser


def flag_problem(args) -> str | None:
    """One line naming the bad flag and the fix, or None."""
    if args.temperature < 0:
        return f"--temperature {args.temperature}: must be >= 0 (0 = greedy decoding)."
    if args.max_new_tokens < 1:
        return f"--max_new_tokens {args.max_new_tokens}: must be >= 1."
    if args.top_p is not None and not 0 < args.top_p <= 1:
        return f"--top_p {args.top_p}: must be in (0, 1]."
    if args.top_k is not None and args.top_k < 0:
        return f"--top_k {args.top_k}: must be >= 0 (0 = no limit)."
    return None


def is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def path_problem(path: Path) -> str | None:
    """A model directory has config.json, an adapter directory adapter_config.json; anything else is refused."""
    if not path.is_dir():
        return (f"{path}: no such directory. Pass the trainer's --output_dir (or its merged/ folder with "
                "--merge_lora_on_save).")
    if not (path / "config.json").is_file() and not is_adapter_dir(path):
        return (f"{path}: neither a model directory (config.json) nor a LoRA adapter (adapter_config.json). Pass the "
                "folder the trainer wrote the final model to (its --output_dir, after training finished).")
    return None


def load_tokenizer(path: Path):
    """The tokenizer saved next to the weights (an adapter's directory holds it too); None if it has no chat
    template, which main reports."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    return tokenizer if tokenizer.chat_template else None


# ----------------------------------------------------------------------------------------------------------------
# Model and generation
# ----------------------------------------------------------------------------------------------------------------
def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(path: Path, tokenizer, device: str):
    """The full (or merged) model, or the adapter on the base its adapter_config.json names; generation stops at the
    chat template's end of turn as well as the model's own eos ids."""
    from transformers import AutoModelForCausalLM

    from open_instruct.chat_templates import set_generation_stops

    if is_adapter_dir(path):
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype="auto")
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    set_generation_stops(model.generation_config, tokenizer)
    return model.to(device).eval()


def generation_kwargs(args) -> dict:
    if args.temperature == 0:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    kwargs = {"do_sample": True, "temperature": args.temperature}
    if args.top_p is not None:
        kwargs["top_p"] = args.top_p
    if args.top_k is not None:
        kwargs["top_k"] = args.top_k
    return kwargs


def displayable(text: str) -> str:
    """The text without control characters other than newline and tab: a reply (an undertrained model's bytes)
    cannot move the cursor or send escape sequences to the terminal. The history keeps the reply as generated."""
    return "".join(c for c in text if c in "\n\t" or unicodedata.category(c) != "Cc")


def prompt_ids(tokenizer, messages: list[dict], device):
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(device)


def stream_reply(model, tokenizer, messages: list[dict], args, out=sys.stdout) -> str:
    """Generate in a thread and print the reply as it streams; Ctrl-C stops it early. Returns the reply text."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    class Stop(StoppingCriteria):
        def __init__(self):
            self.event = threading.Event()

        def __call__(self, input_ids, scores, **kwargs):
            return self.event.is_set()

    stop = Stop()
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    generation = model.generation_config
    kwargs = dict(input_ids=prompt_ids(tokenizer, messages, model.device), max_new_tokens=args.max_new_tokens,
                  eos_token_id=generation.eos_token_id, pad_token_id=generation.pad_token_id,
                  streamer=streamer, stopping_criteria=StoppingCriteriaList([stop]), **generation_kwargs(args))
    failure = []

    def generate():
        try:
            with torch.no_grad():
                model.generate(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - reported in the main thread
            failure.append(exc)
            streamer.end()

    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    pieces = []
    out.write(REPLY_PREFIX)
    out.flush()
    try:
        for piece in streamer:
            pieces.append(piece)
            out.write(displayable(piece))
            out.flush()
    except KeyboardInterrupt:
        stop.event.set()
        for piece in streamer:  # the text held back until a word ended, and what the last step produced
            pieces.append(piece)
            out.write(displayable(piece))
        out.write(" [stopped]")
    thread.join()
    out.write("\n")
    out.flush()
    if failure:
        raise failure[0]
    return "".join(pieces)


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------
def start_history(system: str | None) -> list[dict]:
    return [{"role": "system", "content": system}] if system else []


def chat_loop(model, tokenizer, args, read=input, out=sys.stdout) -> None:
    system = args.system
    history = start_history(system)
    while True:
        try:
            line = read(PROMPT)
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        command = parse_command(line)
        if command.kind == "empty":
            continue
        if command.kind == "exit":
            return
        if command.kind == "help":
            out.write(HELP + "\n")
        elif command.kind == "reset":
            history = start_history(system)
            out.write("(conversation cleared)\n")
        elif command.kind == "system":
            system = command.text or None
            history = start_history(system)
            out.write(f"(system prompt {'set' if system else 'removed'}; conversation cleared)\n")
        elif command.kind == "unknown":
            out.write(unknown_hint(command.text) + "\n")
        else:
            history.append({"role": "user", "content": command.text})
            reply = stream_reply(model, tokenizer, history, args, out)
            history.append({"role": "assistant", "content": reply.strip()})
        out.flush()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = Path(args.model_dir)
    problem = flag_problem(args) or path_problem(path)
    if problem is None:
        try:
            tokenizer = load_tokenizer(path)
        except (OSError, ValueError) as exc:
            problem = f"{path}: cannot load the tokenizer ({str(exc).splitlines()[0]})."
        else:
            if tokenizer is None:
                problem = (f"{path}: the tokenizer has no chat template. Train with --chat_template_name (e.g. tulu), "
                           "or add chat_template.jinja to the directory.")
    if problem:
        print(f"open_instruct.chat: {problem}", file=sys.stderr)
        return 2
    import torch

    if args.seed is not None:
        torch.manual_seed(args.seed)
    device = args.device or default_device()
    print(f"Loading {path} on {device} ...", flush=True)
    model = load_model(path, tokenizer, device)
    print("Type a message, or /help for commands.", flush=True)
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    chat_loop(model, tokenizer, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
