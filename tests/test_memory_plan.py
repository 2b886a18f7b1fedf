"""memory_plan: exact parameter counts from configs, ZeRO/offload arithmetic on literal numbers, what the activation
and logits estimates respond to, and a sanity anchor (Llama-3.1-8B with the Tulu-3 recipe fits an 80 GB GPU)."""

from __future__ import annotations

import json

import pytest
from conftest import REPO
from transformers import LlamaConfig, LlamaForCausalLM, Olmo2Config

from open_instruct.args import parse_args
from open_instruct.memory_plan import (
    NF4_BYTES_PER_PARAM,
    GiB,
    activation_bytes_per_token,
    count_parameters,
    load_model_config,
    lora_parameter_counts,
    plan_memory,
    tokens_per_micro_batch,
)
from open_instruct.tiny_model import default_config_path

BASE = ["--model_name_or_path", "m", "--dataset_mixer_list", "synthetic:spelling", "1.0"]
TULU_3_8B = BASE + ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2",
                    "--max_seq_length", "4096", "--gradient_checkpointing"]  # padding-free is the default


def llama_3_1_8b() -> LlamaConfig:
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)


def tiny_config(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**json.loads(default_config_path().read_text()), **overrides})


def ds(stage: int, **zero) -> dict:
    return {"bf16": {"enabled": "auto"}, "zero_optimization": {"stage": stage, **zero}}


def ds_file(name: str) -> dict:
    return json.loads((REPO / "configs" / "ds_configs" / name).read_text())


# --- parameter counts -------------------------------------------------------------------------------------------


def test_tiny_model_count_matches_the_real_model(tiny_model_dir):
    config, reason = load_model_config(str(tiny_model_dir))
    assert reason is None
    real = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert count_parameters(config) == real


def test_llama_3_1_8b_count():
    # per layer: q, o 4096^2 each; k, v 4096x1024 each; MLP 3 x 4096 x 14336; two norms 2 x 4096
    #   = 33,554,432 + 8,388,608 + 176,160,768 + 8,192 = 218,112,000; x 32 layers = 6,979,584,000
    # embeddings + untied output layer 2 x 128,256 x 4096 = 1,050,673,152; final norm 4096
    assert count_parameters(llama_3_1_8b()) == 8_030_261_248


def test_olmo_2_7b_count():
    # OLMo-2-1124-7B: no GQA, QK-norm over all heads, norms after attention and MLP, no input norm.
    # per layer: q, k, v, o 4 x 4096^2; MLP 3 x 4096 x 11008; q_norm, k_norm, 2 post-norms 4 x 4096
    #   = 67,108,864 + 135,266,304 + 16,384 = 202,391,552; x 32 layers = 6,476,529,664
    # embeddings + untied output layer 2 x 100,352 x 4096 = 822,083,584; final norm 4096
    config = Olmo2Config(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         vocab_size=100352, tie_word_embeddings=False)
    assert count_parameters(config) == 7_298_617_344


def test_tied_embeddings_are_counted_once():
    untied, tied = count_parameters(tiny_config()), count_parameters(tiny_config(tie_word_embeddings=True))
    assert untied - tied == 272 * 128  # one vocab x hidden matrix fewer


def test_load_model_config_failure_is_a_one_line_reason(tmp_path):
    config, reason = load_model_config(str(tmp_path / "no-such-model"))
    assert config is None
    assert reason and "\n" not in reason


# --- model states: ZeRO stages and offload ------------------------------------------------------------------------


@pytest.mark.parametrize("stage, params, grads, optimizer", [
    (0, 2e9, 2e9, 16e9),          # bf16 weights, bf16 gradients, 16 B/param of optimizer states, all replicated
    (1, 2e9, 2e9, 16e9 / 8),      # optimizer states partitioned over the 8 GPUs
    (2, 2e9, 2e9 / 8, 16e9 / 8),  # + gradients
    (3, 2e9 / 8, 2e9 / 8, 16e9 / 8),  # + parameters
])
def test_zero_stages_partition_model_states(stage, params, grads, optimizer):
    plan = plan_memory(parse_args(BASE), tiny_config(), 10**9, world_size=8, ds_config=ds(stage))
    assert plan.components["parameters"] == params
    assert plan.components["gradients"] == grads
    assert plan.components["optimizer states"] == optimizer


def test_ddp_keeps_fp32_weights_and_replicates_everything():
    plan = plan_memory(parse_args(BASE), tiny_config(), 10**9, world_size=8, ds_config=None)
    states = {"parameters": 4e9, "gradients": 4e9, "optimizer states": 8e9, "autocast bf16 weight copies": 2e9,
              "DDP gradient buckets": 4e9}
    assert {name: plan.components[name] for name in states} == states
    single = plan_memory(parse_args(BASE), tiny_config(), 10**9, world_size=1, ds_config=None)
    assert "DDP gradient buckets" not in single.components  # one process: no DDP wrapper


def test_offload_moves_model_states_to_cpu():
    offload = {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}
    on_gpu = plan_memory(parse_args(BASE), tiny_config(), 10**9, 8, ds(3))
    plan = plan_memory(parse_args(BASE), tiny_config(), 10**9, 8, ds(3, **offload), gpus_per_node=4)
    assert plan.components["parameters"] == plan.components["gradients"] == plan.components["optimizer states"] == 0
    assert plan.cpu_bytes_per_gpu == (16e9 + 2e9) / 8  # optimizer states and bf16 parameter partitions
    assert plan.cpu_bytes_per_node == 4 * plan.cpu_bytes_per_gpu
    assert on_gpu.total_bytes - plan.total_bytes == (16e9 + 2e9 + 2e9) / 8

    optimizer_only = plan_memory(parse_args(BASE), tiny_config(), 10**9, 8, ds(2, offload_optimizer={"device": "cpu"}))
    assert optimizer_only.components["optimizer states"] == 0 and optimizer_only.cpu_bytes_per_gpu == 16e9 / 8
    assert optimizer_only.components["parameters"] == 2e9  # stage 2 keeps every GPU's full bf16 copy


def test_zero3_buffers_follow_accelerate_auto_values():
    # tiny model: h = 128; largest module = an MLP projection, 128 x 384 = 49,152 parameters (the embedding is
    # 272 x 128 = 34,816).
    # accelerate's "auto": prefetch bucket int(0.9 h^2) = 14,745, reduce bucket h^2 = 16,384.
    zero = {"overlap_comm": True, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto"}
    plan = plan_memory(parse_args(BASE), tiny_config(), 10**6, 8, ds(3, **zero))
    gathered, gradient, buckets = 2 * (49_152 + 14_745), 2 * 49_152, 4.5 * 2 * 16_384
    assert plan.components["ZeRO buffers"] == int(gathered + gradient + buckets)
    capped = plan_memory(parse_args(BASE), tiny_config(), 10**6, 8, ds(3, **zero, stage3_max_live_parameters=1000))
    assert capped.components["ZeRO buffers"] == int(2 * 1000 + gradient + buckets)


def test_zero2_buckets_follow_deepspeed_guidance():
    # 5e8-element reduce and all-gather buckets with overlap_comm: 5e8 x 2 bytes x 2 x 4.5 = 9 GB
    plan = plan_memory(parse_args(BASE), tiny_config(), 10**9, 8, ds_file("stage2_no_offloading_accelerate.conf"))
    assert plan.components["ZeRO buffers"] == 9e9


# --- activations and logits ----------------------------------------------------------------------------------------


def test_tokens_per_micro_batch():
    assert tokens_per_micro_batch(parse_args(BASE + ["--per_device_train_batch_size", "4",
                                                     "--max_seq_length", "1024"]), 8) == 4096
    packed = parse_args(BASE + ["--global_batch_size", "128", "--max_tokens_per_micro_batch", "16384",
                                "--max_seq_length", "4096"])
    assert tokens_per_micro_batch(packed, 8) == 16384
    by_examples = parse_args(BASE + ["--global_batch_size", "128", "--max_seq_length", "4096"])
    assert tokens_per_micro_batch(by_examples, 8) == 16 * 4096  # 128 examples / 8 GPUs, one micro-step
    by_tokens = parse_args(BASE + ["--global_batch_tokens", "80000", "--gradient_accumulation_steps", "2",
                                   "--max_seq_length", "1000"])
    assert tokens_per_micro_batch(by_tokens, 4) == 10000 + 1000  # the share plus one example of imbalance


def test_llama_8b_layer_activations_per_token():
    # bf16, HF RMSNorm (2 x 8h), GQA attention (2q + 2kv = 2.5h, x 2 bytes), SwiGLU 4 x 2 x 14336: 49h bytes
    assert activation_bytes_per_token(llama_3_1_8b(), parse_args(BASE), 2, 4096) == 49 * 4096


def test_gradient_checkpointing_lowers_activations():
    config = llama_3_1_8b()
    plain = plan_memory(parse_args(BASE + ["--max_seq_length", "4096"]), config, 8 * 10**9, 64, ds(3))
    checkpointed = plan_memory(parse_args(BASE + ["--max_seq_length", "4096", "--gradient_checkpointing"]), config,
                               8 * 10**9, 64, ds(3))
    layers_inputs = 32 * 4096 * 4096 * 2  # the checkpoints: every layer's bf16 input
    assert checkpointed.components["activations"] < plain.components["activations"] / 10
    assert checkpointed.components["activations"] > layers_inputs


def test_chunked_loss_lowers_the_logits_term():
    config, tokens = llama_3_1_8b(), 4096
    unfused = plan_memory(parse_args(BASE + ["--max_seq_length", str(tokens)]), config, 8 * 10**9, 64, ds(3))
    assert unfused.components["loss logits"] == 12 * tokens * 128256  # three fp32 [tokens x vocab] tensors
    chunked = plan_memory(parse_args(BASE + ["--max_seq_length", str(tokens), "--use_liger_kernel",
                                             "--loss_chunk_size", "1024"]), config, 8 * 10**9, 64, ds(3))
    assert chunked.components["loss logits"] == (2 + 4) * 1024 * 128256 + 2 * tokens * 4096
    assert chunked.components["loss logits"] < unfused.components["loss logits"] / 3


def test_eager_attention_adds_the_quadratic_scores():
    flash = plan_memory(parse_args(BASE + ["--max_seq_length", "4096"]), llama_3_1_8b(), 8 * 10**9, 64, ds(3))
    eager = plan_memory(parse_args(BASE + ["--max_seq_length", "4096", "--attn_implementation", "eager"]),
                        llama_3_1_8b(), 8 * 10**9, 64, ds(3))
    scores = 32 * 4096 * 32 * 4096 * 6  # layers x tokens x heads x row length x (fp32 softmax + bf16 copy)
    assert eager.components["activations"] - flash.components["activations"] == scores


# --- the sanity anchor and the printed table -----------------------------------------------------------------------


def test_llama_8b_tulu_recipe_fits_80gb_with_zero3_not_with_ddp():
    config = llama_3_1_8b()
    args = parse_args(TULU_3_8B)
    num_params = count_parameters(config)
    zero3 = plan_memory(args, config, num_params, 64, ds_file("stage3_no_offloading_accelerate.conf"))
    assert zero3.fits(80)
    assert zero3.total_bytes < 20 * GiB
    ddp = plan_memory(args, config, num_params, 8, None)
    model_states = sum(ddp.components[name] for name in ("parameters", "gradients", "optimizer states"))
    assert model_states == 16 * num_params > 80 * GiB  # 16 bytes/param x 8B = 128 GB before any activation
    assert not ddp.fits(80)


def test_format_prints_every_component_and_the_verdict():
    plan = plan_memory(parse_args(TULU_3_8B), llama_3_1_8b(), 8 * 10**9, 64,
                       ds_file("stage3_offloading_accelerate.conf"))
    text = plan.format(80)
    for name in plan.components:
        assert name in text
    assert "total" in text and "fits in 80 GiB" in text and "offloaded to CPU" in text
    assert plan.rows()[-1] == ("total", plan.total_bytes / GiB)
    assert "does NOT fit" in plan.format(4)


# --- LoRA and QLoRA -----------------------------------------------------------------------------------------------


def test_lora_counts_on_llama_8b():
    # per layer at rank 64: q, o 64 x (4096 + 4096); k, v 64 x (4096 + 1024); gate, up, down 64 x (4096 + 14336)
    #   = 1,048,576 + 655,360 + 3,538,944 = 5,242,880; x 32 layers = 167,772,160 (what peft reports for this model)
    # QLoRA quantizes every linear layer but the output layer: the 32 layers' 6,979,584,000 minus their norms' 262,144
    args = parse_args(BASE + ["--use_lora"])
    assert lora_parameter_counts(llama_3_1_8b(), args) == (167_772_160, 6_979_321_856)
    named = parse_args(BASE + ["--use_lora", "--lora_rank", "8", "--lora_target_modules", "q_proj", "v_proj",
                               "--lora_modules_to_save", "lm_head"])
    assert lora_parameter_counts(llama_3_1_8b(), named)[0] == 32 * 8 * (8192 + 5120) + 128_256 * 4096


def test_lora_keeps_model_states_only_for_the_adapters():
    """One GPU, no DeepSpeed, bf16 mixed precision: the frozen base in bf16 (QLoRA: NF4 for the linear layers),
    fp32 adapters with their fp32 gradients and AdamW moments."""
    config, n = llama_3_1_8b(), 8_030_261_248
    lora = plan_memory(parse_args(BASE + ["--use_lora"]), config, n, world_size=1, ds_config=None)
    assert lora.components["parameters"] == 2 * n + 4 * 167_772_160
    assert lora.components["gradients"] == 4 * 167_772_160 and lora.components["optimizer states"] == 8 * 167_772_160
    assert lora.components["autocast bf16 weight copies"] == 2 * 167_772_160
    qlora = plan_memory(parse_args(BASE + ["--use_qlora", "--lora_rank", "16"]), config, n, 1, None)
    trainable, quantized = 41_943_040, 6_979_321_856
    assert qlora.components["parameters"] == int(NF4_BYTES_PER_PARAM * quantized + 2 * (n - quantized)) + 4 * trainable
    assert "QLoRA (4-bit base) rank 16: 41.9M trainable parameters" in qlora.format()


def test_qlora_fits_llama_8b_on_one_24gb_gpu_where_full_fine_tuning_does_not_fit_80gb():
    config, n = llama_3_1_8b(), 8_030_261_248
    one_gpu = ["--per_device_train_batch_size", "1", "--max_seq_length", "2048", "--gradient_checkpointing",
               "--use_liger_kernel"]
    qlora = plan_memory(parse_args(BASE + one_gpu + ["--use_qlora", "--lora_rank", "16"]), config, n, 1, None)
    assert qlora.fits(24) and not qlora.fits(8)
    assert plan_memory(parse_args(BASE + one_gpu + ["--use_lora"]), config, n, 1, None).fits(80)
    assert not plan_memory(parse_args(BASE + one_gpu), config, n, 1, None).fits(80)


def olmo_2_7b() -> Olmo2Config:
    return Olmo2Config(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       vocab_size=100352, tie_word_embeddings=False)


def test_sequence_parallelism_divides_activations_and_logits_per_gpu():
    config, args = tiny_config(), parse_args(BASE + ["--max_seq_length", "512", "--global_batch_size", "8",
                                                      "--max_tokens_per_micro_batch", "1024"])
    sp = parse_args(BASE + ["--max_seq_length", "512", "--global_batch_size", "8", "--max_tokens_per_micro_batch",
                            "1024", "--sequence_parallel_size", "4"])
    one, four = (plan_memory(a, config, count_parameters(config), 8, ds(3)) for a in (args, sp))
    assert four.components["activations"] == pytest.approx(one.components["activations"] / 4, rel=0.01)
    assert four.components["loss logits"] == pytest.approx(one.components["loss logits"] / 4, rel=0.01)
    assert four.components["optimizer states"] == one.components["optimizer states"]  # ZeRO shards over all 8
    assert "256 of each 1024-token row per GPU (sequence parallel 4)" in four.assumptions[0]


def test_olmo_2_7b_at_32k_tokens_per_row_without_recomputation_fits_80gb_from_sequence_parallel_2():
    """The plan docs/finetune.md quotes (scripts/train/olmo2/finetune_7b_32k.sh): OLMo-2 7B, rows of 32,768 tokens,
    64 GPUs, ZeRO-3, bf16, the chunked loss. Without gradient checkpointing one GPU would keep every layer's
    activations of the row (about 134 GB): N=2 halves them (69 GB) and fits, so the run skips the recomputation. With
    gradient checkpointing the estimate fits even N=1 (17 GB)."""
    config = olmo_2_7b()
    totals = {}
    for checkpointing in (False, True):
        for n in (1, 2, 4, 8):
            args = parse_args(BASE + ["--max_seq_length", "32768", "--global_batch_size", "64",
                                      "--max_tokens_per_micro_batch", "32768", "--use_liger_kernel",
                                      "--sequence_parallel_size", str(n)]
                              + (["--gradient_checkpointing"] if checkpointing else []))
            plan = plan_memory(args, config, count_parameters(config), 64,
                               ds_file("stage3_no_offloading_accelerate.conf"))
            totals[checkpointing, n] = (round(plan.total_bytes / GiB, 1), plan.fits(80))
    assert [totals[False, n][1] for n in (1, 2, 4, 8)] == [False, True, True, True], totals
    assert totals[False, 1][0] > 2 * 60 and totals[False, 2][0] < 80
    assert all(totals[True, n][1] for n in (1, 2, 4, 8)), totals


def test_largest_row_budget_is_the_last_multiple_of_max_seq_length_that_fits():
    import dataclasses

    from open_instruct.args import FinetuneArgs
    from open_instruct.memory_plan import largest_row_budget, plan_memory

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, head_dim=128)
    args = FinetuneArgs(model_name_or_path="m", dataset_mixer_list=["x", "1"], max_seq_length=4096,
                        global_batch_size=128, use_liger_kernel=True)
    zero3 = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}
    budget = largest_row_budget(args, config, 8_030_000_000, 8, zero3, 80)  # 16 examples per GPU: memory binds

    def fits(tokens, world=8, memory=80):
        row = dataclasses.replace(args, max_tokens_per_micro_batch=tokens)
        return plan_memory(row, config, 8_030_000_000, world, zero3).fits(memory)

    assert budget == 8192 and fits(budget) and not fits(budget + 4096)
    assert largest_row_budget(args, config, 8_030_000_000, 8, zero3, 40) is None  # not even one row
    assert largest_row_budget(dataclasses.replace(args, padding_free=False), config, 8_030_000_000, 8, zero3, 80) is None
    assert largest_row_budget(args, config, 8_030_000_000, 64, zero3, 80) == 2 * 4096  # the share binds: 2 examples
    per_device = FinetuneArgs(model_name_or_path="m", dataset_mixer_list=["x", "1"], max_seq_length=4096,
                              gradient_accumulation_steps=2, use_liger_kernel=True)  # 128 examples on 64 GPUs
    assert largest_row_budget(per_device, config, 8_030_000_000, 64, zero3, 80) == 2 * 4096
