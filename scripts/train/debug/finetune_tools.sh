#!/usr/bin/env bash
# The embedded tiny model learns tool calls and reasoning traces on one device (a laptop CPU is enough): the
# synthetic:tool_calc task (the user asks a sum, difference or product; the assistant calls a calculator tool with
# JSON arguments, the tool answers, the assistant gives the result) and synthetic:reasoning (letter counting with
# the count written out letter by letter as the reasoning, then the answer), rendered with the hermes template
# (<tool_call> tags, tool results in <tool_response>, <think> reasoning; the rows carry no tools list, see
# synthetic.tool_calc for why). Evaluated before, every 200 steps and after:
# eval/tool_calc_call_accuracy (the generated call parses as JSON, names the calculator and has exactly the right
# arguments), eval/tool_calc_answer_accuracy (given the call and the tool's result, the final answer is right) and
# eval/reasoning_accuracy (the answer after the reasoning is right); then the saved model answers held-out prompts.
#
#   bash scripts/train/debug/finetune_tools.sh [finetune.py flags...]     # extra flags override the recipe's
#
# Environment: TINY_MODEL_DIR (default output/tiny-llama), OUTPUT_DIR (default output/debug_tools), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/../../.."

PYTHON=${PYTHON:-python}
OUTPUT_DIR=${OUTPUT_DIR:-output/debug_tools}
MODEL=${TINY_MODEL_DIR:-output/tiny-llama}
[ -f "$MODEL/config.json" ] || "$PYTHON" -m open_instruct.tiny_model "$MODEL"

"$PYTHON" -m open_instruct.finetune --model_name_or_path "$MODEL" --chat_template_name hermes \
    --dataset_mixer_list synthetic:tool_calc 4000 synthetic:reasoning 4000 --output_dir "$OUTPUT_DIR" \
    --exp_name debug_tools --seed 42 --learning_rate 5e-4 --lr_scheduler_type linear --warmup_ratio 0.05 \
    --max_train_steps 1200 --per_device_train_batch_size 16 --max_seq_length 1024 --clip_grad_norm 1.0 \
    --logging_steps 25 --eval_tasks tool_calc reasoning --eval_max_examples 50 --eval_every 200 "$@"

"$PYTHON" -m open_instruct.sample "$OUTPUT_DIR" --held_out synthetic:tool_calc synthetic:reasoning --n 3 \
    --max_new_tokens 96
