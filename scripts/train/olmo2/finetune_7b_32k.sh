#!/usr/bin/env bash
# OLMo-2 7B SFT on rows of 32,768 tokens with sequence parallelism (DeepSpeed Ulysses): every packed row is split
# across 2 GPUs (--sequence_parallel_size 2), so 8 nodes x 8 GPUs are 32 data-parallel replicas of 2.
#
# Why N=2 and no gradient checkpointing: mason's memory plan for this command (bf16, ZeRO-3, the chunked loss) puts a
# 32k row's activations at about 134 GB on one GPU without recomputation; N=2 halves them (about 69 GB per GPU, which
# fits an 80 GB GPU), so the run skips the recomputation's extra forward. With --gradient_checkpointing the plan fits
# N=1 (about 17 GB); use N=4 or 8 for 64k-128k rows without it. Run `--backend print` to see the plan.
#
# Data: the OLMo-2 SFT mixture packs many short chats into each 32k row. For long reasoning traces, give your own
# long-context mixture after `--`:  -- --dataset_mixer_list my-org/long-traces 1.0
#
#   bash scripts/train/olmo2/finetune_7b_32k.sh [mason options] [-- trainer flags that override the recipe's]
#   bash scripts/train/olmo2/finetune_7b_32k.sh --backend print      # per-node commands and the memory plan
set -euo pipefail
cd "$(dirname "$0")/../../.."

MASON_FLAGS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do MASON_FLAGS+=("$1"); shift; done
[ $# -gt 0 ] && shift  # what follows `--` goes to the trainer

# The global batch is pinned in examples (64 per step, as the 4k OLMo-2 7B recipe's 32 replicas x 2 would not be), so
# the run is the same on any number of nodes; each micro-step is one packed row of at most 32,768 tokens per replica.
"${PYTHON:-python}" mason.py --num_nodes 8 --gpus_per_node 8 "${MASON_FLAGS[@]}" -- \
    accelerate launch --mixed_precision bf16 --use_deepspeed \
    --deepspeed_config_file configs/ds_configs/stage3_no_offloading_accelerate.conf \
    -m open_instruct.finetune \
    --model_name_or_path allenai/OLMo-2-1124-7B \
    --chat_template_name tulu \
    --add_bos \
    --dataset_mixer_list allenai/tulu-3-sft-olmo-2-mixture-0225 1.0 \
    --max_seq_length 32768 \
    --global_batch_size 64 \
    --max_tokens_per_micro_batch 32768 \
    --sequence_parallel_size 2 \
    --learning_rate 2e-5 \
    --lr_scheduler_type linear \
    --warmup_ratio 0.03 \
    --weight_decay 0.0 \
    --num_train_epochs 2 \
    --use_liger_kernel \
    --checkpointing_steps 500 \
    --keep_last_n_checkpoints 1 \
    --output_dir output/olmo2_7b_32k_sft \
    --exp_name olmo2_7b_32k_sft \
    --with_tracking \
    --logging_steps 1 \
    "$@"
