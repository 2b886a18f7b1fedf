#!/usr/bin/env bash
# OLMo-2 7B SFT: allenai/OLMo-2-1124-7B, lr 2e-5, gradient accumulation 2 (global batch 128), no gradient
# checkpointing (it fits without). The rest of the recipe (data, template, layout, schedule) is shared by the OLMo-2
# sizes: see sft.sh beside this file.
#
#   bash scripts/train/olmo2/finetune_7b.sh [mason options] [-- trainer flags that override the recipe's]
#   bash scripts/train/olmo2/finetune_7b.sh --partition gpu --account my-project --time 48:00:00
#   bash scripts/train/olmo2/finetune_7b.sh --dry_run            # print the sbatch script, submit nothing
#   bash scripts/train/olmo2/finetune_7b.sh --backend print      # per-node commands for another scheduler
MODEL=allenai/OLMo-2-1124-7B RUN=olmo2_7b_sft LR=2e-5 GA=2 GRAD_CKPT=false \
    exec bash "$(dirname "$0")/sft.sh" "$@"
