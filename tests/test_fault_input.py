"""Bad input that used to end in a traceback, a deep library message or a long wait (issue 15, part 7): each is one
line on stderr, exit status 2, before anything expensive runs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, clean_env, finetune, run, with_cache_dir
from open_instruct import source_checks
from open_instruct.args import parse_args
from open_instruct.data import DataError, EncodeOptions, build_mixture, format_stats, load_source, parse_mixer
from open_instruct.evaluation import load_mc_file
from open_instruct.launch import LaunchError, read_deepspeed_config
from open_instruct.model_utils import ModelSetupError

pytestmark = pytest.mark.faults

CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
# A Latin-1 "é" (the byte 0xe9, column 47), where UTF-8 spells it with two bytes.
NOT_UTF8 = b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "ok"}]}'
NOT_UTF8_REASON = "not valid UTF-8 (byte 0xe9 at column 47: invalid continuation byte)"


def write_lines(path: Path, *lines: bytes | str) -> Path:
    path.write_bytes(b"".join((line.encode() if isinstance(line, str) else line) + b"\n" for line in lines))
    return path


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The run failed as a user error: exit 2, no traceback, and stderr ends with one `error:` line."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr[-3000:]
    return last[len("error: "):]


def model_never_loaded(result: subprocess.CompletedProcess) -> bool:
    return "M parameters, attention" not in result.stderr  # the trainer's log line right after the model loads


def trainer_args(model, output_dir, *mixture) -> list[str]:
    return ["--model_name_or_path", str(model), "--output_dir", str(output_dir),
            "--dataset_mixer_list", *(mixture or ("synthetic:spelling", "8")), "--max_train_steps", "1"]


def offline_env(tmp_path, **extra) -> dict:
    """conftest's child environment (HF_HUB_OFFLINE=1) with empty Hugging Face caches of its own."""
    return clean_env(HF_HOME=str(tmp_path / "hf_home"), **extra)


# ----------------------------------------------------------------------------------------------------------------
# 1. A line that is not UTF-8 (or not JSON)
# ----------------------------------------------------------------------------------------------------------------
def test_a_jsonl_line_that_is_not_utf8_names_the_file_and_line(tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", CHAT, "", NOT_UTF8, CHAT)
    (item,) = parse_mixer([str(path), "1.0"], ["train"])
    with pytest.raises(DataError) as info:
        load_source(item)
    assert str(info.value) == f"{path}:3: {NOT_UTF8_REASON}. Fix or remove the line."


def test_skip_bad_rows_skips_and_counts_lines_that_are_not_utf8_or_not_json(tmp_path, monkeypatch):
    from open_instruct.tiny_model import build_tokenizer

    monkeypatch.chdir(tmp_path)
    path = write_lines(tmp_path / "chat.jsonl", CHAT, NOT_UTF8, "{not json", CHAT, NOT_UTF8)
    items = parse_mixer([str(path), "1.0"], ["train"])
    dataset, (stats,) = build_mixture(items, build_tokenizer(), EncodeOptions(64), seed=0, skip_bad_rows=True,
                                      num_proc=1)
    assert stats.dropped == {"not_utf8": 2, "invalid_json": 1}
    assert (stats.source_rows, stats.kept_rows, len(dataset)) == (2, 2, 2)
    assert "not_utf8=2, invalid_json=1" in format_stats([stats])
    with pytest.raises(DataError, match=rf"{path}:2: not valid UTF-8"):  # without the flag: the first bad line
        build_mixture(items, build_tokenizer(), EncodeOptions(64), seed=0, num_proc=1)


def test_a_json_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "chats.json"
    path.write_bytes(b"[\n" + CHAT.encode() + b",\n" + NOT_UTF8 + b"\n]\n")
    (item,) = parse_mixer([str(path), "1.0"], ["train"])
    with pytest.raises(DataError) as info:
        load_source(item)
    assert str(info.value) == f"{path}:3: {NOT_UTF8_REASON}. Fix or remove the line."


def test_a_multiple_choice_file_gives_the_same_utf8_message(tmp_path):
    question = json.dumps({"question": "2+2?", "choices": ["3", "4"], "answer": 1})
    path = write_lines(tmp_path / "mc.jsonl", question, NOT_UTF8)
    with pytest.raises(DataError) as info:
        load_mc_file(path)
    assert str(info.value) == f"{path}:2: {NOT_UTF8_REASON}. Fix or remove the line."


@pytest.mark.integration
def test_the_trainer_stops_at_a_line_that_is_not_utf8_before_loading_the_model(tiny_model_dir, tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", CHAT, NOT_UTF8)
    result = finetune(trainer_args(tiny_model_dir, tmp_path / "run", str(path), "1.0"), check=False)
    assert one_error_line(result) == f"{path}:2: {NOT_UTF8_REASON}. Fix or remove the line."
    assert model_never_loaded(result)


# ----------------------------------------------------------------------------------------------------------------
# 2. and 3. A model path that does not exist; a hub repo that cannot be reached or is not in the offline cache
# ----------------------------------------------------------------------------------------------------------------
def check(*flags: str, mixture=("synthetic:spelling", "8")):
    source_checks.check_run_sources(parse_args(["--dataset_mixer_list", *mixture, *flags]))


def test_local_model_paths_that_cannot_be_a_model_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.bin").write_text("")
    with pytest.raises(ModelSetupError, match=r"^--model_name_or_path empty: the directory has no config.json; "):
        check("--model_name_or_path", "empty")
    with pytest.raises(ModelSetupError, match=r"^--model_name_or_path weights.bin is a file; "):
        check("--model_name_or_path", "weights.bin")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(ModelSetupError) as info:  # a path, and no hub id: never asked on the hub
        check("--model_name_or_path", "model", "--tokenizer_name_or_path", "./no-tokenizer")
    assert str(info.value) == (f"--tokenizer_name_or_path ./no-tokenizer: no such directory (relative paths start "
                               f"from {tmp_path}), and not a hub id (org/name) either.")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{}")  # a tokenizer folder needs no config.json
    check("--model_name_or_path", "model", "--tokenizer_name_or_path", "tok")


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 with an empty hub cache and datasets cache of this test's own."""
    import datasets
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    return tmp_path


def test_offline_a_hub_dataset_outside_the_cache_is_named_with_the_fix(offline_hub):
    (offline_hub / "model").mkdir()
    (offline_hub / "model" / "config.json").write_text("{}")
    with pytest.raises(DataError) as info:
        check("--model_name_or_path", "model", mixture=("org/chats@v1", "1.0"))
    assert str(info.value) == (
        f"dataset org/chats@v1: not a local file or folder (relative paths start from {offline_hub}), and with "
        f"HF_HUB_OFFLINE=1 only the local cache ({offline_hub / 'datasets'}) is read, which does not hold it. Fix the "
        "path, or load it once with the hub reachable (datasets then caches it), or unset HF_HUB_OFFLINE.")


def test_offline_a_hub_model_in_the_cache_passes(offline_hub):
    snapshot = offline_hub / "hub" / "models--org--model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (offline_hub / "hub" / "models--org--model" / "refs").mkdir()
    (offline_hub / "hub" / "models--org--model" / "refs" / "main").write_text("abc123")
    check("--model_name_or_path", "org/model")
    with pytest.raises(ModelSetupError, match=r"^--model_name_or_path org/model: not a local directory with config"):
        check("--model_name_or_path", "org/model", "--model_revision", "v2")  # another revision is not cached


def test_online_a_repo_the_hub_does_not_know_is_neither_local_nor_on_the_hub(tmp_path, monkeypatch):
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(repo):
        response = httpx2.Response(404, request=httpx2.Request("HEAD", f"https://huggingface.co/{repo.repo_id}"))
        raise RepositoryNotFoundError("404", response=response)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(source_checks, "ask_for_file", not_found)
    with pytest.raises(ModelSetupError) as info:
        check("--model_name_or_path", "output/no-such-model")
    assert str(info.value) == (
        f"--model_name_or_path output/no-such-model: neither a local directory with config.json (relative paths "
        f"start from {tmp_path}) nor a model on the Hugging Face Hub (or it is private and this login cannot read "
        "it). Fix the path or the repo id.")


@pytest.mark.integration
def test_a_model_path_that_does_not_exist_fails_before_anything_loads(tmp_path):
    result = finetune(trainer_args("output/no-such-model", tmp_path / "run"), env=offline_env(tmp_path), check=False)
    assert one_error_line(result) == (
        f"--model_name_or_path output/no-such-model: not a local directory with config.json (relative paths start "
        f"from {REPO}), and with HF_HUB_OFFLINE=1 only the local cache ({tmp_path / 'hf_home' / 'hub'}) is read, "
        "which does not hold it. Fix the path, or download it first (hf download output/no-such-model), or unset "
        "HF_HUB_OFFLINE.")
    assert not (tmp_path / "run").exists()  # before the accelerator and the output directory


@pytest.mark.integration
def test_an_unreachable_hub_is_one_line_within_seconds(tiny_model_dir, tmp_path):
    # A closed local port: the connection is refused at once, as on a machine without a route to the hub.
    env = offline_env(tmp_path, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9")
    started = time.monotonic()
    model = finetune(trainer_args("org/some-model", tmp_path / "run"), env=env, check=False)
    data = finetune(trainer_args(tiny_model_dir, tmp_path / "run", "org/some-chats", "1.0"), env=env, check=False)
    assert time.monotonic() - started < 60  # the hub client's retries alone took ~25 s per file
    unreachable = "cannot reach the Hugging Face Hub at http://127.0.0.1:9 (ConnectError: [Errno 111] Connection refused)"
    # "org/some-model" could be a mistyped local path as well as a repo id: the line says both.
    assert one_error_line(model) == (
        f"--model_name_or_path org/some-model: not a local directory with config.json (relative paths start from "
        f"{REPO}), and as a hub repo: {unreachable}, and the local cache ({tmp_path / 'hf_home' / 'hub'}) does not "
        "hold it. Fix the path, or check the network, the proxy or HF_ENDPOINT.")
    assert one_error_line(data).startswith(f"dataset org/some-chats: not a local file or folder (relative paths start "
                                           f"from {REPO}), and as a hub repo: {unreachable}, and the local cache (")
    assert model_never_loaded(data)


def test_load_errors_after_the_check_are_one_line(monkeypatch):
    """What the start-up check cannot see (files missing from a cached copy, the network gone since) still ends in
    one line naming the flag or the dataset."""
    import datasets
    import transformers

    from open_instruct.data import MixerItem
    from open_instruct.model_utils import load_tokenizer

    def refused(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/chats' on the Hub (ConnectError)")

    monkeypatch.setattr(datasets, "load_dataset", refused)
    with pytest.raises(DataError) as info:
        load_source(MixerItem("org/chats", 1.0, True, "train", "hub"))
    assert str(info.value) == ("dataset org/chats: cannot load it from the Hugging Face Hub (ConnectionError: "
                               "Couldn't reach 'org/chats' on the Hub (ConnectError)).")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refused)
    with pytest.raises(ModelSetupError, match=r"^--model_name_or_path org/model: cannot load the tokenizer \("):
        load_tokenizer(parse_args(["--model_name_or_path", "org/model", "--dataset_mixer_list", "synthetic:spelling",
                                   "1"]))


# ----------------------------------------------------------------------------------------------------------------
# 4. An unknown chat template; 6. a YAML value of the wrong type
# ----------------------------------------------------------------------------------------------------------------
BASE = ["--model_name_or_path", "m", "--dataset_mixer_list", "synthetic:spelling", "1.0"]


def parse_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_an_unknown_chat_template_is_rejected_with_the_flags(capsys):
    err = parse_error(BASE + ["--chat_template_name", "tuluu"], capsys)
    assert ("--chat_template_name 'tuluu' is not a known template; choose one of chatml, hermes, llama3, "
            "llama3_tools, olmo, olmo3_instruct, olmo3_think, qwen, qwen3, simple_chat, tulu, zephyr, or leave it unset to use the tokenizer's own template.") in err


@pytest.mark.parametrize("line, message", [
    ("learning_rate: fast", "learning_rate: invalid float value: 'fast'"),
    ("max_seq_length: [1, 2]", "max_seq_length: expected a single value, got [1, 2]."),
    ("padding_free: {a: 1}", "padding_free: expected a single value, got {'a': 1}."),
    ("truncation: sideways", "truncation: invalid choice: 'sideways' (choose from 'whole_turns', 'drop', 'cut')"),
])
def test_a_yaml_value_of_the_wrong_type_names_the_file_and_key(tmp_path, capsys, line, message):
    config = tmp_path / "run.yaml"
    config.write_text(f"model_name_or_path: m\ndataset_mixer_list: [synthetic:spelling, '1.0']\n{line}\n")
    err = parse_error([str(config)], capsys)
    assert err == f"python -m open_instruct.finetune: error: Config file {config}: {message}\n"


def test_a_config_or_mixture_file_that_is_not_utf8_names_the_file_and_line(tmp_path, capsys):
    from open_instruct.data import DataError, parse_mixer_file

    config = tmp_path / "run.yaml"
    config.write_bytes(b"model_name_or_path: m\nexp_name: caf\xe9\n")
    err = parse_error([str(config)], capsys)
    assert err == (f"python -m open_instruct.finetune: error: Config file {config}:2: not valid UTF-8 (byte 0xe9 at "
                   "column 14: invalid continuation byte). Fix or remove the line.\n")
    mixture = tmp_path / "mix.yaml"
    mixture.write_bytes(b"- name: synthetic:spelling\n  amount: 10\n# caf\xe9\n")
    with pytest.raises(DataError, match=rf"^{mixture}:3: not valid UTF-8 \(byte 0xe9 at column 6"):
        parse_mixer_file(mixture)


def test_a_flag_of_the_wrong_type_keeps_argparse_message(capsys):
    err = parse_error(BASE + ["--learning_rate", "fast"], capsys)
    assert err.strip().endswith("error: argument --learning_rate/--learning-rate: invalid float value: 'fast'")


# ----------------------------------------------------------------------------------------------------------------
# 5. A missing or broken DeepSpeed config
# ----------------------------------------------------------------------------------------------------------------
def test_deepspeed_config_files_that_are_missing_or_not_a_json_object_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.json").write_text('{"zero_optimization": {"stage": 3},\n}\n')
    (tmp_path / "list.json").write_text("[1, 2]\n")
    cases = {
        "missing.json": f"--deepspeed_config_file missing.json: no such file (relative paths start from {tmp_path}). "
                        "configs/ds_configs/ has working ones.",
        "broken.json": "--deepspeed_config_file broken.json:2: not valid JSON (Expecting property name enclosed in "
                       "double quotes). Fix the file; configs/ds_configs/ has working ones.",
        "list.json": "--deepspeed_config_file list.json must hold a JSON object (a mapping of DeepSpeed settings), not "
                     "a list.",
    }
    for name, message in cases.items():
        with pytest.raises(LaunchError) as info:
            read_deepspeed_config(name)
        assert str(info.value) == message


@pytest.mark.integration
def test_the_worker_names_a_broken_deepspeed_config_before_building_the_accelerator(tiny_model_dir, tmp_path):
    broken = tmp_path / "ds.json"
    broken.write_text('{"zero_optimization": {"stage": 3},\n}\n')
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "1", "--use_deepspeed",
                "--deepspeed_config_file", str(broken), "-m", "open_instruct.finetune"]
    result = run([*launcher, *with_cache_dir(trainer_args(tiny_model_dir, tmp_path / "run"))], check=False)
    # The worker's own line; the launcher (torch's elastic agent) then reports the failed worker in its own words.
    assert (f"error: --deepspeed_config_file {broken}:2: not valid JSON (Expecting property name enclosed in double "
            "quotes). Fix the file; configs/ds_configs/ has working ones.\n") in result.stderr
    assert "exitcode: 2" in result.stderr and "JSONDecodeError" not in result.stderr
    assert model_never_loaded(result)


@pytest.mark.integration
def test_mason_checks_the_deepspeed_config_for_cpu_layouts_too(tiny_model_dir, tmp_path):
    result = run([sys.executable, "mason.py", "--backend", "print", "--gpus_per_node", "0", "--skip_hub_checks", "--",
                  "accelerate", "launch", "--use_deepspeed", "--deepspeed_config_file", str(tmp_path / "nope.json"),
                  "-m", "open_instruct.finetune", *trainer_args(tiny_model_dir, tmp_path / "run")], check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"mason: error: --deepspeed_config_file {tmp_path / 'nope.json'}: no such file "
                                     f"(relative paths start from {REPO}). configs/ds_configs/ has working ones.")


# ----------------------------------------------------------------------------------------------------------------
# 7. A run that fails before training leaves no run record
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_a_run_that_fails_on_bad_data_leaves_no_run_record(tiny_model_dir, tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", CHAT, "{not json")
    out = tmp_path / "run"
    result = finetune(trainer_args(tiny_model_dir, out, str(path), "1.0"), check=False)
    assert one_error_line(result) == f"{path}:2: invalid JSON (Expecting property name enclosed in double quotes). " \
                                     "Fix or remove the line."
    assert out.is_dir()  # the run got as far as its output directory
    assert not (out / "run_config.yaml").exists() and not (out / "environment.json").exists()
