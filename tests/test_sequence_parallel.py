"""Sequence parallelism (open_instruct/sequence_parallel.py, parallel_dims.py): the layout, the row pieces on literal
tensors, the start-up errors, and training parity with one process.

Parity tolerance: 1e-5 relative on losses and gradient norms, exact token counts (as in tests/test_distributed.py).
Both runs are fp32 and train the same global batches; under sequence parallelism each rank computes the token losses
of its piece of every row, with attention over the whole row gathered by DeepSpeed's all-to-all, so the only
difference is the order of floating-point sums (measured: about 1e-7 relative). The mutations below (the #1549 bug:
labels shifted again inside each piece; trained tokens counted per rank instead of once) change the loss itself by
percents.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO, clean_env, finetune, read_metrics, run, with_cache_dir
from open_instruct.batching import collate
from open_instruct.parallel_dims import ParallelDims, ParallelLayoutError
from open_instruct.sequence_parallel import check_sequence_parallel, shard_row

ZERO3 = "configs/ds_configs/stage3_no_offloading_accelerate.conf"
PAD = 0


# ----------------------------------------------------------------------------------------------------------------
# Unit: the layout and the pieces of a row
# ----------------------------------------------------------------------------------------------------------------
def test_ranks_of_one_sequence_parallel_group_are_consecutive():
    places = [(d.dp_rank, d.sp_rank) for d in (ParallelDims(8, 2, rank) for rank in range(8))]
    assert places == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]
    assert ParallelDims(8, 2, 5).sp_group_ranks() == [4, 5] and ParallelDims(8, 2).data_parallel == 4
    assert str(ParallelDims(8, 2)) == "8 processes = 4 data-parallel x 2 sequence-parallel"
    with pytest.raises(ParallelLayoutError, match="--sequence_parallel_size 3 does not divide the 8 processes"):
        ParallelDims(8, 3)


def literal_row() -> dict:
    """Two examples packed in one 7-token row: [10 11 12 13] then [20 21 22]; only 12, 13, 21 and 22 are trained."""
    import numpy as np

    ids = [np.array([10, 11, 12, 13]), np.array([20, 21, 22])]
    labels = [np.array([-100, -100, 12, 13]), np.array([-100, 21, 22])]
    return collate(ids, labels, padding_free=True, pad_token_id=PAD)


def test_a_row_is_shifted_once_then_cut_with_the_straddling_example_trained_once():
    row = literal_row()
    assert row["target_ids"].tolist() == [[-100, 12, 13, -100, 21, 22, -100]]  # shifted per example, before the cut
    first, second = (shard_row(row, 2, index, PAD) for index in (0, 1))
    # 7 tokens padded to 8: an untrained pad whose position restarts at 0 (an example of its own)
    assert first["input_ids"].tolist() == [[10, 11, 12, 13]] and second["input_ids"].tolist() == [[20, 21, 22, PAD]]
    assert first["position_ids"].tolist() == [[0, 1, 2, 3]] and second["position_ids"].tolist() == [[0, 1, 2, 0]]
    assert first["target_ids"].tolist() == [[-100, 12, 13, -100]]
    assert second["target_ids"].tolist() == [[21, 22, -100, -100]]
    assert (first["num_tokens"], second["num_tokens"]) == (4, 3)  # the pad counts nowhere
    assert first["num_trained_tokens"] + second["num_trained_tokens"] == row["num_trained_tokens"] == 4


def test_an_example_straddling_the_cut_keeps_its_targets_across_it():
    row = literal_row()
    pieces = [shard_row(row, 3, index, PAD) for index in range(3)]  # 7 tokens -> 9: pieces of 3
    assert [p["input_ids"].tolist()[0] for p in pieces] == [[10, 11, 12], [13, 20, 21], [22, PAD, PAD]]
    # 12 predicts 13, which is in the next piece: the target travels with the position, not with the piece
    assert pieces[0]["target_ids"].tolist() == [[-100, 12, 13]]
    assert pieces[1]["target_ids"].tolist() == [[-100, 21, 22]]
    assert pieces[2]["position_ids"].tolist() == [[2, 0, 1]]  # the two pads: one example of their own
    assert sum(p["num_trained_tokens"] for p in pieces) == 4 and sum(p["num_tokens"] for p in pieces) == 7
    assert all(p["num_tokens_with_padding"] == 3 for p in pieces)


def test_an_empty_micro_batch_gives_every_rank_a_piece_that_trains_nothing():
    empty = collate([], [], True, PAD)
    pieces = [shard_row(empty, 2, index, PAD) for index in range(2)]
    assert all(p["input_ids"].shape == (1, 1) and p["num_trained_tokens"] == p["num_tokens"] == 0 for p in pieces)


def config(heads=4, kv_heads=2):
    return SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads)


@pytest.mark.parametrize("dims, cfg, attn, zero_stage, padding_free, message", [
    (ParallelDims(4, 2), config(), "packed_sdpa", None, True, "--use_deepspeed"),
    (ParallelDims(4, 2), config(), "packed_sdpa", 2, True, "needs DeepSpeed ZeRO-3; this launch uses ZeRO stage 2"),
    (ParallelDims(4, 2), config(), "packed_sdpa", 3, False, "padded batches are not supported"),
    (ParallelDims(4, 2), config(), "sdpa", 3, True, "packed examples would attend to each other"),
    (ParallelDims(4, 4), config(heads=6, kv_heads=2), "packed_sdpa", 3, True, "must divide the model's 6 attention"),
    (ParallelDims(6, 3), config(heads=6, kv_heads=2), "packed_sdpa", 3, True, "3 and the model's 2 key/value"),
])
def test_layouts_that_cannot_work_are_refused_with_the_flag_to_change(dims, cfg, attn, zero_stage, padding_free,
                                                                      message):
    with pytest.raises(ParallelLayoutError, match=message):
        check_sequence_parallel(dims, cfg, attn, zero_stage, padding_free)
    check_sequence_parallel(ParallelDims(4, 2), config(), "packed_sdpa", 3, True)  # a layout that works
    check_sequence_parallel(ParallelDims(4, 4), config(heads=4, kv_heads=2), "flash_attention_2", 3, True)


@pytest.mark.multiprocess
def test_zero2_under_sequence_parallelism_is_refused_before_anything_loads(tiny_model_dir, tmp_path):
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "2", "--use_deepspeed",
                "--deepspeed_config_file", str(REPO / "configs/ds_configs/stage2_no_offloading_accelerate.conf"),
                "-m", "open_instruct.finetune"]
    result = run([*launcher, *with_cache_dir(sp_args(tiny_model_dir, tmp_path / "z2")), "--sequence_parallel_size",
                  "2"], check=False)
    assert result.returncode != 0 and "needs DeepSpeed ZeRO-3; this launch uses ZeRO stage 2" in result.stderr
    assert not (tmp_path / "z2" / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------------------------------------------
# Integration: 2 processes sharing every row vs 1 process
# ----------------------------------------------------------------------------------------------------------------
def sp_args(model_dir, out) -> list[str]:
    """Packed rows of up to 256 tokens holding several examples (most rows have an odd length, and examples straddle
    the cut), global batch 16, clipping."""
    return ["--model_name_or_path", str(model_dir), "--output_dir", str(out),
            "--dataset_mixer_list", "synthetic:spelling", "64", "synthetic:arithmetic", "64", "--max_seq_length", "256",
            "--global_batch_size", "16", "--max_tokens_per_micro_batch", "256", "--max_train_steps", "4",
            "--learning_rate", "1e-3", "--clip_grad_norm", "1.0", "--seed", "3", "--warmup_ratio", "0.0"]


def launch_sp(processes: int, args: list[str], fault: str | None = None, check: bool = True, **env):
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", str(processes),
                "--use_deepspeed", "--deepspeed_config_file", str(REPO / ZERO3)]
    entry = [str(REPO / "tests" / "fault_injection.py")] if fault else ["-m", "open_instruct.finetune"]
    return run([*launcher, *entry, *with_cache_dir(args), "--sequence_parallel_size", "2"],
               env=clean_env(FAULT=fault, **env) if fault else None, check=check)


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory):
    """one_process(*extra): the metrics of the same run in one plain process (run once per flag set)."""
    runs = {}

    def get(*extra: str) -> list[dict]:
        if extra not in runs:
            out = tmp_path_factory.mktemp("one")
            finetune([*sp_args(tiny_model_dir, out), *extra])
            runs[extra] = read_metrics(out)
        return runs[extra]

    return get


def largest_difference(metrics: list[dict], reference: list[dict]) -> float:
    """Over the training lines: losses and gradient norms (token counts exact: counted once); over the evaluation
    lines: the held-out loss."""
    assert [m["step"] for m in metrics] == [m["step"] for m in reference]
    worst = 0.0
    for a, b in zip(metrics, reference, strict=True):
        if "train_loss" in b:
            assert (a["total_tokens"], a["trained_tokens"]) == (b["total_tokens"], b["trained_tokens"])
        keys = [key for key in ("train_loss", "grad_norm", "eval_loss") if key in b]
        worst = max([worst] + [abs(a[key] - b[key]) / abs(b[key]) for key in keys])
    return worst


FEATURES = {
    "plain": [],
    "liger-chunked-loss": ["--use_liger_kernel", "--loss_chunk_size", "7"],
    "lora": ["--use_lora", "--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0.0"],
    "loss-sum": ["--loss_reduction", "sum"],
    "gradient-checkpointing": ["--gradient_checkpointing"],
    "in-loop-eval": ["--eval_fraction", "0.1", "--eval_every", "2"],
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("feature", FEATURES)
def test_two_ranks_sharing_every_row_match_one_process(tiny_model_dir, tmp_path, one_process, feature):
    out = tmp_path / "sp2"
    launch_sp(2, [*sp_args(tiny_model_dir, out), *FEATURES[feature]])
    assert largest_difference(read_metrics(out), one_process(*FEATURES[feature])) < 1e-5


@pytest.mark.multiprocess
def test_four_ranks_as_two_replicas_of_two_match_one_process(tiny_model_dir, tmp_path, one_process):
    out = tmp_path / "sp2dp2"
    launch_sp(4, sp_args(tiny_model_dir, out))
    assert largest_difference(read_metrics(out), one_process()) < 1e-5


@pytest.mark.multiprocess
def test_a_killed_sequence_parallel_run_resumes_as_if_it_never_stopped(tiny_model_dir, tmp_path, one_process):
    out = tmp_path / "killed"
    args = [*sp_args(tiny_model_dir, out), "--checkpointing_steps", "2"]
    killed = launch_sp(2, args, fault="kill_after_save", check=False, FAULT_STEP="2")
    assert killed.returncode != 0 and (out / "checkpoints" / "step_2" / "COMPLETED").is_file()
    launch_sp(2, args)  # the same command
    assert largest_difference(read_metrics(out), one_process()) < 1e-5


@pytest.mark.multiprocess
def test_a_checkpoint_of_two_ranks_sharing_rows_resumes_as_two_data_parallel_ranks(tiny_model_dir, tmp_path,
                                                                                   one_process):
    """Another N on the same processes: ZeRO shards over every process whatever N is, and the global batches do not
    depend on N, so the checkpoint loads as saved and the run continues the same optimization."""
    out = tmp_path / "other_n"
    args = [*sp_args(tiny_model_dir, out), "--checkpointing_steps", "2"]
    killed = launch_sp(2, args, fault="kill_after_save", check=False, FAULT_STEP="2")
    assert killed.returncode != 0 and (out / "checkpoints" / "step_2" / "COMPLETED").is_file()
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "2", "--use_deepspeed",
                "--deepspeed_config_file", str(REPO / ZERO3), "-m", "open_instruct.finetune"]
    resumed = run([*launcher, *with_cache_dir(args)])  # the same command without --sequence_parallel_size
    assert "changed setting: --sequence_parallel_size: checkpoint 2, now 1" in resumed.stderr
    assert largest_difference(read_metrics(out), one_process()) < 1e-5


@pytest.mark.multiprocess
@pytest.mark.parametrize("mutation", ["sp_shift_after_split", "sp_count_per_rank"])
def test_each_mutation_of_the_row_split_is_caught(tiny_model_dir, tmp_path, one_process, mutation):
    out = tmp_path / "mutated"
    launch_sp(2, sp_args(tiny_model_dir, out), fault=mutation)
    metrics = read_metrics(out)
    losses = [m["train_loss"] for m in metrics]
    reference = [m["train_loss"] for m in one_process()]
    assert max(abs(a - b) / b for a, b in zip(losses, reference)) > 1e-3
