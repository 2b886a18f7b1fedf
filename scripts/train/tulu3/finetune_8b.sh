#!/usr/bin/env bash
# Tulu-3 8B SFT: Llama-3.1-8B on allenai/tulu-3-sft-mixture with the tulu chat template, the settings of AI2's
# released recipe: 8 nodes x 8 GPUs, ZeRO-3 without offload, bf16, per-device batch 1 x accumulation 2 x 64 GPUs =
# global batch 128, lr 5e-6 linear with 3% warmup, no weight decay, 2 epochs, max_seq_length 4096, gradient
# checkpointing, padding-free packing (the trainer's default), Liger kernels.
#
# Loss: --loss_reduction sum, the raw token sum the released model was trained with (open-instruct's old
# `reduce_loss sum`), for a faithful reproduction. Remove it for our default, the same token sum divided by the
# trained tokens of each global batch (identical direction per step; the step size no longer grows with the batch's
# token count).
#
#   bash scripts/train/tulu3/finetune_8b.sh [mason options] [-- trainer flags that override the recipe's]
#   bash scripts/train/tulu3/finetune_8b.sh --partition gpu --account my-project --time 24:00:00
#   bash scripts/train/tulu3/finetune_8b.sh --dry_run            # print the sbatch script, submit nothing
#   bash scripts/train/tulu3/finetune_8b.sh --backend print      # per-node commands for another scheduler
#
# Llama-3.1 is gated: HF_TOKEN (of an account that accepted its license) is passed to the job by name.
set -euo pipefail
cd "$(dirname "$0")/../../.."

MASON_FLAGS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do MASON_FLAGS+=("$1"); shift; done
[ $# -gt 0 ] && shift  # what follows `--` goes to the trainer

"${PYTHON:-python}" mason.py --num_nodes 8 --gpus_per_node 8 --secret HF_TOKEN "${MASON_FLAGS[@]}" -- \
    accelerate launch --mixed_precision bf16 --use_deepspeed \
    --deepspeed_config_file configs/ds_configs/stage3_no_offloading_accelerate.conf \
    -m open_instruct.finetune \
    --model_name_or_path meta-llama/Llama-3.1-8B \
    --chat_template_name tulu \
    --dataset_mixer_list allenai/tulu-3-sft-mixture 1.0 \
    --max_seq_length 4096 \
    --per_device_train_batch_size 1 \
    --gradient_accumulation_steps 2 \
    --learning_rate 5e-6 \
    --lr_scheduler_type linear \
    --warmup_ratio 0.03 \
    --weight_decay 0.0 \
    --num_train_epochs 2 \
    --loss_reduction sum \
    --gradient_checkpointing \
    --use_liger_kernel \
    --checkpointing_steps 1000 \
    --keep_last_n_checkpoints 1 \
    --output_dir output/tulu3_8b_sft \
    --exp_name tulu3_8b_sft \
    --with_tracking \
    --logging_steps 1 \
    "$@"
