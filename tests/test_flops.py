"""Model FLOPs and MFU against a hand calculation on the embedded tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import finetune, read_metrics
from open_instruct.flops import FlopsModel, peak_flops
from open_instruct.metrics import RunCounters


def test_step_flops_match_a_hand_calculation(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    flops = FlopsModel.of(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    # Tiny Llama: hidden 128, 4 layers, 4 query heads x 32, 2 kv heads x 32, MLP 384, vocab 272. One block:
    # q 128x128 + k 128x64 + v 128x64 + o 128x128 = 49,152; gate/up/down 3 x 128x384 = 147,456; 2 norms x 128 = 256.
    assert flops.block_params == 4 * (49_152 + 147_456 + 256) == 787_456
    # Two examples of 10 and 20 tokens, 12 of them trained:
    dense = 6 * 787_456 * 30  # 141,742,080
    output_layer = 6 * 272 * 128 * 12  # 2,506,752
    attention = 6 * 4 * (4 * 32) * (10**2 + 20**2)  # 1,536,000
    assert flops.step_flops([10, 20], 12) == dense + output_layer + attention == 145_784_832


def test_mfu_is_model_flops_per_device_second_over_the_peak():
    counters = RunCounters(num_processes=2)
    counters.start_time -= 4.0  # four seconds of training
    counters.add(tokens=900, tokens_including_padding=1000, trained_tokens=300)
    counters.model_flops, counters.data_seconds = 8e12, 0.5
    values = counters.efficiency(peak_flops=2e12)
    # 8e12 FLOPs / (4 s x 2 devices) = 1e12 FLOP/s per device = half of the 2e12 peak.
    assert values["tflops"] == pytest.approx(1.0, rel=1e-3) and values["mfu"] == pytest.approx(0.5, rel=1e-3)
    assert values["padding_fraction"] == pytest.approx(0.1)
    assert values["trained_tokens_per_sec"] == pytest.approx(75, rel=1e-3)  # 300 trained tokens / 4 s, all devices
    assert values["dataloader_wait_fraction"] == pytest.approx(0.125, rel=1e-3)
    assert "mfu" not in counters.efficiency(peak_flops=None)


def test_a_resumed_run_counts_only_its_own_tokens_and_flops():
    counters = RunCounters(num_processes=1)
    counters.restore({"total_tokens": 5000, "total_tokens_including_padding": 6000, "trained_tokens": 2000})
    counters.start_time -= 2.0
    counters.add(tokens=100, tokens_including_padding=100, trained_tokens=40)
    values = counters.efficiency(peak_flops=None)
    assert values["padding_fraction"] == 0.0 and values["trained_tokens_per_sec"] == pytest.approx(20, rel=1e-3)


def test_peak_figures_come_from_the_flag_the_table_or_a_cpu_measurement():
    assert peak_flops(torch.device("cpu"), 12.5, torch.float32) == (12.5e12, "declared (--peak_tflops)")
    measured, source = peak_flops(torch.device("cpu"), None, torch.float32)
    assert measured > 1e8 and source.startswith("measured float32 matmul")
    assert peak_flops(torch.device("meta"), None, torch.float32)[0] is None


@pytest.mark.integration
def test_every_logged_step_carries_the_telemetry_fields(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    finetune(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), "--dataset_mixer_list",
              "synthetic:spelling", "64", "--per_device_train_batch_size", "8", "--max_train_steps", "3",
              "--peak_tflops", "0.5", "--no_padding_free"])
    rows = read_metrics(out)
    assert len(rows) == 3
    for row in rows:
        for field in ("mfu", "tflops", "padding_fraction", "trained_tokens", "trained_tokens_per_sec", "grad_norm",
                      "dataloader_wait_fraction", "peak_memory_gb", "per_device_tps", "per_device_tps_including_padding"):
            assert field in row, field
        assert row["mfu"] == pytest.approx(row["tflops"] / 0.5)
        assert 0 < row["padding_fraction"] < 1 and 0 <= row["dataloader_wait_fraction"] < 1  # padded batches
        assert row["peak_memory_gb"] > 0.1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mfu"] > 0 and summary["peak_memory_gb"] > 0.1
