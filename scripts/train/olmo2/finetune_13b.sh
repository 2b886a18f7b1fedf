#!/usr/bin/env bash
# OLMo-2 13B SFT: allenai/OLMo-2-1124-13B, lr 5e-6, gradient accumulation 1 (global batch 64), gradient checkpointing.
# The rest of the recipe (data, template, layout, schedule) is shared by the OLMo-2 sizes: see sft.sh beside this
# file.
#
#   bash scripts/train/olmo2/finetune_13b.sh [mason options] [-- trainer flags that override the recipe's]
#   bash scripts/train/olmo2/finetune_13b.sh --partition gpu --account my-project --time 48:00:00
#   bash scripts/train/olmo2/finetune_13b.sh --dry_run            # print the sbatch script, submit nothing
#   bash scripts/train/olmo2/finetune_13b.sh --backend print      # per-node commands for another scheduler
MODEL=allenai/OLMo-2-1124-13B RUN=olmo2_13b_sft LR=5e-6 GA=1 GRAD_CKPT=true \
    exec bash "$(dirname "$0")/sft.sh" "$@"
