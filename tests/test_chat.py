"""open_instruct.chat: the command parser and flag checks as units, then the chat driven in tmux as a person would."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, clean_env, copy_without_template
from open_instruct import chat
from open_instruct.chat import Command, parse_command

TMUX = "/usr/bin/tmux"


# ----------------------------------------------------------------------------------------------------------------
# The command parser
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("line, expected", [
    ("hello there", Command("message", "hello there")),
    ("  spaced  ", Command("message", "spaced")),
    ("", Command("empty")),
    ("   ", Command("empty")),
    ("/reset", Command("reset")),
    ("/RESET  ", Command("reset")),
    ("/system be brief", Command("system", "be brief")),
    ("/system   two  spaces ", Command("system", "two  spaces")),
    ("/system", Command("system", "")),
    ("/exit", Command("exit")),
    ("/quit", Command("exit")),
    ("/help", Command("help")),
    ("/frobnicate now", Command("unknown", "/frobnicate")),
    ("/", Command("unknown", "/")),
])
def test_parse_command(line, expected):
    assert parse_command(line) == expected


def test_displayable_drops_control_characters_only():
    assert chat.displayable("a\x1b[2Jb\x1a\x03c\n\td\ufffd é") == "a[2Jbc\n\td\ufffd é"


def test_unknown_hint_is_one_line_naming_the_command():
    hint = chat.unknown_hint("/frob")
    assert "\n" not in hint and "/frob" in hint and "/help" in hint


def test_loop_commands_without_a_model():
    """/system sets the prompt and resets, /reset keeps it, unknown commands hint, EOF leaves."""
    lines = iter(["/help", "/nope", "/system be brief", "/reset", ""])
    out = []

    class Out:
        def write(self, text):
            out.append(text)

        def flush(self):
            pass

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    args = chat.build_parser().parse_args(["x"])
    chat.chat_loop(None, None, args, read=read, out=Out())
    text = "".join(out)
    assert "/reset" in text and "unknown command /nope" in text and "system prompt set" in text
    assert "conversation cleared" in text
    assert chat.start_history("be brief") == [{"role": "system", "content": "be brief"}]
    assert chat.start_history(None) == []


# ----------------------------------------------------------------------------------------------------------------
# Flags and paths: exit 2 with one line, before any weights load
# ----------------------------------------------------------------------------------------------------------------
def test_defaults():
    args = chat.build_parser().parse_args(["d"])
    assert (args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed, args.system, args.device) == \
        (256, 0.7, None, None, None, None, None)
    assert chat.flag_problem(args) is None
    assert chat.generation_kwargs(chat.build_parser().parse_args(["d", "--temperature", "0"]))["do_sample"] is False


@pytest.mark.parametrize("flags, named", [
    (["--temperature", "-0.5"], "--temperature"),
    (["--max_new_tokens", "0"], "--max_new_tokens"),
    (["--top_p", "1.5"], "--top_p"),
    (["--top_k", "-1"], "--top_k"),
])
def test_bad_flags_exit_2(tiny_model_dir, flags, named, capsys, monkeypatch):
    monkeypatch.setattr(chat, "load_model", lambda *a: pytest.fail("weights loaded despite a bad flag"))
    assert chat.main([str(tiny_model_dir), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and "\n" not in err


def test_bad_paths_exit_2(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setattr(chat, "load_model", lambda *a: pytest.fail("weights loaded for a bad path"))
    missing = tmp_path / "missing"
    assert chat.main([str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(missing) in err and "--output_dir" in err and "\n" not in err

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("{}\n")
    assert chat.main([str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(empty) in err and "config.json" in err and "adapter_config.json" in err and "\n" not in err

    untemplated = copy_without_template(tiny_model_dir, tmp_path / "untemplated")
    assert chat.main([str(untemplated)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(untemplated) in err and "chat template" in err and "--chat_template_name" in err and "\n" not in err


def test_bad_path_exit_2_as_a_process(tmp_path):
    result = subprocess.run([sys.executable, "-m", "open_instruct.chat", str(tmp_path / "nope")], cwd=REPO,
                            env=clean_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and str(tmp_path / "nope") in result.stderr


# ----------------------------------------------------------------------------------------------------------------
# As a person would: the chat in a terminal (tmux), replies checked against model.generate
# ----------------------------------------------------------------------------------------------------------------
def greedy_reply(model, tokenizer, messages: list[dict], max_new_tokens: int) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=model.generation_config.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    return chat.displayable(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))  # as printed


class Terminal:
    """A detached tmux session on a private server socket running one command."""

    def __init__(self, command: list[str]):
        self.socket = f"chat-test-{os.getpid()}"
        self.tmux([TMUX, "-L", self.socket, "new-session", "-d", "-s", "chat", "-x", "220", "-y", "60", "-c",
                   str(REPO), shlex.join(command) + "; echo CHAT-EXITED=$?; sleep 600"])

    def tmux(self, cmd: list[str]) -> str:
        return subprocess.run(cmd, env=clean_env(), check=True, capture_output=True, text=True, timeout=30).stdout

    def send(self, text: str) -> None:
        self.tmux([TMUX, "-L", self.socket, "send-keys", "-t", "chat", "-l", text])
        self.tmux([TMUX, "-L", self.socket, "send-keys", "-t", "chat", "Enter"])

    def pane(self) -> str:
        return self.tmux([TMUX, "-L", self.socket, "capture-pane", "-p", "-J", "-t", "chat", "-S", "-200"])

    def wait_for(self, predicate, what: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.pane()
            if predicate(text):
                return text
            time.sleep(0.2)
        raise AssertionError(f"waited {timeout} s for {what}; the pane:\n{self.pane()}")

    def close(self) -> None:
        subprocess.run([TMUX, "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


def reply_to(text: str, message: str) -> str | None:
    """The reply line printed after the latest `you> message` line, once the bare prompt is back after it."""
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    asked = [i for i, line in enumerate(lines) if line == chat.PROMPT + message]
    if not asked or asked[-1] + 2 > len(lines) - 1 or lines[-1] != chat.PROMPT.rstrip():
        return None  # not asked yet, or the reply still streaming
    return lines[asked[-1] + 1]


def converse(terminal: Terminal, message: str) -> str:
    """Send a message and return the reply line printed for it, once the prompt is back."""
    terminal.send(message)
    return reply_to(terminal.wait_for(lambda text: reply_to(text, message) is not None, f"the reply to {message!r}"),
                    message)


def make_adapter(model_dir: Path, target: Path) -> Path:
    """A LoRA adapter made directly with peft, with non-zero weights so that its replies differ from the base's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules="all-linear", init_lora_weights=False,
                                            task_type="CAUSAL_LM"))
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(target)
    return target


@pytest.mark.integration
def test_chat_in_a_terminal(tiny_model_dir, tmp_path):
    if not Path(TMUX).exists():
        pytest.skip(f"{TMUX} is not installed")
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    first, second = "hello there", "what is two plus two"
    expected_first = greedy_reply(model, tokenizer, [{"role": "user", "content": first}], 12)
    expected_second = greedy_reply(model, tokenizer, [{"role": "system", "content": "be brief"},
                                                      {"role": "user", "content": second}], 12)
    command = [sys.executable, "-m", "open_instruct.chat", str(tiny_model_dir), "--temperature", "0",
               "--max_new_tokens", "12"]
    terminal = Terminal(command)
    try:
        terminal.wait_for(lambda text: text.rstrip().endswith(chat.PROMPT.rstrip()), "the first prompt")
        assert converse(terminal, first) == chat.REPLY_PREFIX + expected_first
        terminal.send("/system be brief")
        terminal.wait_for(lambda text: "system prompt set" in text, "/system's answer")
        terminal.send("/reset")
        terminal.wait_for(lambda text: "(conversation cleared)" in text, "/reset's answer")
        assert converse(terminal, second) == chat.REPLY_PREFIX + expected_second
        terminal.send("/exit")
        pane = terminal.wait_for(lambda text: "CHAT-EXITED=" in text, "the chat to end")
        assert "CHAT-EXITED=0" in pane
        print(pane.rstrip())  # shown with pytest -s: what the person saw
    finally:
        terminal.close()

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    adapted = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()
    expected_adapted = greedy_reply(adapted, tokenizer, [{"role": "user", "content": first}], 12)
    assert expected_adapted != expected_first  # the adapter changes the replies, so the check below means something
    terminal = Terminal([*command[:3], str(adapter), *command[4:]])
    try:
        terminal.wait_for(lambda text: text.rstrip().endswith(chat.PROMPT.rstrip()), "the adapter's first prompt")
        assert converse(terminal, first) == chat.REPLY_PREFIX + expected_adapted
        terminal.tmux([TMUX, "-L", terminal.socket, "send-keys", "-t", "chat", "C-d"])  # EOF leaves too
        assert "CHAT-EXITED=0" in terminal.wait_for(lambda text: "CHAT-EXITED=" in text, "the chat to end on Ctrl-D")
    finally:
        terminal.close()
