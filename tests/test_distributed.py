"""Two processes (DeepSpeed ZeRO-3 under accelerate launch, or DDP under torchrun; gloo on CPU) against one plain
process with the same global batch.

Tolerance: both runs are fp32 and see the same examples in every optimizer step (global batches do not depend on
the layout); the only difference is the order in which floating-point gradient sums are added (gloo's
reduce-scatter across 2 ranks vs local accumulation over 4 micro-steps), about 1e-7 relative per step. We allow
1e-5 on losses and gradient norms and 1e-4 on final weights after 6 AdamW steps. A normalization error (a missing
process or accumulation factor, or a per-micro-batch mean) moves the gradient norm by a factor or by percents, far
outside these bounds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO, accelerate_launch, clean_env, finetune, read_metrics, run, with_cache_dir

pytestmark = pytest.mark.multiprocess


def common(model_dir):
    return ["--model_name_or_path", str(model_dir),
            "--dataset_mixer_list", "synthetic:spelling", "64", "synthetic:arithmetic", "64",
            "--per_device_train_batch_size", "2", "--max_train_steps", "6", "--learning_rate", "1e-3",
            "--clip_grad_norm", "1.0", "--seed", "3", "--logging_steps", "1", "--warmup_ratio", "0.0"]


ZERO3 = "configs/ds_configs/stage3_no_offloading_accelerate.conf"


def extensions_dir_with_a_stale_build_lock(tmp_path):
    """A torch extensions cache as a run killed while DeepSpeed compiled its CPU all-reduce leaves it: DeepSpeed
    waited on this lock forever at start-up, which hung CI. The trainer must not build that extension at all."""
    root = tmp_path / "torch_extensions"
    build = root / "deepspeed_shm_comm"  # with TORCH_EXTENSIONS_DIR set, torch builds each extension directly under it
    build.mkdir(parents=True)
    (build / "lock").touch()
    return root


def test_cpu_runs_skip_deepspeeds_inference_only_extension(monkeypatch):
    """Without the skip DeepSpeed compiles the extension here (about 25 s) and returns it."""
    import importlib

    import deepspeed.ops

    from open_instruct.finetune import skip_deepspeed_cpu_inference_comm

    backend = importlib.import_module("deepspeed.comm.torch")  # the attribute deepspeed.comm.torch is torch itself
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm", True)
    skip_deepspeed_cpu_inference_comm()
    assert backend.build_shm_op() is None


@pytest.mark.parametrize("ds_config, extra", [(ZERO3, []), ("", []), (ZERO3, ["--use_liger_kernel", "--loss_chunk_size", "7"])],
                         ids=["zero3", "ddp", "zero3-chunked-loss"])
def test_two_processes_match_one_process_and_save_full_model(tiny_model_dir, tmp_path, ds_config, extra):
    """zero3-chunked-loss: the chunked loss calls the output layer once per chunk, a collective under ZeRO-3; the
    processes hold different numbers of trained tokens, and 7-row chunks make several calls per micro-batch, so this
    also shows the processes agree on the number of calls (a mismatch hangs or fails the gather)."""
    one, two = tmp_path / "one", tmp_path / "two"
    finetune([*common(tiny_model_dir), *extra, "--gradient_accumulation_steps", "4", "--output_dir", str(one)])
    # The 2-process run goes through the debug recipe's launcher interface (NUM_PROCESSES, DS_CONFIG, OUTPUT_DIR).
    env = clean_env(NUM_PROCESSES="2", DS_CONFIG=ds_config, OUTPUT_DIR=str(two), TINY_MODEL_DIR=str(tiny_model_dir), EVAL="0",
                    PYTHON=sys.executable, PATH=f"{Path(sys.executable).parent}:{clean_env()['PATH']}",
                    TORCH_EXTENSIONS_DIR=str(extensions_dir_with_a_stale_build_lock(tmp_path)))
    result = run(["bash", "scripts/train/debug/finetune.sh",
                  *with_cache_dir([*common(tiny_model_dir), *extra, "--gradient_accumulation_steps", "2"])], env=env)
    assert "global batch 8 examples," in result.stdout + result.stderr  # 2 per device x 2 accumulation x 2 processes

    single, double = read_metrics(one), read_metrics(two)
    assert len(single) == len(double) == 6
    for a, b in zip(single, double):
        assert a["total_tokens"] == b["total_tokens"]  # the same examples in every step
        assert a["learning_rate"] == pytest.approx(b["learning_rate"], rel=1e-12)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert single[-1]["train_loss"] < single[0]["train_loss"]

    # The ZeRO-3 run saved full (gathered) weights that load and match the single-process model.
    weights_one, weights_two = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    for name, tensor in weights_one.items():
        assert weights_two[name].shape == tensor.shape and weights_two[name].numel() > 0
        torch.testing.assert_close(weights_two[name], tensor, atol=1e-4, rtol=0)
    model = AutoModelForCausalLM.from_pretrained(two)
    tokenizer = AutoTokenizer.from_pretrained(two)
    ids = tokenizer("<|user|>\nSpell the word: cat\n<|assistant|>\n", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]


def test_packed_rows_under_zero3_match_one_process(tiny_model_dir, tmp_path):
    """--max_tokens_per_micro_batch under ZeRO-3: each process packs its share into as many <=256-token rows as it
    needs, the processes pad to the same number of micro-steps with empty rows, and the result is the 1-process run's:
    the micro-step count varies per step and per process, which also exercises accelerate/DeepSpeed's accumulation
    boundary being set from the data rather than from a fixed --gradient_accumulation_steps."""
    args = ["--model_name_or_path", str(tiny_model_dir), "--dataset_mixer_list", "synthetic:spelling", "64",
            "synthetic:arithmetic", "64", "--max_seq_length", "256", "--global_batch_size", "16",
            "--max_tokens_per_micro_batch", "256", "--max_train_steps", "4", "--learning_rate", "1e-3",
            "--clip_grad_norm", "1.0", "--seed", "3", "--warmup_ratio", "0.0"]
    one, two = tmp_path / "one", tmp_path / "two"
    finetune([*args, "--output_dir", str(one)])
    accelerate_launch(2, [*args, "--output_dir", str(two)], ZERO3)
    for a, b in zip(read_metrics(one), read_metrics(two), strict=True):
        assert a["total_tokens"] == b["total_tokens"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
