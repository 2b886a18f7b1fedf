"""The tokenized-mixture cache, the audit file and the `python -m open_instruct.prepare_data` entry point."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import REPO, clean_env
from open_instruct.storage import StorageError
from open_instruct import data_cache, prepare_data
from open_instruct.args import parse_args
from open_instruct.chat_templates import CHAT_TEMPLATES
from open_instruct.data import DataError, SourceStats, resolve_mixture
from open_instruct.data_cache import (
    COMPLETED_MARKER,
    _save,
    cache_key,
    get_mixture,
    source_fingerprint,
    tokenizer_fingerprint,
)
from open_instruct.manifest import MANIFEST
from open_instruct.prepare_data import highlight, prepare, segments, write_audit
from open_instruct.tiny_model import build_tokenizer
from open_instruct.tokenization import IGNORE_INDEX

EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """The datasets cache inside tmp_path, so nothing is written to the home dir."""
    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return str(path)


def _chat(*turns: str) -> dict:
    roles = ["user", "assistant"] * len(turns)
    return {"messages": [{"role": role, "content": text} for role, text in zip(roles, turns)]}


def _args(tmp_path, *extra):
    return parse_args(["--model_name_or_path", "x", "--dataset_local_cache_dir", str(tmp_path / "cache"),
                       "--dataset_num_proc", "1", *extra])


def _examples(mixture) -> list[tuple[list[int], list[int]]]:
    ids, labels = mixture.examples(range(len(mixture)))
    return [(a.tolist(), b.tolist()) for a, b in zip(ids, labels)]


@pytest.fixture
def chat_file(tmp_path) -> str:
    return _jsonl(tmp_path / "chat.jsonl", [_chat("hi", "hello"), _chat("2+2?", "4"), _chat("bye", "ciao")])


# --- cache_key ----------------------------------------------------------------------------------------------------


def _key(tmp_path, tokenizer, mixer, *extra) -> str:
    args = _args(tmp_path, "--dataset_mixer_list", *mixer, *extra)
    return cache_key(resolve_mixture(args), tokenizer, args)


@pytest.mark.parametrize(
    "extra",
    [
        ["--seed", "7"],
        ["--max_seq_length", "100"],
        ["--train_on", "all"],
        ["--train_on", "last_assistant"],
        ["--truncation", "drop"],
        ["--truncation", "cut"],
        ["--add_bos"],
        ["--skip_bad_rows"],
        ["--max_unmaskable_fraction", "0.5"],
    ],
)
def test_cache_key_changes_with_options(tmp_path, tokenizer, chat_file, extra):
    base = _key(tmp_path, tokenizer, [chat_file, "1.0"])
    assert _key(tmp_path, tokenizer, [chat_file, "1.0"]) == base
    assert _key(tmp_path, tokenizer, [chat_file, "1.0"], *extra) != base


@pytest.mark.parametrize(
    "extra",
    [
        ["--learning_rate", "1e-4"],
        ["--num_train_epochs", "5"],
        ["--dataset_num_proc", "2"],
        ["--dataset_skip_cache"],
        ["--audit_file", "audit.jsonl"],
        ["--output_dir", "elsewhere"],
        ["--dataset_cache_on_damage", "stop"],
    ],
)
def test_cache_key_ignores_unrelated_flags(tmp_path, tokenizer, chat_file, extra):
    assert _key(tmp_path, tokenizer, [chat_file, "1.0"], *extra) == _key(tmp_path, tokenizer, [chat_file, "1.0"])


def test_cache_key_changes_with_the_mixer(tmp_path, tokenizer, chat_file):
    other = _jsonl(tmp_path / "other.jsonl", [_chat("hi", "hello")])
    keys = {
        _key(tmp_path, tokenizer, [chat_file, "1.0"]),
        _key(tmp_path, tokenizer, [chat_file, "0.5"]),
        _key(tmp_path, tokenizer, [chat_file, "2"]),
        _key(tmp_path, tokenizer, [other, "1.0"]),
        _key(tmp_path, tokenizer, [chat_file, "1.0", other, "1.0"]),
        _key(tmp_path, tokenizer, ["synthetic:spelling", "1.0"]),
        _key(tmp_path, tokenizer, ["synthetic:spelling", "1.0"], "--dataset_mixer_list_splits", "test"),
    }
    assert len(keys) == 7


def test_cache_key_follows_file_content_not_its_name(tmp_path, tokenizer, chat_file):
    before = _key(tmp_path, tokenizer, [chat_file, "1.0"])
    (item,) = resolve_mixture(_args(tmp_path, "--dataset_mixer_list", chat_file, "1.0"))
    fingerprint = source_fingerprint(item)
    pathlib.Path(chat_file).write_text(pathlib.Path(chat_file).read_text())  # rewritten, same bytes
    assert _key(tmp_path, tokenizer, [chat_file, "1.0"]) == before
    _jsonl(pathlib.Path(chat_file), [_chat("hi", "hello"), _chat("2+2?", "5"), _chat("bye", "ciao")])
    assert _key(tmp_path, tokenizer, [chat_file, "1.0"]) != before
    assert source_fingerprint(item) != fingerprint


def test_cache_key_changes_with_a_file_in_a_folder(tmp_path, tokenizer):
    (tmp_path / "data").mkdir()
    _jsonl(tmp_path / "data" / "a.jsonl", [_chat("hi", "hello")])
    before = _key(tmp_path, tokenizer, [str(tmp_path / "data"), "1.0"])
    _jsonl(tmp_path / "data" / "b.jsonl", [_chat("yo", "hey")])
    assert _key(tmp_path, tokenizer, [str(tmp_path / "data"), "1.0"]) != before


def test_cache_key_changes_with_format_and_columns(tmp_path, tokenizer):
    _jsonl(tmp_path / "chat.jsonl", [{**_chat("hi", "hello"), "chat": _chat("yo", "hey")["messages"]}])
    keys = set()
    name = tmp_path / "chat.jsonl"
    for entry in (f"{{name: {name}, amount: 1.0}}", f"{{name: {name}, amount: 1.0, format: messages}}",
                  f"{{name: {name}, amount: 1.0, columns: {{messages: chat}}}}"):
        (tmp_path / "mix.yaml").write_text(f"- {entry}\n")
        args = _args(tmp_path, "--dataset_mixer_file", str(tmp_path / "mix.yaml"))
        keys.add(cache_key(resolve_mixture(args), tokenizer, args))
    assert len(keys) == 3


def test_cache_key_follows_the_tokenizer(tmp_path, tokenizer, chat_file):
    base = _key(tmp_path, tokenizer, [chat_file, "1.0"])
    assert _key(tmp_path, build_tokenizer(), [chat_file, "1.0"]) == base  # a fresh but equal tokenizer
    chatml = build_tokenizer()
    chatml.chat_template = CHAT_TEMPLATES["chatml"]
    assert _key(tmp_path, chatml, [chat_file, "1.0"]) != base
    assert tokenizer_fingerprint(chatml) != tokenizer_fingerprint(tokenizer)
    other_eos = build_tokenizer()
    other_eos.eos_token = "<|pad|>"
    assert _key(tmp_path, other_eos, [chat_file, "1.0"]) != base


# --- get_mixture: build, cache, load ------------------------------------------------------------------------------


def test_get_mixture_builds_caches_and_loads(tmp_path, tokenizer, chat_file, monkeypatch):
    args = _args(tmp_path, "--dataset_mixer_list", chat_file, "1.0", "synthetic:spelling", "4")
    key = cache_key(resolve_mixture(args), tokenizer, args)
    logs = []
    mixture, path = get_mixture(args, tokenizer, logs.append)
    assert path == str(tmp_path / "cache" / key)
    assert sorted(os.listdir(tmp_path / "cache")) == [key]
    assert sorted(os.listdir(path)) == [COMPLETED_MARKER, "dataset", MANIFEST, "stats.json"]
    assert logs == [f"Cached the tokenized mixture in {path}"]
    saved_stats = json.loads((pathlib.Path(path) / "stats.json").read_text())
    assert [(s["name"], s["kept_rows"]) for s in saved_stats] == [(chat_file, 3), ("synthetic:spelling", 4)]
    built = _examples(mixture)
    assert len(built) == 7
    assert tokenizer.decode(built[0][0]) == "<|user|>\nhi\n<|assistant|>\nhello" + EOS
    fresh, _ = get_mixture(_args(tmp_path, "--dataset_mixer_list", chat_file, "1.0", "synthetic:spelling", "4",
                                 "--dataset_skip_cache"), tokenizer, logs.append)
    assert _examples(fresh) == built

    def no_build(*args, **kwargs):
        raise AssertionError("the mixture was tokenized again instead of loaded from the cache")

    monkeypatch.setattr(data_cache, "build_mixture", no_build)
    logs.clear()
    again, again_path = get_mixture(args, tokenizer, logs.append)
    assert again_path == path
    assert logs == [f"Loading the tokenized mixture from {path}"]
    assert _examples(again) == built
    assert [vars(s) for s in again.stats] == [vars(s) for s in mixture.stats] == [vars(s) for s in fresh.stats]


def test_get_mixture_skip_cache_builds_and_writes_nothing(tmp_path, tokenizer, chat_file, monkeypatch):
    calls = []
    original = data_cache.build_mixture

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(data_cache, "build_mixture", counting)
    skip = _args(tmp_path, "--dataset_mixer_list", chat_file, "1.0", "--dataset_skip_cache")
    mixture, path = get_mixture(skip, tokenizer, lambda _: None)
    assert path == "" and len(mixture) == 3 and len(calls) == 1
    assert not (tmp_path / "cache").exists()
    # With a complete cache in place, --dataset_skip_cache still neither reads nor writes it.
    _, cached_path = get_mixture(_args(tmp_path, "--dataset_mixer_list", chat_file, "1.0"), tokenizer, lambda _: None)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "cache").rglob("*"))
    _, path = get_mixture(skip, tokenizer, lambda _: None)
    assert path == "" and len(calls) == 3
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "cache").rglob("*")) == before


def test_get_mixture_new_key_builds_again(tmp_path, tokenizer, chat_file):
    first = _args(tmp_path, "--dataset_mixer_list", chat_file, "1.0")
    second = _args(tmp_path, "--dataset_mixer_list", chat_file, "1.0", "--max_seq_length", "10", "--truncation", "cut")
    _, first_path = get_mixture(first, tokenizer, lambda _: None)
    mixture, second_path = get_mixture(second, tokenizer, lambda _: None)
    assert first_path != second_path and len(os.listdir(tmp_path / "cache")) == 2
    assert max(len(ids) for ids, _ in _examples(mixture)) == 10


@pytest.mark.parametrize("failing", ["dataset", "stats"])
def test_interrupted_save_leaves_no_cache(tmp_path, tokenizer, chat_file, monkeypatch, failing):
    import datasets

    args = _args(tmp_path, "--dataset_mixer_list", chat_file, "1.0")
    with monkeypatch.context() as patch:
        if failing == "dataset":
            original = datasets.Dataset.save_to_disk

            def save_then_fail(self, *a, **kw):
                original(self, *a, **kw)  # the arrow files are written, then the disk fills up
                raise OSError("No space left on device")

            patch.setattr(datasets.Dataset, "save_to_disk", save_then_fail)
        else:
            original = pathlib.Path.write_text

            def fail_on_stats(self, *a, **kw):
                if self.name == "stats.json":
                    raise OSError("No space left on device")
                return original(self, *a, **kw)

            patch.setattr(pathlib.Path, "write_text", fail_on_stats)
        with pytest.raises(StorageError, match="Could not write the tokenized cache to .*: no space left on device"):
            get_mixture(args, tokenizer, lambda _: None)
    assert os.listdir(tmp_path / "cache") == []  # neither <key> nor <key>.tmp-*
    mixture, path = get_mixture(args, tokenizer, lambda _: None)
    assert (pathlib.Path(path) / COMPLETED_MARKER).exists() and len(mixture) == 3
    assert os.listdir(tmp_path / "cache") == [pathlib.Path(path).name]


def test_save_over_a_finished_cache_keeps_it(tmp_path, tokenizer, chat_file):
    mixture, path = get_mixture(_args(tmp_path, "--dataset_mixer_list", chat_file, "1.0"), tokenizer, lambda _: None)
    stats_before = (pathlib.Path(path) / "stats.json").read_text()
    other = [SourceStats("someone else", "train")]
    _save(pathlib.Path(path), mixture.dataset.select([0]), other)  # another process finished first
    assert (pathlib.Path(path) / "stats.json").read_text() == stats_before
    assert os.listdir(tmp_path / "cache") == [pathlib.Path(path).name]


# --- audit --------------------------------------------------------------------------------------------------------

FIRST_SOURCE = [_chat("héllo", "wörld ✓", "and then?", "done."), _chat("2+2?", "4"), _chat("x", "y")]
SECOND_SOURCE = [_chat("name a color", "blue"), _chat("another", "green", "one more", "red"), _chat("q", "a")]


@pytest.fixture
def two_sources(tmp_path) -> tuple[str, str]:
    return _jsonl(tmp_path / "first.jsonl", FIRST_SOURCE), _jsonl(tmp_path / "second.jsonl", SECOND_SOURCE)


def test_write_audit(tmp_path, tokenizer, two_sources):
    first, second = two_sources
    args = _args(tmp_path, "--dataset_mixer_list", first, "1.0", second, "1.0")
    mixture, _ = get_mixture(args, tokenizer, lambda _: None)
    write_audit(tmp_path / "audit.jsonl", mixture, tokenizer, 4)
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    # Round-robin over the sources: first.jsonl holds examples 0-2, second.jsonl 3-5.
    assert [(r["source"], r["index"]) for r in records] == [(first, 0), (second, 3), (first, 1), (second, 4)]
    expected_rows = [FIRST_SOURCE[0], SECOND_SOURCE[0], FIRST_SOURCE[1], SECOND_SOURCE[1]]
    for record, row in zip(records, expected_rows):
        ids, labels = mixture.examples([record["index"]])
        runs = record["segments"]
        assert "".join(r["text"] for r in runs) == tokenizer.decode(ids[0].tolist(), skip_special_tokens=False)
        assert all(a["trained"] != b["trained"] for a, b in zip(runs, runs[1:]))  # maximal runs
        replies = [m["content"] + EOS for m in row["messages"] if m["role"] == "assistant"]
        assert [r["text"] for r in runs if r["trained"]] == replies
        assert record["num_tokens"] == len(ids[0])
        assert record["num_trained_tokens"] == int((labels[0] != IGNORE_INDEX).sum()) > 0


def test_audit_writes_the_number_asked_for(tmp_path, tokenizer, two_sources):
    first, second = two_sources
    audit = tmp_path / "audit.jsonl"
    args = _args(tmp_path, "--dataset_mixer_list", first, "1.0", second, "1.0", "--audit_file", str(audit),
                 "--audit_num_examples", "3")
    logs = []
    prepare(args, tokenizer, logs.append)
    assert f"Wrote 3 audited examples to {audit}" in logs
    assert len(audit.read_text().splitlines()) == 3


def test_segments_are_maximal_runs(tokenizer):
    ids = tokenizer("abcde", add_special_tokens=False)["input_ids"]
    labels = [IGNORE_INDEX, IGNORE_INDEX, ids[2], ids[3], IGNORE_INDEX]
    assert segments(tokenizer, ids, labels) == [
        {"text": "ab", "trained": False}, {"text": "cd", "trained": True}, {"text": "e", "trained": False}]
    assert segments(tokenizer, ids, list(ids)) == [{"text": "abcde", "trained": True}]
    assert segments(tokenizer, [], []) == []


def test_highlight():
    runs = [{"text": "<|user|>\nhi\n", "trained": False}, {"text": "ok" + EOS, "trained": True},
            {"text": "\n", "trained": False}]
    assert highlight(runs, color=False) == f"<|user|>\nhi\n«ok{EOS}»\n"
    colored = highlight(runs, color=True)
    assert colored == f"\x1b[2m<|user|>\nhi\n\x1b[0m\x1b[1;32mok{EOS}\x1b[0m\x1b[2m\n\x1b[0m"
    assert "«" not in colored


def test_prepare_logs_stats_audit_and_an_example(tmp_path, tokenizer, two_sources):
    first, second = two_sources
    audit = tmp_path / "audit.jsonl"
    args = _args(tmp_path, "--dataset_mixer_list", first, "1.0", second, "2", "--audit_file", str(audit),
                 "--audit_num_examples", "2")
    logs = []
    mixture, path = prepare(args, tokenizer, logs.append)
    assert len(mixture) == 5 and path.startswith(str(tmp_path / "cache"))
    table = next(line for line in logs if line.startswith("Mixture:"))
    assert f"{first} (train)" in table and f"{second} (train)" in table and "messages" in table
    assert f"Wrote 2 audited examples to {audit}" in logs
    assert [json.loads(line)["source"] for line in audit.read_text().splitlines()] == [first, second]
    assert logs[-1] == ("Example 0 of the mixture, trained tokens between « and »:\n"
                        f"<|user|>\nhéllo\n<|assistant|>\n«wörld ✓{EOS}»\n<|user|>\nand then?\n<|assistant|>\n"
                        f"«done.{EOS}»")


# --- the command line ---------------------------------------------------------------------------------------------


class CliRun:
    """One `python -m open_instruct.prepare_data` child with its own cache dir; started at once, awaited later."""

    def __init__(self, root: pathlib.Path, model_dir, *flags):
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.cache = root, root / "cache"
        self.argv = ["--model_name_or_path", str(model_dir), "--dataset_local_cache_dir", str(self.cache),
                     "--dataset_num_proc", "1", *flags]
        env = clean_env(HF_HOME=str(root / "hf_home"), HF_DATASETS_CACHE=str(root / "hf_cache"))
        self.process = subprocess.Popen([sys.executable, "-m", "open_instruct.prepare_data", *self.argv], cwd=REPO,
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.returncode = self.stdout = self.stderr = None

    def wait(self) -> CliRun:
        if self.returncode is None:
            self.stdout, self.stderr = self.process.communicate(timeout=300)
            self.returncode = self.process.returncode
        return self


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, tiny_model_dir):
    """The three command-line runs, started together so that their start-up (imports) overlaps."""
    root = tmp_path_factory.mktemp("cli")
    (root / "data").mkdir()
    chat = _jsonl(root / "data" / "chat.jsonl", [_chat("hi", "hello"), _chat("2+2?", "4"), _chat("bye", "ciao")])
    broken = root / "data" / "broken.jsonl"
    broken.write_text(json.dumps(_chat("hi", "ok")) + "\n{not json\n")
    runs = {
        "ok": CliRun(root / "ok", tiny_model_dir, "--dataset_mixer_list", chat, "1.0", "synthetic:spelling", "2",
                     "--audit_file", str(root / "ok" / "audit.jsonl"), "--audit_num_examples", "2"),
        "missing": CliRun(root / "missing", tiny_model_dir, "--dataset_mixer_list", str(root / "nope.jsonl"), "1.0"),
        "broken": CliRun(root / "broken", tiny_model_dir, "--dataset_mixer_list", str(broken), "1.0",
                         "synthetic:spelling", "2"),
    }
    yield {"chat": chat, "missing_path": str(root / "nope.jsonl"), "broken_path": str(broken), **runs}
    for run_ in runs.values():
        if run_.process.poll() is None:
            run_.process.kill()
            run_.process.wait()


@pytest.fixture(scope="module", autouse=True)
def _start_cli_runs_early(request):
    """Start the command-line children before the in-process tests when CLI tests are selected, so their
    start-up (mostly importing torch and transformers) overlaps with the other tests."""
    if any("cli_runs" in item.fixturenames for item in request.session.items if item.module is request.module):
        request.getfixturevalue("cli_runs")


def _cache_is_empty(cache: pathlib.Path) -> bool:
    return not cache.exists() or os.listdir(cache) == []


def test_cli_prepares_the_cache_and_the_audit(cli_runs):
    from open_instruct.model_utils import load_tokenizer

    result, chat = cli_runs["ok"].wait(), cli_runs["chat"]
    assert result.returncode == 0, result.stderr[-4000:]
    assert "source" in result.stdout and "trained" in result.stdout
    assert f"{chat} (train)" in result.stdout and "synthetic:spelling (train)" in result.stdout
    # The key computed here matches the child's: a training run in another process hits this cache.
    args = parse_args(result.argv)
    key = cache_key(resolve_mixture(args), load_tokenizer(args), args)
    assert result.stdout.rstrip().endswith(f"5 examples ready in {result.cache / key}.")
    assert (result.cache / key / COMPLETED_MARKER).exists()
    records = [json.loads(line) for line in (result.root / "audit.jsonl").read_text().splitlines()]
    assert [r["source"] for r in records] == [chat, "synthetic:spelling"]
    assert [s["text"] for s in records[0]["segments"] if s["trained"]] == ["hello" + EOS]


def test_cli_missing_file_exits_2(cli_runs):
    result = cli_runs["missing"].wait()
    assert result.returncode == 2, result.stderr[-4000:]
    assert f"{cli_runs['missing_path']} does not exist" in result.stderr
    assert "Traceback" not in result.stderr and "examples ready" not in result.stdout
    assert _cache_is_empty(result.cache)


def test_cli_bad_jsonl_line_exits_2(cli_runs):
    result = cli_runs["broken"].wait()
    assert result.returncode == 2, result.stderr[-4000:]
    assert f"error: {cli_runs['broken_path']}:2: invalid JSON" in result.stderr
    assert "Traceback" not in result.stderr and "examples ready" not in result.stdout
    assert _cache_is_empty(result.cache)


def test_main_bad_row_exits_2_in_process(tmp_path, tiny_model_dir, capsys):
    path = _jsonl(tmp_path / "rows.jsonl", [_chat("hi", "ok"), {"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(SystemExit) as info:
        prepare_data.main(["--model_name_or_path", str(tiny_model_dir), "--dataset_local_cache_dir",
                           str(tmp_path / "cache"), "--dataset_num_proc", "1", "--dataset_mixer_list", path, "1.0"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {path}:2: message 0 has unknown role 'robot'" in err and "--skip_bad_rows" in err
    assert _cache_is_empty(tmp_path / "cache")


def test_main_columns_naming_a_missing_column_exits_2(tmp_path, tiny_model_dir):
    _jsonl(tmp_path / "chat.jsonl", [{"chat": _chat("hi", "ok")["messages"]}])
    (tmp_path / "mix.yaml").write_text(f"- {{name: {tmp_path / 'chat.jsonl'}, amount: 1.0, "
                                       "columns: {messages: conversation}}\n")
    with pytest.raises(SystemExit) as info:
        prepare_data.main(["--model_name_or_path", str(tiny_model_dir), "--dataset_local_cache_dir",
                           str(tmp_path / "cache"), "--dataset_num_proc", "1", "--dataset_mixer_file",
                           str(tmp_path / "mix.yaml")])
    assert info.value.code == 2


def test_main_prepares_the_eval_set_the_run_will_read(tmp_path, tiny_model_dir, capsys, monkeypatch):
    from open_instruct.args import parse_args
    from open_instruct.evaluation import eval_mixer_args
    from open_instruct.model_utils import load_tokenizer

    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_local_cache_dir", str(tmp_path / "cache"),
            "--dataset_num_proc", "1", "--dataset_mixer_list", "synthetic:spelling", "20",
            "--eval_dataset_mixer_list", "synthetic:reverse", "7"]
    prepare_data.main(argv)
    assert "7 eval examples ready in" in capsys.readouterr().out

    def no_build(*_, **__):
        raise AssertionError("the eval set should come from the cache")

    monkeypatch.setattr(data_cache, "build_mixture", no_build)
    args = parse_args(argv)
    eval_set, path = get_mixture(eval_mixer_args(args), load_tokenizer(args), lambda _: None)
    assert len(eval_set) == 7 and path.startswith(str(tmp_path / "cache"))


def test_get_mixture_spec_errors_come_first(tmp_path, tokenizer):
    args = _args(tmp_path, "--dataset_mixer_list", str(tmp_path / "missing.jsonl"), "1.0")
    with pytest.raises(DataError, match="does not exist"):
        get_mixture(args, tokenizer, lambda _: None)
    assert not (tmp_path / "cache").exists()


@pytest.mark.integration
def test_killed_prepare_leaves_no_cache_that_looks_complete(tmp_path, tiny_model_dir):
    import signal

    cache = tmp_path / "cache"
    command = [sys.executable, "-m", "open_instruct.prepare_data", "--model_name_or_path", str(tiny_model_dir),
               "--dataset_mixer_list", "synthetic:spelling", "3.0", "synthetic:letter_count", "3.0",
               "--dataset_local_cache_dir", str(cache), "--dataset_num_proc", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    for line in process.stdout:  # kill the whole job while it tokenizes, as a scheduler's preemption would
        if "Tokenizing" in line:
            os.killpg(process.pid, signal.SIGKILL)
            break
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not any(cache.glob("*/COMPLETED")), "a killed prepare left a cache that looks complete"
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert len(list(cache.glob("*/COMPLETED"))) == 1
