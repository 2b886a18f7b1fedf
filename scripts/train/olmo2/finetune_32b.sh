#!/usr/bin/env bash
# OLMo-2 32B SFT: allenai/OLMo-2-0325-32B on allenai/tulu-3-sft-olmo-2-mixture-0225 with the tulu chat template and a
# leading bos (--add_bos), as OLMo-2's released SFT models are formatted. 8 nodes x 8 GPUs, ZeRO-3 without offload,
# bf16, per-device batch 1 x accumulation 4 x 64 GPUs = global batch 256, lr 4e-6 linear with 3% warmup, no weight
# decay, 2 epochs, max_seq_length 4096, gradient checkpointing, padding-free packing (the trainer's default), Liger
# kernels.
#
# Loss: our default, the token sum divided by the trained tokens of each global batch. For open-instruct's raw token
# sum (its old `reduce_loss sum`), add: -- --loss_reduction sum
#
#   bash scripts/train/olmo2/finetune_32b.sh [mason options] [-- trainer flags that override the recipe's]
#   bash scripts/train/olmo2/finetune_32b.sh --partition gpu --account my-project --time 48:00:00
#   bash scripts/train/olmo2/finetune_32b.sh --dry_run            # print the sbatch script, submit nothing
#   bash scripts/train/olmo2/finetune_32b.sh --backend print      # per-node commands for another scheduler
set -euo pipefail
cd "$(dirname "$0")/../../.."

MASON_FLAGS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do MASON_FLAGS+=("$1"); shift; done
[ $# -gt 0 ] && shift  # what follows `--` goes to the trainer

"${PYTHON:-python}" mason.py --num_nodes 8 --gpus_per_node 8 "${MASON_FLAGS[@]}" -- \
    accelerate launch --mixed_precision bf16 --use_deepspeed \
    --deepspeed_config_file configs/ds_configs/stage3_no_offloading_accelerate.conf \
    -m open_instruct.finetune \
    --model_name_or_path allenai/OLMo-2-0325-32B \
    --chat_template_name tulu \
    --add_bos \
    --dataset_mixer_list allenai/tulu-3-sft-olmo-2-mixture-0225 1.0 \
    --max_seq_length 4096 \
    --per_device_train_batch_size 1 \
    --gradient_accumulation_steps 4 \
    --learning_rate 4e-6 \
    --lr_scheduler_type linear \
    --warmup_ratio 0.03 \
    --weight_decay 0.0 \
    --num_train_epochs 2 \
    --gradient_checkpointing \
    --use_liger_kernel \
    --checkpointing_steps 1000 \
    --keep_last_n_checkpoints 1 \
    --output_dir output/olmo2_32b_sft \
    --exp_name olmo2_32b_sft \
    --with_tracking \
    --logging_steps 1 \
    "$@"
