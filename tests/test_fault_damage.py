"""Damaged files: checkpoints and tokenized caches whose files went missing, were truncated or had bytes changed.

Manifests (open_instruct/manifest.py) are tested on literal files; checkpoint choice on literal folders; the trainer
then through its real entry point: a damaged newest checkpoint falls back to the previous one and the run still
reproduces the uninterrupted run, a damaged cache is rebuilt and trains exactly as a fresh one.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO, finetune, read_metrics, run, train_args, with_cache_dir
from open_instruct import data_cache, manifest
from open_instruct.args import parse_args
from open_instruct.checkpointing import CheckpointError, complete_checkpoints, verified_checkpoint_to_resume
from open_instruct.data import DataError
from open_instruct.data_cache import get_mixture
from open_instruct.manifest import (
    COMPLETED_MARKER,
    MANIFEST,
    describe,
    folder_problems,
    mark_complete,
    record_manifest,
    share_of,
    spread_hashes,
)
from test_checkpointing import ZERO3, make_checkpoint, step_metrics, with_fault

pytestmark = pytest.mark.faults
ONE_PROCESS = SimpleNamespace(is_main_process=True, process_index=0, num_processes=1)


# ----------------------------------------------------------------------------------------------------------------
# Damage, as a failing disk or an interrupted copy leaves it
# ----------------------------------------------------------------------------------------------------------------
def delete(path: Path) -> None:
    path.unlink()


def truncate(path: Path) -> None:
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def flip_byte(path: Path, at: float = 0.5) -> None:
    """One byte changed, the size kept: only a checksum sees it."""
    with path.open("r+b") as handle:
        handle.seek(int(path.stat().st_size * at))
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))


def overwrite(path: Path, at: float, data: bytes) -> None:
    with path.open("r+b") as handle:
        handle.seek(int(path.stat().st_size * at))
        handle.write(data)


# ----------------------------------------------------------------------------------------------------------------
# Unit: manifests on literal files
# ----------------------------------------------------------------------------------------------------------------
def sealed_folder(root: Path, **record) -> Path:
    """A finished folder as the trainer leaves one: files, manifest, then the COMPLETED marker."""
    root.mkdir(parents=True)
    (root / "weights.bin").write_bytes(bytes(range(256)) * 16)
    (root / "sub").mkdir()
    (root / "sub" / "shard_1.pt").write_bytes(b"shard one" * 100)
    (root / "state.json").write_text('{"step": 2}')
    record_manifest(root)
    mark_complete(root, **record)
    return root


def test_the_manifest_lists_every_file_but_itself_and_the_marker(tmp_path):
    folder = sealed_folder(tmp_path / "f")
    files = json.loads((folder / MANIFEST).read_text())["files"]
    assert sorted(files) == ["state.json", "sub/shard_1.pt", "weights.bin"]
    assert files["weights.bin"]["size"] == 4096 and len(files["weights.bin"]["sha256"]) == 64
    assert json.loads((folder / COMPLETED_MARKER).read_text()) == {"manifest": MANIFEST}
    assert folder_problems(folder) == []


@pytest.mark.parametrize("damage, problem", [
    (lambda f: delete(f / "sub" / "shard_1.pt"), "sub/shard_1.pt: missing"),
    (lambda f: truncate(f / "weights.bin"), "weights.bin: size 2048, expected 4096"),
    (lambda f: flip_byte(f / "weights.bin"), "weights.bin: checksum differs"),
    (lambda f: delete(f / MANIFEST), "manifest.json: missing"),
    (lambda f: (f / MANIFEST).write_text('{"files": {"weights.bin": '), "manifest.json: unreadable (JSONDecodeError"),
], ids=["deleted", "truncated", "byte_flipped", "manifest_deleted", "manifest_truncated"])
def test_each_kind_of_damage_is_named(tmp_path, damage, problem):
    folder = sealed_folder(tmp_path / "f")
    damage(folder)
    problems = folder_problems(folder)
    assert len(problems) == 1 and problems[0].startswith(problem), problems


@pytest.mark.parametrize("marker", ['{"step": 2}', ""])
def test_a_folder_from_before_manifests_is_unverifiable_not_damaged(tmp_path, marker):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"x")
    (folder / COMPLETED_MARKER).write_text(marker)  # what checkpoints and caches wrote before manifests
    assert folder_problems(folder) is None


def test_shares_are_disjoint_complete_and_balanced_by_bytes():
    sizes = {"optim_rank_0.pt": 100, "optim_rank_1.pt": 100, "model_rank_0.pt": 40, "model_rank_1.pt": 40,
             "scheduler.bin": 1, "random_states_0.pkl": 2, "random_states_1.pkl": 2, "trainer_state.json": 1}
    shares = [share_of(sizes, rank, 2) for rank in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(sizes) and not set(shares[0]) & set(shares[1])
    loads = [sum(sizes[name] for name in share) for share in shares]
    assert abs(loads[0] - loads[1]) <= 2, shares  # not round-robin by name: both optimizer shards would land together
    assert share_of(sizes, 0, 1) == sorted(sizes)
    assert share_of(sizes, 3, 4) and share_of({"a": 1}, 1, 2) == []  # more ranks than files: some hash nothing


def test_each_rank_hashes_only_its_share(tmp_path, monkeypatch):
    folder = sealed_folder(tmp_path / "f")
    sizes = manifest.file_sizes(folder)
    hashed = []
    monkeypatch.setattr(manifest, "sha256_file", lambda path: hashed.append(path.relative_to(folder).as_posix()) or "h")
    rank_1 = SimpleNamespace(is_main_process=False, process_index=1, num_processes=2)
    monkeypatch.setattr("accelerate.utils.gather_object", lambda part: [{"from rank 0": "h0"}, *part])
    hashes = spread_hashes(folder, sizes, rank_1)
    assert hashed == share_of(sizes, 1, 2) and 0 < len(hashed) < len(sizes)
    assert hashes == {"from rank 0": "h0", **{name: "h" for name in hashed}}  # every rank gets every share


def test_a_long_list_of_problems_stays_on_one_line():
    problems = [f"shard_{i}.pt: checksum differs" for i in range(64)]
    assert describe(problems) == ("shard_0.pt: checksum differs; shard_1.pt: checksum differs; "
                                  "shard_2.pt: checksum differs; and 61 more")


# ----------------------------------------------------------------------------------------------------------------
# Unit: which checkpoint resumes, on literal folders (one process)
# ----------------------------------------------------------------------------------------------------------------
def sealed_checkpoint(output: Path, step: int) -> Path:
    path = make_checkpoint(output, step)
    (path / "model.safetensors").write_bytes(bytes([step]) * 1000)
    record_manifest(path)
    mark_complete(path, step=step)
    return path


def test_auto_falls_back_to_the_newest_intact_checkpoint_and_sets_the_damaged_aside(tmp_path, caplog):
    for step in (2, 4, 6):
        sealed_checkpoint(tmp_path, step)
    (tmp_path / "checkpoints" / "step_6.damaged").mkdir()  # an earlier fallback's: kept, never overwritten
    delete(tmp_path / "checkpoints" / "step_6" / "model.safetensors")
    flip_byte(tmp_path / "checkpoints" / "step_4" / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        chosen = verified_checkpoint_to_resume(ONE_PROCESS, "auto", tmp_path)
    assert chosen == tmp_path / "checkpoints" / "step_2"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_2", "step_4.damaged", "step_6.damaged", "step_6.damaged-1"]
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_2"]  # pruning and later saves never see them
    assert ("step_6 is damaged (model.safetensors: missing): moved it to step_6.damaged-1. Resuming step_2, the "
            "newest intact checkpoint." in caplog.text)
    assert "step_4 is damaged (model.safetensors: checksum differs): moved it to step_4.damaged." in caplog.text


def test_auto_with_no_intact_checkpoint_is_an_error_that_moves_nothing(tmp_path):
    for step in (2, 4):
        sealed_checkpoint(tmp_path, step)
        truncate(tmp_path / "checkpoints" / f"step_{step}" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"No intact checkpoint in .*checkpoints: step_4 \(model.safetensors: "
                                              r"size 500, expected 1000\), step_2 \(.*\)\. Nothing was moved"):
        verified_checkpoint_to_resume(ONE_PROCESS, "auto", tmp_path)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_2", "step_4"]


def test_an_explicit_damaged_checkpoint_is_an_error(tmp_path):
    path = sealed_checkpoint(tmp_path, 2)
    flip_byte(path / "trainer_state.json")
    with pytest.raises(CheckpointError, match=r"step_2 is damaged \(trainer_state.json: checksum differs\)"):
        verified_checkpoint_to_resume(ONE_PROCESS, str(path), tmp_path)
    assert path.is_dir()  # an explicit path is the user's: never moved


def test_a_checkpoint_from_before_manifests_resumes_with_a_warning(tmp_path, caplog):
    old = make_checkpoint(tmp_path, 2)  # COMPLETED without "manifest", no manifest.json
    with caplog.at_level(logging.WARNING):
        assert verified_checkpoint_to_resume(ONE_PROCESS, "auto", tmp_path) == old
        assert verified_checkpoint_to_resume(ONE_PROCESS, str(old), tmp_path) == old
    assert "step_2 has no manifest (saved before checkpoints were verified): resuming it unverified." in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# Unit: the cache (in-process, with the embedded tokenizer)
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def cache_args(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    return parse_args(["--model_name_or_path", "x", "--dataset_local_cache_dir", str(tmp_path / "cache"),
                       "--dataset_num_proc", "1", "--dataset_mixer_list", "synthetic:spelling", "6"])


@pytest.fixture(scope="module")
def tokenizer():
    from open_instruct.tiny_model import build_tokenizer

    return build_tokenizer()


def count_builds(monkeypatch) -> list[int]:
    builds, original = [], data_cache.build_mixture
    monkeypatch.setattr(data_cache, "build_mixture", lambda *a, **kw: builds.append(1) or original(*a, **kw))
    return builds


def test_a_cache_from_before_manifests_is_rebuilt_with_a_warning(tmp_path, cache_args, tokenizer, monkeypatch, caplog):
    _, path = get_mixture(cache_args, tokenizer, lambda _: None)
    (Path(path) / MANIFEST).unlink()
    (Path(path) / COMPLETED_MARKER).write_text("")  # as caches were written before manifests
    builds = count_builds(monkeypatch)
    with caplog.at_level(logging.WARNING):
        mixture, again = get_mixture(cache_args, tokenizer, lambda _: None)
    assert again == path and len(mixture) == 6 and builds == [1]
    assert f"The tokenized cache {path} has no manifest (written before caches were verified)" in caplog.text
    assert folder_problems(Path(path)) == []
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [Path(path).name]  # nothing left aside


def test_stop_leaves_a_damaged_cache_in_place_and_names_it(tmp_path, cache_args, tokenizer, monkeypatch):
    _, path = get_mixture(cache_args, tokenizer, lambda _: None)
    flip_byte(Path(path) / "stats.json")
    builds = count_builds(monkeypatch)
    stop = parse_args(["--model_name_or_path", "x", "--dataset_local_cache_dir", str(tmp_path / "cache"),
                       "--dataset_mixer_list", "synthetic:spelling", "6", "--dataset_cache_on_damage", "stop"])
    with pytest.raises(DataError, match=rf"The tokenized cache {path} is damaged \(stats.json: checksum differs\)"):
        get_mixture(stop, tokenizer, lambda _: None)
    assert builds == [] and folder_problems(Path(path)) == ["stats.json: checksum differs"]


def test_processes_that_load_after_a_verified_cache_do_not_hash_it(cache_args, tokenizer, monkeypatch):
    """Under many processes only rank 0 and each node's local main process verify; the others trust them."""
    get_mixture(cache_args, tokenizer, lambda _: None)
    monkeypatch.setattr(data_cache, "folder_problems", lambda *_: pytest.fail("a later process re-hashed the cache"))
    mixture, _ = get_mixture(cache_args, tokenizer, lambda _: None, verify=False)
    assert len(mixture) == 6


def test_a_cache_another_run_set_aside_first_is_no_error(tmp_path):
    data_cache._discard(tmp_path / "gone")  # the other run's rename won: nothing left to move
    kept = tmp_path / "key"
    kept.mkdir()
    data_cache._discard(kept)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------
# Integration: the trainer, one process
# ----------------------------------------------------------------------------------------------------------------
def checkpointed_args(model_dir, out):
    return train_args(model_dir, out, "--checkpointing_steps", "2")


@pytest.fixture(scope="module")
def killed_after_step_4(tiny_model_dir, tmp_path_factory) -> Path:
    """A run SIGKILLed right after its step-4 checkpoint: checkpoints step_2 and step_4, metrics of steps 1-4."""
    out = tmp_path_factory.mktemp("killed") / "run"
    killed = with_fault(checkpointed_args(tiny_model_dir, out), "kill_after_save", 4)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [p.name for p in complete_checkpoints(out)] == ["step_2", "step_4"]
    return out


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


@pytest.mark.integration
@pytest.mark.parametrize("damage, file, problem", [
    (delete, "model.safetensors", "missing"),
    (truncate, "optimizer.bin", "size {half}, expected {size}"),
    (flip_byte, "model.safetensors", "checksum differs"),
], ids=["deleted", "truncated", "byte_flipped"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tiny_model_dir, tmp_path, killed_after_step_4,
                                                                   straight_run, damage, file, problem):
    out = copy_of(killed_after_step_4, tmp_path)
    size = (out / "checkpoints" / "step_4" / file).stat().st_size
    damage(out / "checkpoints" / "step_4" / file)
    problem = f"{file}: " + problem.format(half=size // 2, size=size)
    result = finetune(checkpointed_args(tiny_model_dir, out))
    assert (f"Checkpoint {out}/checkpoints/step_4 is damaged ({problem}): moved it to step_4.damaged. Resuming "
            "step_2, the newest intact checkpoint." in result.stderr)
    assert json.loads((out / "summary.json").read_text())["resumed_from"].endswith("step_2")
    assert step_metrics(out) == step_metrics(straight_run)  # bitwise, as if never interrupted
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_4", "step_4.damaged", "step_6"]


@pytest.mark.integration
def test_an_explicit_damaged_checkpoint_stops_the_run_in_one_line(tiny_model_dir, tmp_path, killed_after_step_4):
    out = copy_of(killed_after_step_4, tmp_path)
    step_4 = out / "checkpoints" / "step_4"
    flip_byte(step_4 / "optimizer.bin")
    result = finetune([*checkpointed_args(tiny_model_dir, out), "--resume_from_checkpoint", str(step_4)], check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --resume_from_checkpoint {step_4} is damaged (optimizer.bin: checksum differs). "
                      "Restore its files, or resume another checkpoint ('auto' takes the newest intact one of "
                      "--output_dir)."]
    assert "Traceback" not in result.stderr and "parameters" not in result.stderr  # the model never loaded
    assert step_4.is_dir()


@pytest.mark.integration
def test_no_intact_checkpoint_stops_the_run_naming_each_one(tiny_model_dir, tmp_path, killed_after_step_4):
    out = copy_of(killed_after_step_4, tmp_path)
    delete(out / "checkpoints" / "step_4" / "model.safetensors")
    flip_byte(out / "checkpoints" / "step_2" / "random_states_0.pkl")
    result = finetune(checkpointed_args(tiny_model_dir, out), check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert (f"error: No intact checkpoint in {out}/checkpoints: step_4 (model.safetensors: missing), step_2 "
            "(random_states_0.pkl: checksum differs). Nothing was moved or deleted. Restore the damaged files, or "
            "start the run over in another --output_dir." in result.stderr)
    assert "Traceback" not in result.stderr and "parameters" not in result.stderr
    assert [p.name for p in complete_checkpoints(out)] == ["step_2", "step_4"]
    assert len(read_metrics(out)) == 4  # the killed run's log untouched


@pytest.mark.integration
def test_a_checkpoint_from_before_manifests_resumes_the_run(tiny_model_dir, tmp_path, killed_after_step_4,
                                                           straight_run):
    out = copy_of(killed_after_step_4, tmp_path)
    step_4 = out / "checkpoints" / "step_4"
    (step_4 / MANIFEST).unlink()
    (step_4 / COMPLETED_MARKER).write_text(json.dumps({"step": 4}))  # the marker as it was before manifests
    result = finetune(checkpointed_args(tiny_model_dir, out))
    unverified = f"{step_4} has no manifest (saved before checkpoints were verified): resuming it unverified."
    assert unverified in result.stderr
    assert json.loads((out / "summary.json").read_text())["resumed_from"].endswith("step_4")
    assert step_metrics(out) == step_metrics(straight_run)


@pytest.fixture(scope="module")
def fresh_cache(tiny_model_dir, tmp_path_factory) -> Path:
    """The tokenized cache of train_args' mixture, as `prepare_data` writes it."""
    cache = tmp_path_factory.mktemp("fresh_cache")
    run([sys.executable, "-m", "open_instruct.prepare_data",
         *train_args(tiny_model_dir, cache / "unused", "--dataset_local_cache_dir", str(cache))])
    return cache


def damaged_cache(fresh_cache: Path, tmp_path: Path, damage) -> tuple[Path, Path]:
    """A copy of the fresh cache with its Arrow data damaged: (the cache dir, the damaged key folder)."""
    cache = Path(shutil.copytree(fresh_cache, tmp_path / "cache"))
    (key,) = [p for p in cache.iterdir() if p.is_dir()]
    damage(key / "dataset" / "data-00000-of-00001.arrow")
    return cache, key


# Without verification: Arrow fails to read a truncated file (OSError, no hint); zeroed bytes inside the token columns
# train on garbled rows (exit 0, other losses); token ids changed to 0x7f7f7f7f crash at step 2 (IndexError).
CACHE_DAMAGE = {
    "truncated": truncate,
    "zeroed": lambda path: overwrite(path, 0.11, bytes(2000)),
    "changed": lambda path: overwrite(path, 0.54, b"\x7f" * 4),
}


@pytest.mark.integration
@pytest.mark.parametrize("kind", list(CACHE_DAMAGE))
def test_a_damaged_cache_is_rebuilt_and_trains_as_a_fresh_one(tiny_model_dir, tmp_path, fresh_cache, straight_run,
                                                             kind):
    cache, key = damaged_cache(fresh_cache, tmp_path, CACHE_DAMAGE[kind])
    out = tmp_path / "run"
    result = finetune(train_args(tiny_model_dir, out, "--dataset_local_cache_dir", str(cache)))
    assert f"The tokenized cache {key} is damaged (dataset/data-00000-of-00001.arrow: " in result.stderr
    assert "tokenizing the mixture again" in result.stderr
    assert step_metrics(out) == step_metrics(straight_run)  # straight_run read an intact cache
    assert folder_problems(key) == [] and [p.name for p in cache.iterdir()] == [key.name]


@pytest.mark.integration
def test_a_damaged_cache_with_stop_ends_the_run_naming_it(tiny_model_dir, tmp_path, fresh_cache):
    cache, key = damaged_cache(fresh_cache, tmp_path, truncate)
    out = tmp_path / "run"
    result = finetune(train_args(tiny_model_dir, out, "--dataset_local_cache_dir", str(cache),
                                 "--dataset_cache_on_damage", "stop"), check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    size = (fresh_cache / key.name / "dataset" / "data-00000-of-00001.arrow").stat().st_size
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: The tokenized cache {key} is damaged (dataset/data-00000-of-00001.arrow: size "
                      f"{size // 2}, expected {size}). Delete it to tokenize again, or run with "
                      "--dataset_cache_on_damage rebuild."]
    assert "Traceback" not in result.stderr and not (out / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------------------------------------------
# Integration: 2-process ZeRO-3
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.multiprocess
def test_zero3_ranks_fall_back_together_from_a_damaged_shard(tiny_model_dir, tmp_path):
    """The newest checkpoint's largest file in rank 1's share of the hashing (a ZeRO-3 optimizer shard) has a byte
    changed: only rank 1 reads it, so rank 0, which sets checkpoints aside, learns of it from the gathered hashes, and
    both ranks resume step_2 together instead of one waiting on the other."""
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "2",
                "--use_deepspeed", "--deepspeed_config_file", str(REPO / ZERO3)]
    out = tmp_path / "run"
    args = checkpointed_args(tiny_model_dir, out)
    killed = with_fault(args, "kill_after_save", 4, launcher=launcher)
    assert killed.returncode != 0 and [p.name for p in complete_checkpoints(out)] == ["step_2", "step_4"]
    before = step_metrics(out)
    sizes = manifest.file_sizes(out / "checkpoints" / "step_4")
    shard = max(share_of(sizes, 1, 2), key=sizes.get)
    assert shard.endswith("optim_states.pt"), shard
    flip_byte(out / "checkpoints" / "step_4" / shard)
    result = run([*launcher, "-m", "open_instruct.finetune", *with_cache_dir(args)], timeout=300)
    assert f"step_4 is damaged ({shard}: checksum differs): moved it to step_4.damaged." in result.stderr
    assert json.loads((out / "summary.json").read_text())["resumed_from"].endswith("step_2")
    after = step_metrics(out)
    assert sorted(after) == [1, 2, 3, 4, 5, 6]
    for step in (3, 4):  # trained again from step_2: as the killed run trained them
        for key in ("train_loss", "grad_norm", "learning_rate"):
            assert after[step][key] == pytest.approx(before[step][key], rel=1e-5), (step, key)
