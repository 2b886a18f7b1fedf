#!/usr/bin/env bash
# Debug fine-tune on one device (a laptop CPU is enough): builds the embedded tiny Llama model and its byte-level
# tokenizer if missing, trains it on a synthetic mixture, evaluates it before, during and after training (held-out
# loss and bits per byte, exact match on the synthetic tasks' test splits), then reloads the saved model and answers
# held-out prompts.
#
#   bash scripts/train/debug/finetune.sh [finetune.py flags...]     # extra flags override the recipe's
#
# Environment:
#   MODEL=org/name DATASET="org/data 100"   train a real model instead (no code change; needs the hub)
#   TINY_MODEL_DIR=output/tiny-llama        where the embedded tiny model is built (when MODEL is unset)
#   NUM_PROCESSES=2                         processes to launch (default 1)
#   DS_CONFIG=configs/ds_configs/stage3_no_offloading_accelerate.conf   use DeepSpeed (unset: no DeepSpeed)
#   OUTPUT_DIR=output/debug                 where the run goes
#   EVAL=0                                  tiny model: skip the before/after evaluation (default 1)
#   PYTHON=python                           interpreter (make debug uses the project's .venv)
#   BACKEND=slurm|local|print               go through mason.py (see docs/cluster.md) instead of running here:
#   NUM_NODES=2                               nodes for mason (default 1); NUM_PROCESSES is then per node
#   GPUS_PER_NODE=0                           GPUs to request per node (default: NUM_PROCESSES if a GPU is
#                                             visible here, else 0)
#   MASON_FLAGS="--partition debug"           more mason options, e.g. --dry_run
set -euo pipefail
cd "$(dirname "$0")/../../.."

PYTHON=${PYTHON:-python}
OUTPUT_DIR=${OUTPUT_DIR:-output/debug}
NUM_PROCESSES=${NUM_PROCESSES:-1}
DS_CONFIG=${DS_CONFIG:-}

if [ -z "${MODEL:-}" ]; then
    MODEL=${TINY_MODEL_DIR:-output/tiny-llama}
    [ -f "$MODEL/config.json" ] || "$PYTHON" -m open_instruct.tiny_model "$MODEL"
    # letter_count is not in the demo: with balanced answers (0-3) the tiny model answered one count every time
    # (exact match 0.30 = its majority baseline after 1,500 steps, docs/benchmarks.md), so it would show nothing.
    DATASET=${DATASET:-"synthetic:spelling 4000 synthetic:reverse 2000"}
    # lr 5e-4: at 2e-3 the tiny model learned the answer format but never to copy letters (exact match 0 on
    # spelling and reverse after 1500 steps); at 5e-4 it spells and reverses every held-out word by step 1000.
    RECIPE=(--learning_rate 5e-4 --lr_scheduler_type linear --warmup_ratio 0.05 --num_train_epochs 3
            --per_device_train_batch_size 16 --gradient_accumulation_steps 1 --max_seq_length 256
            --clip_grad_norm 1.0 --logging_steps 25)
    HELD_OUT=(synthetic:spelling synthetic:reverse)
    if [ "${EVAL:-1}" != 0 ]; then
        # Before training, every 250 steps and after the last: the test splits' loss and the tasks' exact match
        # (50 of each; about 0.4 s an evaluation).
        RECIPE+=(--eval_dataset_mixer_list synthetic:spelling 1.0 synthetic:reverse 1.0
                 --eval_tasks spelling reverse --eval_max_examples 50 --eval_every 250)
    fi
else
    # A real model: open-instruct's debug settings (lr 5e-6, max_seq_length 1024) on a 100-row sample.
    DATASET=${DATASET:-"allenai/tulu-3-sft-mixture 100"}
    RECIPE=(--learning_rate 5e-6 --lr_scheduler_type linear --warmup_ratio 0.03 --num_train_epochs 2
            --per_device_train_batch_size 1 --gradient_accumulation_steps 4 --max_seq_length 1024)
    HELD_OUT=()
fi

# shellcheck disable=SC2206  # DATASET is a list of "name amount" words
FLAGS=(--model_name_or_path "$MODEL" --dataset_mixer_list $DATASET --output_dir "$OUTPUT_DIR"
       --exp_name debug_finetune --seed 42 "${RECIPE[@]}" "$@")

if [ -n "${BACKEND:-}" ]; then
    # mason checks the flags and the data, then submits (slurm), runs (local) or prints the per-node commands.
    GPUS=$(nvidia-smi -L >/dev/null 2>&1 && echo "$NUM_PROCESSES" || echo 0)
    DEEPSPEED=()
    [ -n "$DS_CONFIG" ] && DEEPSPEED=(--use_deepspeed --deepspeed_config_file "$DS_CONFIG")
    # shellcheck disable=SC2086  # MASON_FLAGS is a list of words
    "$PYTHON" mason.py --backend "$BACKEND" --num_nodes "${NUM_NODES:-1}" --gpus_per_node "${GPUS_PER_NODE:-$GPUS}" \
        --processes_per_node "$NUM_PROCESSES" ${MASON_FLAGS:-} -- \
        accelerate launch "${DEEPSPEED[@]}" -m open_instruct.finetune "${FLAGS[@]}"
    if [ "$BACKEND" != local ] || [[ " ${MASON_FLAGS:-} " == *" --dry_run "* ]]; then
        exit 0  # submitted, printed or dry-run: nothing trained here to sample from
    fi
elif [ -n "$DS_CONFIG" ]; then
    accelerate launch --num_processes "$NUM_PROCESSES" --use_deepspeed --deepspeed_config_file "$DS_CONFIG" \
        -m open_instruct.finetune "${FLAGS[@]}"
elif [ "$NUM_PROCESSES" -gt 1 ] && nvidia-smi -L >/dev/null 2>&1; then
    accelerate launch --multi_gpu --num_processes "$NUM_PROCESSES" -m open_instruct.finetune "${FLAGS[@]}"
elif [ "$NUM_PROCESSES" -gt 1 ]; then
    # accelerate's launcher runs a single process on a CPU-only machine; torchrun starts them all (gloo DDP).
    ACCELERATE_USE_CPU=true "$PYTHON" -m torch.distributed.run --nproc_per_node "$NUM_PROCESSES" \
        -m open_instruct.finetune "${FLAGS[@]}"
else
    "$PYTHON" -m open_instruct.finetune "${FLAGS[@]}"
fi

if [ ${#HELD_OUT[@]} -gt 0 ]; then
    "$PYTHON" -m open_instruct.sample "$OUTPUT_DIR" --held_out "${HELD_OUT[@]}" --n 3
fi
echo "Chat with the result: $PYTHON -m open_instruct.chat $OUTPUT_DIR   (or: open-instruct-sft chat $OUTPUT_DIR; /help inside)"
