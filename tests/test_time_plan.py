"""time_plan: compute and communication per step, overlap, wall time and the dominant term on hand-computed cases;
the measured-throughput table's lookup on a fixture table; the data counts mason reads (tokenized cache or stated
assumptions); and mason printing the plan for the Tulu-3 8B recipe on 8 x 8 H100 beside the published run."""

from __future__ import annotations

import json

import pytest
from test_mason import llama_8b_shaped_config, mason

from open_instruct.args import parse_args
from open_instruct.flops import PEAK_BF16_TFLOPS, FlopsModel
from open_instruct.time_plan import (
    INTRA_NODE,
    PUBLISHED_RUNS,
    DataCounts,
    Link,
    Rate,
    TimePlan,
    comm_bytes_per_step,
    compute_rate,
    configuration,
    duration,
    link_bandwidth,
    load_table,
    nearest_measured,
    plan_time,
    published_run,
    workload,
)

BASE = ["--model_name_or_path", "m", "--dataset_mixer_list", "synthetic:spelling", "1.0"]
LLAMA_8B_PARAMS = 8_030_261_248  # tests/test_memory_plan.py counts it by hand
TULU = ["--dataset_mixer_list", "allenai/tulu-3-sft-mixture", "1.0", "--max_seq_length", "4096",
        "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2", "--num_train_epochs", "2"]


def args(*extra):
    return parse_args([*BASE, *extra])


# --- data and steps -----------------------------------------------------------------------------------------------


def test_counts_from_lengths_and_from_an_assumed_mean():
    counted = DataCounts.of_lengths([10, 20], [5, 6], "cache")
    assert (counted.examples, counted.tokens, counted.trained_tokens, counted.sum_squares) == (2, 30, 11, 500)
    # Only a mean: every token trained (upper bound), every example of the mean length (10^2 x 4: lower bound).
    assumed = DataCounts.assumed(4, 10, "assumed")
    assert (assumed.tokens, assumed.trained_tokens, assumed.sum_squares) == (40, 40, 400)


def test_steps_follow_the_epochs_and_the_global_batch():
    counts = DataCounts.assumed(128 * 1000 + 5, 500, "x")  # 1,000 whole global batches of 128, 5 left over
    work = workload(args("--gradient_accumulation_steps", "2"), counts, world_size=64)  # 1 x 2 x 64 = 128
    assert (work.steps, work.tokens, work.trained_tokens, work.micro_steps) == (2000, 128 * 500, 128 * 500, 2)
    assert work.sum_squares == 128 * 500 ** 2
    assert workload(args("--gradient_accumulation_steps", "2", "--max_train_steps", "10"), counts, 64).steps == 10
    # A token budget of 64,000 at 500 tokens an example: 128 examples a step, as above.
    assert workload(args("--global_batch_tokens", "64000"), counts, 64).steps == 2000
    # --eval_fraction 0.5 holds out half: 64,002 examples, 500 whole batches an epoch.
    assert workload(args("--gradient_accumulation_steps", "2", "--eval_fraction", "0.5"), counts, 64).steps == 1000


def test_packed_micro_steps_follow_the_tokens_per_replica():
    counts = DataCounts.assumed(12_800, 500, "x")
    packed = args("--global_batch_size", "128", "--max_tokens_per_micro_batch", "4096")
    # 128 x 500 = 64,000 tokens a step over 8 GPUs: 8,000 each, two rows of at most 4,096.
    assert workload(packed, counts, world_size=8).micro_steps == 2
    assert workload(packed, counts, world_size=64).micro_steps == 1  # 1,000 tokens each: one row


def test_less_than_one_global_batch_is_refused():
    with pytest.raises(ValueError, match="less than one global batch"):
        workload(args("--global_batch_size", "128"), DataCounts.assumed(100, 500, "x"), world_size=8)


# --- communication ------------------------------------------------------------------------------------------------


def test_zero3_moves_three_parameter_copies_per_micro_step():
    # Llama-3.1-8B, 64 GPUs, 2 micro-steps: 2 x 3 x 2 B x 8,030,261,248 x 63/64 = 94,857,461,242.5 bytes.
    assert comm_bytes_per_step(LLAMA_8B_PARAMS, 64, 3, 2, 2) == pytest.approx(94_857_461_242.5)
    assert comm_bytes_per_step(1000, 4, 3, 2, 2) == 6 * 2 * 1000 * 3 / 4 == 9000


@pytest.mark.parametrize("stage, micro_steps, value_bytes, transfers", [
    (2, 4, 2, 5),  # a reduce-scatter per micro-step + one all-gather
    (1, 4, 2, 2),  # one reduce-scatter + one all-gather
    (0, 4, 2, 2),  # one all-reduce
    (None, 4, 4, 2),  # DDP: one all-reduce of fp32 gradients
])
def test_lower_stages_reduce_once_per_step_or_micro_step(stage, micro_steps, value_bytes, transfers):
    assert comm_bytes_per_step(1000, 4, stage, micro_steps, value_bytes) == transfers * value_bytes * 1000 * 3 / 4


def test_one_gpu_sends_nothing():
    assert comm_bytes_per_step(1000, 1, 3, 2, 2) == 0


def test_the_slowest_link_bounds_the_collective():
    assert link_bandwidth("H100", num_nodes=1, network_gbps=400).bytes_per_s == 450e9  # NVLink within the node
    assert link_bandwidth("H100", num_nodes=8, network_gbps=400).bytes_per_s == 50e9  # 400 Gb/s = 50 GB/s per GPU
    assert link_bandwidth("A100", num_nodes=2, network_gbps=200).bytes_per_s == 25e9
    assert link_bandwidth("L40S", num_nodes=2, network_gbps=400).bytes_per_s == 32e9  # PCIe 4 is slower here
    assert "--network_gbps" in link_bandwidth("H100", 8, 400).description


def test_every_gpu_kind_has_a_peak_and_a_link():
    assert set(INTRA_NODE) == set(PEAK_BF16_TFLOPS)


# --- compute rate: the measured table, else the datasheet x an assumed MFU ----------------------------------------


@pytest.fixture
def table(tmp_path):
    rows = [dict(gpu="H100", shape="1b", params=1_000_000_000, config="padding-free", mfu=0.2, source="run 1"),
            dict(gpu="H100", shape="3b", params=3_000_000_000, config="padding-free", mfu=0.3, source="run 2"),
            dict(gpu="H100", shape="8b", params=8_000_000_000, config="padding-free+gc", mfu=0.4, source="run 3"),
            dict(gpu="A100", shape="8b", params=8_000_000_000, config="padding-free", mfu=0.5, source="run 4")]
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"about": "fixture", "rows": rows}))
    return load_table(path)


def test_the_nearest_measured_row_of_the_same_gpu_and_configuration(table):
    assert nearest_measured(table, "H100", "padding-free", 1_400_000_000)["shape"] == "1b"  # 1.4x vs 2.1x
    assert nearest_measured(table, "H100", "padding-free", 2_000_000_000)["shape"] == "3b"  # 1.5x vs 2x
    assert nearest_measured(table, "H100", "padding-free+gc", 8_030_000_000)["shape"] == "8b"
    assert nearest_measured(table, "H100", "padding-free", 8_000_000_000) is None  # 3b is 2.7x away; 8b is +gc
    assert nearest_measured(table, "H200", "padding-free", 8_000_000_000) is None  # no H200 row


def test_a_measured_mfu_is_used_before_the_assumed_one(table):
    measured = compute_rate("H100", "padding-free", 2_500_000_000, 0.35, table)
    assert measured.flops_per_s == pytest.approx(989.4e12 * 0.3) and "measured on 3b" in measured.description
    assumed = compute_rate("H100", "padding-free", 8_000_000_000, 0.35, table)
    assert assumed.flops_per_s == pytest.approx(989.4e12 * 0.35) and "assumed (--assumed_mfu" in assumed.description


def test_the_shipped_table_reads_and_its_rows_are_well_formed():
    for row in load_table():
        assert row["gpu"] in PEAK_BF16_TFLOPS and 0 < row["mfu"] < 1 and row["source"]
        assert row["config"].split("+")[0] in ("single", "zero3")


def test_configuration_names_match_the_benchmarks():
    assert configuration(args("--use_liger_kernel", "--gradient_checkpointing"), 3) == "zero3+liger+gc"
    assert configuration(args("--no_padding_free"), None) == "single+padded"
    assert configuration(args("--use_liger_kernel"), 2) == "zero2+liger"


# --- the plan -----------------------------------------------------------------------------------------------------


def test_compute_and_communication_per_step_by_hand():
    flops = FlopsModel(block_params=1000, vocab_size=10, hidden_size=4, num_layers=2, attention_width=4)
    work = workload(args("--global_batch_size", "4"), DataCounts.of_lengths([10, 20, 30, 40] * 10, [5] * 40, "x"), 4)
    # 40 examples, 10 global batches of 4 an epoch, 2 epochs. One step, a tenth of the epoch: 100 tokens, 20 trained,
    # squared lengths 10 x (100 + 400 + 900 + 1600) / 10 = 3,000:
    # 6 x 1000 x 100 + 6 x 10 x 4 x 20 + 6 x 2 x 4 x 3,000 = 600,000 + 4,800 + 144,000 = 748,800 FLOPs.
    assert (work.steps, work.tokens, work.trained_tokens, work.sum_squares) == (20, 100, 20, 3000)
    plan = plan_time(flops, 1000, work, world_size=4, stage=3, rate=Rate(1000.0, "r"), link=Link(100.0, "l"))
    assert plan.compute_seconds == pytest.approx(748_800 / (4 * 1000))  # 187.2 s
    # 1 micro-step: 3 x 2 B x 1000 x 3/4 = 4,500 bytes at 100 B/s.
    assert plan.comm_seconds == pytest.approx(45.0)
    assert plan.dominant == "compute"


def test_overlap_range_wall_time_and_the_dominant_term():
    plan = TimePlan(steps=100, tokens_per_step=800, world_size=4, compute_seconds=2.0, comm_seconds=3.0,
                    data="d", compute="c", communication="n")
    assert plan.step_seconds == (3.0, 5.0)  # all hidden: max; none hidden: sum
    assert plan.wall_seconds == (300.0, 500.0)
    assert plan.tokens_per_second_per_gpu == pytest.approx((800 / 4 / 5, 800 / 4 / 3))
    assert plan.dominant == "communication"
    lines = plan.format().splitlines()
    assert all("estimate" in line for line in lines)
    assert "  wall time      estimate: 5 min to 8 min for 100 steps" in plan.format()
    assert [duration(s) for s in (90, 600, 30_000)] == ["90 s", "10 min", "8.3 h"]


def test_the_published_run_matches_only_the_same_job():
    tulu = ["--model_name_or_path", "/models/Llama-3.1-8B", *TULU]
    assert published_run(parse_args(tulu), 64, "H100") is PUBLISHED_RUNS[0]
    assert published_run(parse_args(tulu), 32, "H100") is None  # other GPUs
    assert published_run(parse_args([*tulu, "--max_train_steps", "10"]), 64, "H100") is None
    assert published_run(parse_args([*tulu, "--model_name_or_path", "Llama-3.1-70B"]), 64, "H100") is None
    plan = TimePlan(10, 1, 64, 1.0, 2.0, "d", "c", "n", reference=PUBLISHED_RUNS[0])
    assert plan.format().splitlines()[-1] == (
        "  published      open-instruct's published Tulu-3 8B SFT: about 8.8 h on 64 H100; our estimate for the "
        "same job: 20 s to 30 s")


# --- mason ----------------------------------------------------------------------------------------------------------


def test_mason_prints_the_tulu_3_time_plan_beside_the_published_run(tmp_path):
    model = str(llama_8b_shaped_config(tmp_path / "Llama-3.1-8B"))
    result = mason("--backend", "print", "--num_nodes", "8", "--gpus_per_node", "8", "--skip_hub_checks",
                   "--assumed_examples", "939343", "--assumed_tokens_per_example", "775", "--", "accelerate",
                   "launch", "--mixed_precision", "bf16", "--use_deepspeed", "--deepspeed_config_file",
                   "configs/ds_configs/stage3_no_offloading_accelerate.conf", "-m", "open_instruct.finetune",
                   "--model_name_or_path", model, *TULU, "--gradient_checkpointing", "--use_liger_kernel")
    plan = result.stdout.split("time plan (an estimate, like every figure in it):\n")[1].split("\n# ")[0]
    assert all("estimate" in line for line in plan.splitlines())
    # 939,343 // 128 = 7,338 steps an epoch, 14,676 in all; ZeRO-3 over the network: 94.86 GB / 50 GB/s = 1.897 s.
    assert "estimate: 14,676 steps of 128 examples" in plan and "no tokenized cache found" in plan
    assert "communication  estimate: 1.9 s/step: 94.9 GB sent per GPU per step" in plan
    assert "MFU 35% assumed (--assumed_mfu" in plan and "dominant       estimate: communication" in plan
    assert "about 8.8 h on 64 H100; our estimate for the same job:" in plan


def test_mason_reads_the_counts_of_the_tokenized_cache(tiny_model_dir, tmp_path, capsys):
    from open_instruct import mason as launcher

    from open_instruct.data_cache import get_mixture
    from open_instruct.model_utils import load_tokenizer

    trainer = parse_args(["--model_name_or_path", str(tiny_model_dir), "--dataset_mixer_list", "synthetic:spelling",
                          "20", "--dataset_local_cache_dir", str(tmp_path / "cache")])
    cluster = launcher.parse_mason_args([])
    missing = launcher.data_counts(cluster, trainer, world_size=8)
    assert isinstance(missing, str) and missing.startswith("no tokenized cache at ")  # skipped with the reason
    mixture, path = get_mixture(trainer, load_tokenizer(trainer), log=lambda _: None)
    counts = launcher.data_counts(cluster, trainer, world_size=8)
    assert (counts.examples, counts.tokens) == (20, mixture.lengths.sum()) and path in counts.source
    assert counts.sum_squares == (mixture.lengths.astype(float) ** 2).sum()
    launcher.print_time_plan(launcher.parse_mason_args(["--gpus_per_node", "0"]), None, None, trainer, None, "")
    assert capsys.readouterr().out == "time plan: CPU nodes, no GPU time to plan\n"
    with pytest.raises(launcher.LaunchError, match="--gpu_kind 'V100': one of H100 PCIe"):
        launcher.parse_mason_args(["--gpu_kind", "V100", "--assumed_mfu", "0"])
    with pytest.raises(launcher.LaunchError, match=r"--assumed_mfu must be in \(0, 1\]"):
        launcher.parse_mason_args(["--assumed_mfu", "0"])
