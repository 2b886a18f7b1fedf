#!/usr/bin/env bash
# The OLMo-2 SFT recipe that finetune_{7b,13b,32b}.sh run with their model, learning rate, accumulation and
# gradient-checkpointing choice (MODEL, RUN, LR, GA, GRAD_CKPT=true|false): the model on
# allenai/tulu-3-sft-olmo-2-mixture-0225 with the tulu chat template and a leading bos (--add_bos), as OLMo-2's
# released SFT models are formatted. 8 nodes x 8 GPUs, ZeRO-3 without offload, bf16, per-device batch 1 (global batch
# 64 x GA), linear schedule with 3% warmup, no weight decay, 2 epochs, max_seq_length 4096, padding-free packing (the
# trainer's default), Liger kernels, a checkpoint every 1000 steps keeping the newest.
#
# Loss: our default, the token sum divided by the trained tokens of each global batch. For open-instruct's raw token
# sum (its old `reduce_loss sum`), add: -- --loss_reduction sum
set -euo pipefail
cd "$(dirname "$0")/../../.."

MASON_FLAGS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do MASON_FLAGS+=("$1"); shift; done
[ $# -gt 0 ] && shift  # what follows `--` goes to the trainer

GRAD_CKPT_FLAG=()
[ "$GRAD_CKPT" = true ] && GRAD_CKPT_FLAG=(--gradient_checkpointing)

"${PYTHON:-python}" mason.py --num_nodes 8 --gpus_per_node 8 "${MASON_FLAGS[@]}" -- \
    accelerate launch --mixed_precision bf16 --use_deepspeed \
    --deepspeed_config_file configs/ds_configs/stage3_no_offloading_accelerate.conf \
    -m open_instruct.finetune \
    --model_name_or_path "$MODEL" \
    --chat_template_name tulu \
    --add_bos \
    --dataset_mixer_list allenai/tulu-3-sft-olmo-2-mixture-0225 1.0 \
    --max_seq_length 4096 \
    --per_device_train_batch_size 1 \
    --gradient_accumulation_steps "$GA" \
    --learning_rate "$LR" \
    --lr_scheduler_type linear \
    --warmup_ratio 0.03 \
    --weight_decay 0.0 \
    --num_train_epochs 2 \
    "${GRAD_CKPT_FLAG[@]}" \
    --use_liger_kernel \
    --checkpointing_steps 1000 \
    --keep_last_n_checkpoints 1 \
    --output_dir "output/$RUN" \
    --exp_name "$RUN" \
    --with_tracking \
    --logging_steps 1 \
    "$@"
